"""Causal-LM configs: ``task: causal_lm``, built-in Hugging Face models and text data, and the
``dk distill`` / ``train`` / ``eval`` / ``validate`` commands on them (resume included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from darkknowledge.cli import main
from darkknowledge.config import check_config, load_config
from darkknowledge.llm.models import build_causal_lm, load_causal_lm_weights
from same_files import assert_same_file

ROOT = Path(__file__).resolve().parents[2]
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 16}
GPT2 |= {"bos_token_id": 0, "eos_token_id": 0}
TINY = {
    "task": "causal_lm",
    "teacher": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 32}, "train_steps": 4},
    "student": {"name": "hf_causal_lm", "args": {**GPT2, "n_embd": 16}},
    "data": {
        "name": "stdlib_bytes", "block_size": 16, "batch_size": 4, "eval_batch_size": 32,
        "train_bytes": 20_000, "heldout_bytes": 1_024,
    },
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "train": {"max_steps": 6, "save_every": 2, "keep_last": 2, "log_every": 1, "progress": False},
}  # fmt: skip
THROUGHPUT = ("steps_per_s", "positions_per_s", "seconds")


def write(tmp_path: Path, raw: dict, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in THROUGHPUT} for x in lines]


def test_llm_config_presets_load_as_causal_lm():
    presets = sorted((ROOT / "configs").glob("llm_*.yaml"))
    assert "llm_kd.yaml" in [p.name for p in presets]
    for preset in presets:
        config = load_config(preset)
        assert config.task == "causal_lm" and config.data.name == "stdlib_bytes", preset.name
        assert config.teacher.name == config.student.name == "hf_causal_lm", preset.name
    demo = load_config(ROOT / "configs" / "llm_kd.yaml")  # the sizes of dk demo llm
    from darkknowledge.llm.demo import Recipe

    recipe = Recipe()
    assert (demo.teacher.args["n_layer"], demo.teacher.args["n_embd"]) == (3, 128)
    assert (recipe.teacher_layers, recipe.teacher_width) == (3, 128)
    assert (demo.student.args["n_layer"], demo.student.args["n_embd"]) == (
        recipe.student_layers,
        recipe.student_width,
    )
    assert demo.train.max_steps == recipe.student_steps and demo.teacher.train_steps == 400
    assert demo.distill.temperature == recipe.temperature and demo.distill.alpha == recipe.alpha


@pytest.mark.parametrize(
    "change, path",
    [
        ({"student": {"name": "mlp", "hidden": [8]}}, "student.name"),
        ({"student": {"name": "hf_causal_lm", "args": {"n_layer": 1}}}, "student.args.model_type"),
        ({"student": {"name": "hf_causal_lm", "args": GPT2, "hidden": [8]}}, "student.hidden"),
        ({"data": {"name": "digits"}}, "data.name"),
        ({"data": {"name": "stdlib_bytes", "block_size": 8, "prompt_length": 8}}, "data.prompt_length"),
        ({"distill": {"standardize": True}}, "distill.standardize"),
        ({"distill": {"dkd_weights": [1.0, 8.0]}}, "distill.dkd_weights"),
        ({"distill": {"unlabelled": "distill"}}, "distill.unlabelled"),
        ({"task": "classification"}, "teacher.name"),
        ({"task": "causal"}, "task"),
    ],
)  # fmt: skip
def test_llm_config_fields_that_do_not_suit_the_task_name_their_path(change, path):
    raw = {**TINY, **change}
    _, errors = check_config(raw)
    assert errors and errors[0].startswith(f"{path}:"), errors


def test_llm_config_user_data_needs_a_vocabulary_size():
    raw = {**TINY, "data": {"name": "my_data:make", "batch_size": 2}}
    _, errors = check_config(raw)
    assert sorted(e.split(":")[0] for e in errors) == [
        "student.args.vocab_size",
        "teacher.args.vocab_size",
    ]
    assert check_config({**raw, "data": {**raw["data"], "vocab_size": 50}})[1] == []


def test_llm_config_hf_causal_lm_from_args_file_and_folder(tmp_path):
    """From a config (vocabulary from the data), then its weights back from a safetensors file
    written by save_pretrained (the tied output layer stored once) and from the folder itself."""
    torch.manual_seed(0)
    model = build_causal_lm("hf_causal_lm", args={**GPT2, "n_embd": 16}, vocab_size=40)
    assert model.config.vocab_size == 40 and model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path / "pretrained")
    torch.manual_seed(1)
    other = build_causal_lm("hf_causal_lm", args={**GPT2, "n_embd": 16}, vocab_size=40)
    assert not torch.equal(other.transformer.wte.weight, model.transformer.wte.weight)
    load_causal_lm_weights(other, str(tmp_path / "pretrained" / "model.safetensors"))
    folder = build_causal_lm("hf_causal_lm", checkpoint=str(tmp_path / "pretrained"))
    for loaded in (other, folder):
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    # A state dict that misses an untied tensor is refused, naming it.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("ln_f.bias")}
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"},
        tmp_path / "bad.safetensors",
    )
    with pytest.raises(ValueError, match=r"missing keys \['transformer.ln_f.bias'\]"):
        load_causal_lm_weights(other, str(tmp_path / "bad.safetensors"), what="student")
    with pytest.raises(
        ValueError, match=r"^student.args.model_type: 'gpt3' is not a transformers model type"
    ):
        build_causal_lm("hf_causal_lm", args={"model_type": "gpt3"}, vocab_size=4, what="student")
    with pytest.raises(ValueError, match=r"^teacher.args.vocab_size: missing"):
        build_causal_lm("hf_causal_lm", args=GPT2, what="teacher")


def test_llm_config_distill_train_eval_validate(tmp_path, capsys):
    run = tmp_path / "run"
    path = write(tmp_path, {**TINY, "train": {**TINY["train"], "output_dir": str(run)}})
    assert main(["validate", path]) == 0
    assert main(["distill", path]) == 0
    results = json.loads((run / "results.json").read_text())
    assert [r["stage"] for r in results] == ["teacher", "student"]
    student = results[1]
    assert student["step"] == 6 and student["eval_count"] == 1024 // 16 * 15  # every eval token
    assert student["eval_bits_per_token"] == pytest.approx(student["eval_loss"] / math.log(2))
    assert student["eval_perplexity"] == pytest.approx(math.exp(student["eval_loss"]))
    capsys.readouterr()
    evaluated = []
    for checkpoint in (run / "student", run / "student" / "checkpoints" / "step-00000006"):
        assert main(["eval", path, "--checkpoint", str(checkpoint)]) == 0
        evaluated.append(last_json(capsys))
    assert evaluated[0] == evaluated[1]
    metrics = evaluated[0]
    assert metrics["cross_entropy"] == pytest.approx(student["eval_loss"], rel=1e-12)
    assert metrics["bits_per_token"] == pytest.approx(metrics["cross_entropy"] / math.log(2))
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["cross_entropy"]))
    # The trained teacher as a checkpoint of another run: dk's export folder (config.json +
    # model.safetensors) is a save_pretrained folder, so no model_type is needed.
    teacher = {"name": "hf_causal_lm", "checkpoint": str(run / "teacher")}
    reuse = tmp_path / "reuse"
    raw = {
        **TINY,
        "teacher": teacher,
        "train": {**TINY["train"], "max_steps": 2, "output_dir": str(reuse)},
    }
    assert main(["distill", write(tmp_path, raw, "reuse.yaml")]) == 0
    reused = json.loads((reuse / "results.json").read_text())[0]
    assert reused["source"] == str(run / "teacher")
    assert reused["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-12)
    baseline = tmp_path / "baseline"
    assert main(["train", path, "train.max_steps=2", f"train.output_dir={baseline}"]) == 0
    assert json.loads((baseline / "results.json").read_text())[0]["stage"] == "baseline"
    capsys.readouterr()
    assert main(["validate", path, "teacher.checkpoint=nowhere", "data.prompt_length=16"]) == 2
    err = capsys.readouterr().err
    assert "data.prompt_length: must be smaller than data.block_size=16" in err
    assert "teacher.checkpoint: no file or folder 'nowhere'" in err


def test_llm_config_resume_continues_bitwise(tmp_path):
    """A run stopped at step 3 and resumed to step 6 ends with the uninterrupted run's weights
    and log, byte for byte (dropout on: the RNG state is restored too)."""
    raw = {
        **TINY,
        "student": {**TINY["student"], "args": {**GPT2, "n_embd": 16, "resid_pdrop": 0.2}},
    }
    path = write(tmp_path, raw)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["distill", path, f"train.output_dir={reference}"]) == 0
    assert main(["distill", path, "train.max_steps=3", f"train.output_dir={resumed}"]) == 0
    assert main(["distill", path, f"train.output_dir={resumed}", "--resume"]) == 0
    for stage in ("teacher", "student"):
        assert_same_file(
            resumed / stage / "model.safetensors", reference / stage / "model.safetensors"
        )
        ours, theirs = (records(run / stage / "metrics.jsonl") for run in (resumed, reference))
        # The shorter run also evaluated at its last step, 3; everything else is the same.
        assert [r for r in ours if r["kind"] == "train"] == [
            r for r in theirs if r["kind"] == "train"
        ]
        assert ours[-1] == theirs[-1] and ours[-1]["kind"] == "eval"
    steps = [
        r["step"] for r in records(resumed / "student" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


USER_DATA = '''
import torch

def make(size=24, seed=0):
    """Ragged examples of token ids with prompts (vocabulary 50)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(size):
        length = 6 + i % 5
        ids = torch.randint(1, 50, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "prompt_lengths": 2 + i % 3})
    return examples[: size * 3 // 4], examples[size * 3 // 4 :]
'''


def test_llm_config_user_data_is_padded_and_counts_completions(tmp_path, capsys):
    (tmp_path / "my_tokens.py").write_text(USER_DATA)
    raw = {
        **TINY,
        "data": {"name": "my_tokens:make", "batch_size": 4, "eval_batch_size": 4, "vocab_size": 50},
        "train": {**TINY["train"], "max_steps": 3, "output_dir": str(tmp_path / "run")},
    }
    path = write(tmp_path, raw)
    assert main(["distill", path]) == 0
    student = json.loads((tmp_path / "run" / "results.json").read_text())[1]
    namespace: dict = {}
    exec(compile(USER_DATA, "my_tokens.py", "exec"), namespace)  # the examples, read back
    _, evaluation = namespace["make"]()
    # Completion tokens only: the first completion token is predicted, padding never.
    expected = sum(len(e["input_ids"]) - e["prompt_lengths"] for e in evaluation)
    assert student["eval_count"] == expected
    assert main(["eval", path, "--checkpoint", str(tmp_path / "run" / "student")]) == 0
    assert last_json(capsys)["count"] == expected
