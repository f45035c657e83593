"""``dk.Distiller`` and ``dk distill`` under FSDP2 on 2 CPU processes (gloo) give the
one-process result, evaluate uneven shards without hanging, and resume after SIGKILL bit for bit.

Each launch is ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ...`` (the
documented command) of ``fsdp_worker.py`` (a Distiller) or ``fsdp_cli.py`` (the ``dk``
command), both on the test-only FSDP2 Accelerator of ``fsdp_worker.fsdp_accelerator``:
Accelerate itself runs FSDP only on GPUs. ``fsdp_worker.reference`` is one plain PyTorch
process over the whole global batch, with full logits and ``dk.kd_loss``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import fsdp_worker as worker
import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).parent
MLP = {"model": "mlp", "steps": 6, "grad_accum": 2, "max_grad_norm": 0.05}
GPT2 = {"model": "gpt2", "steps": 3, "grad_accum": 2, "max_grad_norm": 0.2}
# Two stages with dropout, accumulation, clipping; a checkpoint every 3 steps.
CLI_CONFIG = {
    "teacher": {"hidden": [32], "train_steps": 6, "dropout": 0.1},
    "student": {"hidden": [8], "dropout": 0.1},
    "data": {"name": "digits", "batch_size": 16, "eval_batch_size": 256},
    "distill": {"temperature": 3.0, "alpha": 0.7},
    "train": {
        "max_steps": 9, "grad_accum_steps": 2, "max_grad_norm": 1.0, "save_every": 3,
        "keep_last": 2, "log_every": 1, "eval_every": 6, "progress": False,
    },
}  # fmt: skip
THROUGHPUT = ("steps_per_s", "positions_per_s", "seconds")


def _fsdp2_missing() -> str | None:
    from packaging.version import Version

    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with the gloo backend is not available"
    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        return f"FSDP2 needs torch >= 2.6, got {torch.__version__}"
    if Version(accelerate.__version__) < Version("1.6"):
        return f"FSDP2 through Accelerate needs accelerate >= 1.6, got {accelerate.__version__}"
    return None


pytestmark = [
    pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing())),
    pytest.mark.usefixtures("one_thread"),
]


def _command(script: str, *args: str, wrap: bool = False) -> list[str]:
    wrapping = ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"] if wrap else []
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
        *wrapping, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0", str(HERE / script), *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _launch(spec: dict, out: Path, *, timeout: float = 180.0) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    command = _command("fsdp_worker.py", json.dumps(spec), str(out), wrap=spec["model"] == "gpt2")
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _run(spec: dict, out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    done = _launch({"output_dir": str(out / "run"), **spec}, out)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["is_fsdp2"] and result["sharded"] == "DTensor", result  # sharded for real
    return result, load_file(str(out / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    return _run({**MLP, "save_every": 3, "refusals": True}, tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def mlp_reference():
    return worker.reference(MLP)


def test_fsdp_accumulation_matches_one_process(mlp_run, mlp_reference):
    result, state = mlp_run
    assert result["steps"] == list(range(1, MLP["steps"] + 1))
    assert sorted(state) == sorted(mlp_reference["state"])
    for name, value in mlp_reference["state"].items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The logged total is the step's global mean loss.
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(mlp_reference["losses"]), rtol=1e-6, atol=0
    )


def test_fsdp_clip_grad_norm_matches_one_process(mlp_run, mlp_reference):
    norms, expected = (
        torch.tensor(mlp_run[0]["grad_norms"]),
        torch.tensor(mlp_reference["grad_norms"]),
    )
    assert bool((expected > MLP["max_grad_norm"]).all())  # clipping binds on every step
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)


def test_fsdp_uneven_evaluation_matches_one_process(mlp_run, mlp_reference):
    # 5 batches on 2 processes; 18 rows with every 3rd label ignored: 12 count.
    evaluation = mlp_run[0]["eval"]
    assert evaluation["count"] == mlp_reference["eval"]["count"] == 12
    assert evaluation["loss"] == pytest.approx(mlp_reference["eval"]["loss"], rel=1e-6)


def test_fsdp_refuses_learnable_temperature_and_fp16_without_scaler(mlp_run):
    refusals = mlp_run[0]["refusals"]
    assert "LearnableTemperature is not supported under FSDP" in refusals["learnable_temperature"]
    assert "fp16' under FSDP needs Accelerate's gradient scaler" in refusals["fp16"]


def test_fsdp_checkpoint_holds_shards_listed_in_the_manifest(mlp_run, tmp_path):
    checkpoint = Path(mlp_run[0]["output_dir"]) / "checkpoints" / "step-00000006"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    shards = sorted(n for n in manifest if n.startswith("sharded/"))
    assert shards == ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"]
    assert not (checkpoint / "student.safetensors").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["sharded"] == {"optimizer": True} and state["world_size"] == 2


def test_fsdp_checkpoint_refused_without_fsdp(mlp_run):
    import darkknowledge as dk

    output_dir = Path(mlp_run[0]["output_dir"])
    student, teacher = worker.models("mlp")
    data = worker.train_loader("mlp", 1, 1, 1, 4)
    distiller = dk.Distiller(
        student, teacher, data, max_steps=6, output_dir=output_dir, progress=False
    )
    with pytest.raises(ValueError, match=r"was written with FSDP .* this run is without it"):
        distiller.fit(resume=True)


def test_fsdp_gpt2_causal_lm_matches_one_process_and_exports_full_weights(tmp_path):
    result, state = _run(GPT2, tmp_path)
    reference = worker.reference(GPT2)
    assert sorted(state) == sorted(reference["state"])  # tied lm_head.weight exported too
    for name, value in reference["state"].items():
        # c_attn's key bias has a zero true gradient (softmax ignores it): AdamW turns its
        # rounding noise into updates of ~1e-6, in either run.
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    norms = torch.tensor(reference["grad_norms"])
    assert bool((norms > GPT2["max_grad_norm"]).all())
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0
    )
    # 5 evaluation batches on 2 processes, each block its own FSDP unit: without padding to
    # 3 forwards each, the processes' all-gathers would not match and both would time out.
    assert result["eval"]["count"] == reference["eval"]["count"]
    assert result["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-5)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])  # still tied
    student, _ = worker.models("gpt2")
    student.load_state_dict(state, strict=True)  # the full, unsharded state


def test_fsdp_collective_timeout_is_a_clear_error(tmp_path):
    # Only the main process evaluates: its forward waits for the other process, which never
    # joins, until the process group's timeout (6 s here).
    spec = {**MLP, "output_dir": None, "timeout_s": 6, "evaluate_alone": True}
    started = time.monotonic()
    done = _launch(spec, tmp_path)
    assert done.returncode != 0
    assert "CollectiveTimeout: Distiller.evaluate on process 0 of 2 waited" in done.stderr, (
        done.stderr[-3000:]
    )
    assert (
        "every process must call fit, evaluate, save_checkpoint and export_student" in done.stderr
    )
    assert time.monotonic() - started < 120


def _dk_distill(config: Path, output_dir: Path, *extra: str) -> list[str]:
    return _command("fsdp_cli.py", "distill", str(config), f"train.output_dir={output_dir}", *extra)


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in THROUGHPUT} for x in lines]


def _process_tree(root: int) -> list[int]:
    """``root`` and its descendants (torchrun starts each worker in a session of its own, so
    killing the launcher's process group would leave the workers running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in parents.get(pid, [])]
        tree += frontier
    return tree


def _result_rows(run: Path) -> list[dict]:
    """results.json without timings and paths; "identity" (the config's fingerprint) is only
    in the rows of stages that a resume loaded from their summary."""
    ignored = (*THROUGHPUT, "weights", "identity")
    rows = json.loads((run / "results.json").read_text())
    return [{k: v for k, v in row.items() if k not in ignored} for row in rows]


def _kill_in_second_save(command: list[str], output_dir: Path, timeout: float = 180.0) -> None:
    """Run ``command`` and SIGKILL it, launcher and workers at once, as soon as the student's
    second checkpoint (step 6) is being written: its files half there, step 3 complete."""
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    checkpoints, deadline = output_dir / "student" / "checkpoints", time.monotonic() + timeout
    while not (checkpoints / ".tmp-step-00000006").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended before its second save: {process.communicate()[1][-3000:]}")
        time.sleep(0.0005)
    for pid in reversed(_process_tree(process.pid)):  # workers first, the launcher last
        os.kill(pid, signal.SIGKILL)
    process.communicate()


def test_fsdp_dk_distill_resume_after_kill_is_bitwise_identical(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CLI_CONFIG))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(
        _dk_distill(config, reference), env=_env(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-4000:]

    _kill_in_second_save(_dk_distill(config, killed), killed)
    student_checkpoints = killed / "student" / "checkpoints"
    assert sorted(p.name for p in student_checkpoints.iterdir()) == [
        ".tmp-step-00000006", "step-00000003",
    ]  # fmt: skip
    resumed = subprocess.run(
        _dk_distill(config, killed, "--resume"), env=_env(), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "teacher (mlp [32]): finished before, loaded from" in resumed.stdout
    # Sharded student and optimizer from step 3 (DCP), the teacher from its full weights.
    assert sorted(p.name for p in student_checkpoints.iterdir()) == [
        "step-00000006", "step-00000009",
    ]  # fmt: skip
    for stage in ("teacher", "student"):
        ours = (killed / stage / "model.safetensors").read_bytes()
        assert ours == (reference / stage / "model.safetensors").read_bytes(), stage
        assert _records(killed / stage / "metrics.jsonl") == _records(
            reference / stage / "metrics.jsonl"
        ), stage
    assert _result_rows(killed) == _result_rows(reference)
