"""Nothing from a file runs code: every public API that reads a path has a planted-pickle case
(run by test_bad_inputs.py, which asserts the pickle never ran), only the fields documented
as ``package.module:callable`` import code, and the source holds no unsafe loader."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
from catalogue import all_cases
from config_walk import code_fields, leaf_fields, raw_with

from darkknowledge.config import check_config, check_environment

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "darkknowledge"
PUBLIC = ("darkknowledge", "darkknowledge.cache", "darkknowledge.llm", "darkknowledge.mtp",
          "darkknowledge.speculative", "darkknowledge.train", "darkknowledge.config",
          "darkknowledge.rl", "darkknowledge.hf", "darkknowledge.models")  # fmt: skip
PATH_PARAMETERS = {"path", "folder", "checkpoint", "cache", "cache_dir", "resume_from_checkpoint"}
# Each public reader of a path, and the trust case (its "met by") that plants a pickle there.
READERS = {
    "load_config": "load_config",
    "read_yaml": "load_config",
    "TeacherCache": "TeacherCache",
    "CachedTeacher": "TeacherCache",  # opens its path with TeacherCache
    "CachedTargets": "TeacherCache",
    "cached_loader": "TeacherCache",
    "write_teacher_cache": "write_teacher_cache (resuming)",
    "load_heads": "mtp.load_heads",
    "load_weights": "dk distill",  # a classifier's teacher.checkpoint / student.checkpoint
    "DistillationTrainer.train": "DistillationTrainer.train(resume_from_checkpoint=)",
}
# Public functions whose path argument is only written to, or is not read as a file: the
# config dataclasses hold paths that the commands read (their cases are dk distill's), and a
# stop exception names the checkpoint it saved.
NOT_READERS = {"save_heads", "Distiller.export_student", "resolve_config", "Config",
               "ModelConfig", "TeacherConfig", "Interrupted", "Terminated"}  # fmt: skip


def public_path_functions() -> set[str]:
    found = set()
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            obj = getattr(module, name, None)
            if not getattr(obj, "__module__", "").startswith("darkknowledge"):
                continue  # imported from a library
            members = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                members = [(name, obj.__init__)] + [
                    (f"{name}.{attr}", f) for attr, f in vars(obj).items()
                    if inspect.isfunction(f) and not attr.startswith("_")
                ]  # fmt: skip
            for qualified, function in members:
                try:
                    parameters = inspect.signature(function).parameters
                except (TypeError, ValueError):
                    continue
                if PATH_PARAMETERS & set(parameters):
                    found.add(qualified)
    return found


def test_trust_every_public_path_reader_has_a_planted_pickle_case():
    planted = {case.via for case in all_cases() if case.trust}
    unknown = public_path_functions() - set(READERS) - NOT_READERS
    assert not unknown, f"public functions taking a path with no planted-pickle case: {unknown}"
    missing = {name: via for name, via in READERS.items() if via not in planted}
    assert not missing, f"no planted-pickle case for {missing}"
    for command in ("dk eval --checkpoint", "dk distill --resume", "dk validate",
                    "Distiller.fit(resume=True)", "Distiller.fit(resume=True) under FSDP",
                    "dk demo llm --cache-dir"):  # fmt: skip
        assert command in planted


def test_trust_only_documented_fields_import_code(tmp_path, monkeypatch):
    """Every field set to a reference to a module that, imported, writes a marker: only the
    documented code fields import it (``dk validate``'s import of user code included)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = []
    for field in leaf_fields():
        module = f"reliability_probe_{uuid.uuid4().hex[:8]}"
        marker = tmp_path / module
        (tmp_path / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n\ndef make(*args, **kwargs):\n    return None\n"
        )
        config, _ = check_config(raw_with(field, f"{module}:make"))
        if config is not None:
            for command in ("distill", "train", "eval"):
                check_environment(config, command=command)
        sys.modules.pop(module, None)
        if marker.exists():
            imported.append(field)
    assert imported, "the probe imports nothing: it would not see a field that imports code"
    assert set(imported) <= set(code_fields()), set(imported) - set(code_fields())


def test_trust_cli_doc_lists_every_code_field():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    paragraph = text.split("**User code.**", 1)[1].split("\n- ", 1)[0]
    assert "That is the only code a config can name" in paragraph
    for field in code_fields():
        assert f"`{field.replace('.0.', '.N.')}`" in paragraph, field


def test_trust_source_has_no_unsafe_loader():
    """torch.load only with weights_only=True, pickle only in the module that vets FSDP's
    metadata (and hf.py, which catches a refusal), no yaml.load( and no eval(/exec( of text."""
    unpicklers = {"train/dcp_metadata.py", "hf.py"}  # vets DCP's .metadata; names a refusal
    for path in sorted(SRC.rglob("*.py")):
        name = path.relative_to(SRC).as_posix()
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\((.*?)\)", text, re.DOTALL):
            assert "weights_only=True" in call, f"{name}: torch.load({call})"
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text, name
        assert not re.search(r"(?<![.\w`])(eval|exec)\(", text), name
        assert not re.search(r"allow_pickle\s*=\s*True", text), name
        if re.search(r"import pickle|pickle\.loads?\(|Unpickler|import dill|import joblib", text):
            assert name in unpicklers, f"{name} unpickles"
        # Code is imported from a model's or data set's name, or the on-policy sampler only.
        for argument in re.findall(r"(?<!def )import_callable\(\s*([\w.]+)", text):
            assert argument in ("name", "spec.name", "spec.sampler"), f"{name}: {argument}"


def test_trust_dcp_metadata_check_passes_a_real_checkpoint(tmp_path):
    """The restricted unpickler accepts what torch.distributed.checkpoint writes, model and
    optimizer state, and load_sharded then restores the values."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from darkknowledge.train import fsdp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process
        state = {"model": get_model_state_dict(model),
                 "optimizer": get_optimizer_state_dict(model, optimizer)}  # fmt: skip
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
        fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        fresh_optimizer = torch.optim.AdamW(fresh.parameters())
        fresh(torch.randn(2, 3)).sum().backward()
        fresh_optimizer.step()
        fsdp.load_sharded(fresh, fresh_optimizer, tmp_path, with_optimizer=True)
    for expected, actual in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(expected, actual)
    step = next(iter(fresh_optimizer.state.values()))["exp_avg"]
    assert torch.equal(step, next(iter(optimizer.state.values()))["exp_avg"])


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_trust_dcp_metadata_refuses_other_globals(tmp_path, payload):
    import pickle

    from darkknowledge.train.checkpoint import CheckpointError
    from darkknowledge.train.dcp_metadata import check_metadata

    module, name = payload.split(".")
    # GLOBAL module name, then a call with one argument: what a malicious pickle does.
    (tmp_path / ".metadata").write_bytes(
        f"c{module}\n{name}\n(S'touch {tmp_path}/PWNED'\ntR.".encode()
    )
    with pytest.raises(CheckpointError, match=rf"it names {module}\.{name}"):
        check_metadata(tmp_path)
    assert not (tmp_path / "PWNED").exists()
    assert pickle  # the payload is a valid pickle: pickle.loads would run it
