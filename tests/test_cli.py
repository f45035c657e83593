"""The dk commands: exit codes, one-line errors, user-code references, overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from darkknowledge.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "teacher": {"name": "cli_helpers:tiny_model", "args": {"width": 16}, "train_steps": 15},
    "student": {"name": "cli_helpers:tiny_model", "args": {"width": 4}},
    "data": {"name": "cli_helpers:tiny_data", "args": {"size": 48}, "batch_size": 12},
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "train": {"max_steps": 6, "log_every": 2, "progress": False},
}


def write_config(tmp_path: Path, raw: dict, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and err.startswith(f"dk {command}: error: ") and "Traceback" not in err
    )
    return err


def test_cli_validate_presets_ok(capsys):
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        assert main(["validate", str(preset)]) == 0
    assert capsys.readouterr().out.count(": ok") >= 4


def test_cli_validate_lists_every_problem(tmp_path, capsys):
    raw = {
        "distill": {"temprature": 2, "alpha": 3},
        "train": {"max_steps": 0},
        "student": {"hidden": "wide"},
    }
    assert main(["validate", write_config(tmp_path, raw), "data.batch_size=-1"]) == 2
    err = capsys.readouterr().err
    for path in (
        "distill.temprature",
        "distill.alpha",
        "train.max_steps",
        "student.hidden",
        "data.batch_size",
        "teacher",  # what dk distill needs, listed with the config's own problems
    ):
        assert f"  {path}:" in err
    assert "did you mean 'temperature'" in err and err.startswith(
        f"{tmp_path}/config.yaml: 6 problem(s)"
    )


def test_cli_distill_bad_config_exits_2_in_one_line(tmp_path, capsys):
    path = write_config(tmp_path, {**TINY, "distill": {"temprature": 2.0, "alpha": 2}})
    assert main(["distill", path]) == 2
    err = one_line_error(capsys, "distill")
    assert (
        "distill.temprature: unknown key; did you mean 'temperature'?" in err
        and "1 more problem" in err
    )
    assert main(["distill", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in one_line_error(capsys, "distill")
    assert main(["distill", write_config(tmp_path, TINY), "train.max_steps=0"]) == 2
    assert "train.max_steps: must be >= 1, got 0" in one_line_error(capsys, "distill")
    assert main(["distill", write_config(tmp_path, {"student": {"hidden": [4]}})]) == 2
    assert "needs a `teacher` section" in one_line_error(capsys, "distill")


@pytest.mark.parametrize(
    "name, message",
    [
        ("cli_helpers:no_such_thing", "has no attribute 'no_such_thing'"),
        ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
        ("cli_helpers:NOT_CALLABLE", "not a callable"),
        (
            "resnet",
            "student.name: got 'resnet' (allowed: mlp, cnn, linear, hf_causal_lm, or 'package.module:callable')",
        ),
    ],
)
def test_cli_bad_model_reference_is_one_line(tmp_path, capsys, name, message):
    raw = {**TINY, "student": {"name": name}}
    assert main(["train", write_config(tmp_path, raw)]) == 2
    assert message in one_line_error(capsys, "train")


def test_cli_distill_train_eval_with_user_code(tmp_path, capsys):
    out = tmp_path / "run"
    path = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": str(out)}})
    assert main(["distill", path, "distill.alpha=0.7"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results] == ["teacher", "student"] and results[1]["step"] == 6
    assert (out / "student" / "model.safetensors").exists() and (
        out / "student" / "metrics.jsonl"
    ).exists()
    teacher_weights = out / "teacher" / "model.safetensors"  # the trained teacher, reusable
    assert (
        main(["validate", path, f"teacher.checkpoint={teacher_weights}", "teacher.train_steps=0"])
        == 0
    )
    capsys.readouterr()
    assert main(["eval", path, "--checkpoint", str(out / "student")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["count"] == 12 and 0 <= metrics["accuracy"] <= 1
    assert abs(metrics["accuracy"] - results[1]["eval_accuracy"]) < 1e-6
    baseline = tmp_path / "baseline"  # a dk train into the dk distill folder would be refused
    assert main(["train", path, "train.max_steps=3", f"train.output_dir={baseline}"]) == 0
    assert json.loads((baseline / "results.json").read_text())[0]["stage"] == "baseline"
    # Weights of another shape: a one-line error, not a traceback.
    assert main(["eval", path, "student.args.width=5", "--checkpoint", str(out / "student")]) == 2
    assert "does not fit the model" in one_line_error(capsys, "eval")


def test_cli_help_and_subprocess_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "distill" in out and "validate" in out and "demo" in out
    # One real process: the installed entry point's exit code and stderr, no traceback.
    bad = write_config(tmp_path, {"distill": {"alpha": "high"}})
    failed = subprocess.run(
        [sys.executable, "-m", "darkknowledge.cli", "distill", bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    expected = f"dk distill: error: {bad}: distill.alpha: expected a number, got str 'high'"
    assert failed.stderr.strip() == expected


def test_cli_labelled_fraction_transfer_set(tmp_path, capsys):
    from darkknowledge.commands._build import IGNORE, build_data
    from darkknowledge.config import DataConfig

    bundle = build_data(DataConfig(labelled_fraction=0.1))
    baseline, transfer = bundle.student_train(distill=False), bundle.student_train(distill=True)
    known = transfer.tensors[1] != IGNORE
    assert (
        len(transfer) == 1347 and int(known.sum()) == len(baseline) == 136
    )  # 10 % per class, rounded
    assert (baseline.tensors[1] == transfer.tensors[1][known]).all()
    raw = {
        "teacher": {"hidden": [8], "train_steps": 3},
        "student": {"hidden": [4]},
        "data": {"labelled_fraction": 0.1},
        "train": {"max_steps": 3, "progress": False},
    }
    assert main(["distill", write_config(tmp_path, raw)]) == 0
    assert "student: step=3" in capsys.readouterr().out
    raw["data"] = {"name": "cli_helpers:tiny_data", "labelled_fraction": 0.5}
    assert main(["validate", write_config(tmp_path, raw)]) == 2
    assert "data.labelled_fraction: only the built-in digits" in capsys.readouterr().err


def test_cli_validate_checks_what_distill_will_need(tmp_path, capsys):
    """Missing checkpoint files and unimportable or uncallable user code, all listed at once."""
    raw = {
        "teacher": {"hidden": [8], "checkpoint": str(tmp_path / "teacher.safetensors")},
        "student": {"name": "cli_helpers:NOT_CALLABLE", "checkpoint": "missing/student.st"},
        "data": {"name": "no_such_package_xyz:load"},
        "distill": {"temprature": 2.0},  # a mistake in the config itself does not hide the rest
    }
    assert main(["validate", write_config(tmp_path, raw)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("config.yaml: 5 problem(s)")
    assert sorted(line.split()[0] for line in err[1:]) == [
        "data.name",
        "distill.temprature:",
        "student.checkpoint:",
        "student.name",
        "teacher.checkpoint:",
    ]
    text = "\n".join(err)
    assert f"teacher.checkpoint: no file {str(tmp_path / 'teacher.safetensors')!r}" in text
    assert "'cli_helpers:NOT_CALLABLE' is a int, not a callable" in text
    assert "cannot import module 'no_such_package_xyz'" in text
    # The same config without those problems is fine, with or without a teacher.
    good = {
        "student": {"name": "cli_helpers:tiny_model"},
        "data": {"name": "cli_helpers:tiny_data"},
    }
    path = write_config(tmp_path, good, "good.yaml")
    assert main(["validate", path]) == 2  # dk distill needs a teacher...
    assert "teacher: missing: dk distill needs a teacher" in capsys.readouterr().err
    assert main(["validate", path, "--for", "train"]) == 0  # ... dk train does not
    assert capsys.readouterr().out.strip() == f"{path}: ok for dk train"


def test_cli_validate_empty_or_non_mapping_config(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["validate", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "config: the file is empty; dk distill needs `student` and `teacher` sections" in err
    for text, kind in (("- student\n- teacher\n", "list"), ("3\n", "int"), ("hello\n", "str")):
        bad = tmp_path / f"{kind}.yaml"
        bad.write_text(text)
        for command in ("validate", "distill"):
            assert main([command, str(bad)]) == 2
            err = capsys.readouterr().err
            assert (
                f"the top level must be a mapping of sections (student:, teacher:, data:, distill:, train:), got {kind}"
                in err
            )
            assert "dictionary update sequence" not in err


def test_cli_user_code_in_the_current_folder_or_next_to_the_config(tmp_path):
    """No PYTHONPATH: the `dk` script's own folder is the virtualenv's bin/, so the current
    folder and the config's folder must be searched by the command itself."""
    for where in ("cwd", "config"):
        module = f"my_models_{where}"
        code_dir = tmp_path / where
        code_dir.mkdir()
        (code_dir / f"{module}.py").write_text(
            "import torch\n\n\ndef make(width=4):\n    return torch.nn.Linear(64, 10)\n"
        )
        config_dir = code_dir if where == "config" else tmp_path / "configs"
        config_dir.mkdir(exist_ok=True)
        raw = {"student": {"name": f"{module}:make"}, "train": {"max_steps": 1, "progress": False}}
        path = write_config(config_dir, raw, f"{where}.yaml")
        run_from = code_dir if where == "cwd" else tmp_path
        # -I: no PYTHONPATH and no current folder on sys.path, as for the installed `dk` script
        done = subprocess.run(
            [sys.executable, "-I", "-c", "import sys; from darkknowledge.cli import main; sys.exit(main())",
             "validate", path, "--for", "train"],
            capture_output=True, text=True, timeout=120, cwd=run_from,
        )  # fmt: skip
        assert done.returncode == 0, (where, done.stderr)
        assert done.stdout.strip() == f"{path}: ok for dk train"


def test_cli_eval_accepts_a_checkpoint_folder_an_export_or_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    train = {**TINY["train"], "output_dir": str(out), "save_every": 3}
    path = write_config(tmp_path, {**TINY, "train": train})
    assert main(["distill", path]) == 0
    step = out / "student" / "checkpoints" / "step-00000006"
    assert (step / "student.safetensors").is_file()
    capsys.readouterr()
    results = []
    for checkpoint in (step, out / "student", out / "student" / "model.safetensors"):
        assert main(["eval", path, "--checkpoint", str(checkpoint)]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0] == results[1] == results[2]  # the same final weights, three ways
    earlier = out / "student" / "checkpoints" / "step-00000003"
    assert main(["eval", path, "--checkpoint", str(earlier)]) == 0
    assert json.loads(capsys.readouterr().out.strip())["loss"] != results[0]["loss"]
    # A folder with no weights: one line that points at the latest checkpoint.
    (out / "student" / "model.safetensors").unlink()
    assert main(["eval", path, "--checkpoint", str(out / "student")]) == 2
    err = one_line_error(capsys, "eval")
    assert "holds neither model.safetensors nor student.safetensors" in err
    assert f"its latest checkpoint is {step}" in err


def test_cli_options_and_overrides_in_any_order(tmp_path, capsys):
    # `--resume` between the config and its overrides: argparse's plain parse_args would take
    # the override for an unknown argument and exit 2.
    path = write_config(
        tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": str(tmp_path / "run")}}
    )
    assert main(["distill", path, "train.max_steps=4"]) == 0
    assert main(["distill", path, "--resume", "train.max_steps=6"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results[-1]["step"] == 6
    assert main(["validate", path, "--for", "train", "train.max_steps=7"]) == 0
    capsys.readouterr()


def test_cli_a_run_refused_before_training_does_not_block_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    bad = write_config(
        tmp_path,
        {
            **TINY,
            "student": {"name": "cli_helpers:no_such"},
            "train": {**TINY["train"], "output_dir": str(run)},
        },
        "bad.yaml",
    )
    assert main(["distill", bad]) == 2  # refused when the model is built, after run.json
    assert [p.name for p in run.iterdir()] == ["run.json"]
    good = write_config(tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": str(run)}})
    assert main(["distill", good]) == 0  # not "train.output_dir ... is not empty"
    capsys.readouterr()
