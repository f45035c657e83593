"""Damaged and malicious checkpoints met by ``--resume``: ``Distiller.fit(resume=True)`` (what
``dk distill --resume`` runs), a finished stage reloaded by ``dk distill --resume``, FSDP's
sharded checkpoints and ``DistillationTrainer.train(resume_from_checkpoint=...)``.

A planted file comes with a rewritten checkpoint manifest (sizes and CRC-32 are integrity
checks against crashes, not a defence: whoever can write the folder can rewrite them), so the
file itself is what is refused.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from catalogue import Case, dk, plant_pickle, write
from torch.utils.data import DataLoader, TensorDataset

import darkknowledge as dk_lib
from darkknowledge.models import build_model

_PRISTINE: dict[str, Path] = {}  # built once per process, copied into each case's folder
STEP = "run/checkpoints/step-00000001"


def _distiller(output_dir: Path, max_steps: int) -> dk_lib.Distiller:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=generator), torch.arange(16) % 3)
    student = build_model("mlp", in_features=4, num_classes=3, hidden=(5,))
    teacher = build_model("mlp", in_features=4, num_classes=3, hidden=(6,))
    return dk_lib.Distiller(
        student, teacher, DataLoader(data, batch_size=8), max_steps=max_steps, save_every=1,
        output_dir=output_dir, progress=False, temperature=2.0, alpha=0.5,
    )  # fmt: skip


def _pristine(name: str, build) -> Path:
    if name not in _PRISTINE:
        root = Path(tempfile.mkdtemp(prefix=f"dk-reliability-{name}-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        build(root)
        _PRISTINE[name] = root
    return _PRISTINE[name]


def _one_checkpoint_run(root: Path) -> None:
    _distiller(root / "run", max_steps=1).fit()


def rewrite_manifest(step_dir: Path) -> None:
    """The checkpoint manifest, recomputed for the files now in ``step_dir``."""
    manifest = {
        path.relative_to(step_dir).as_posix(): {
            "bytes": path.stat().st_size,
            "crc32": zlib.crc32(path.read_bytes()),
        }
        for path in sorted(step_dir.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def resume_after(damage, *, manifest: bool = True):
    """Copy a one-checkpoint run here, ``damage`` its checkpoint (then rewrite its manifest),
    and resume it for one more step."""

    def run(folder):
        shutil.copytree(_pristine("run", _one_checkpoint_run) / "run", folder / "run")
        damage(folder / STEP)
        if manifest:
            rewrite_manifest(folder / STEP)
        return _distiller(folder / "run", max_steps=2).fit(resume=True)

    return run


def _truncate(name: str):
    def damage(step_dir: Path) -> None:
        path = step_dir / name
        path.write_bytes(path.read_bytes()[:-20])

    return damage


def _plant(name: str, torch_save: bool = False):
    return lambda step_dir: plant_pickle(step_dir / name, torch_save=torch_save)


# ---- dk distill --resume: a finished stage ---------------------------------------------------

CONFIG = (
    "student: {hidden: [8]}\nteacher: {hidden: [16], train_steps: 1}\n"
    "train: {max_steps: 1, output_dir: run, progress: false}\n"
)


def _finished_stage_run(root: Path) -> None:
    import os

    previous = os.getcwd()
    os.chdir(root)
    try:
        assert dk("distill", write("config.yaml", CONFIG)).code == 0
    finally:
        os.chdir(previous)


def finished_stage_replaced(folder: Path):
    shutil.copytree(_pristine("stages", _finished_stage_run) / "run", folder / "run")
    plant_pickle(folder / "run" / "student" / "model.safetensors", torch_save=True)
    return dk("distill", write("config.yaml", CONFIG), "--resume")


# ---- FSDP: torch.distributed.checkpoint's pickled .metadata ---------------------------------


def _sharded(root: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():  # no process group: DCP says it runs in one process
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": model.state_dict()},
            storage_writer=dcp.FileSystemWriter(str(root / "sharded")),
        )


def fsdp_metadata(damage):
    def run(folder):
        from darkknowledge.train import fsdp

        shutil.copytree(_pristine("sharded", _sharded) / "sharded", folder / "sharded")
        damage(folder / "sharded" / ".metadata")
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return fsdp.load_sharded(model, optimizer, folder / "sharded", with_optimizer=False)

    return run


# ---- DistillationTrainer: the Trainer's own checkpoint folder --------------------------------


def _trainer(output_dir: Path, max_steps: int):
    import transformers
    from cases_models import batch, gpt2

    from darkknowledge.hf import DistillationTrainer

    args = transformers.TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, report_to=[], max_steps=max_steps,
        save_steps=1, disable_tqdm=True, per_device_train_batch_size=2,
    )  # fmt: skip
    examples = [{"input_ids": row} for row in batch()["input_ids"]]
    return DistillationTrainer(
        model=gpt2(250), teacher_model=gpt2(250, seed=1), args=args, train_dataset=examples
    )


def _trainer_checkpoint(root: Path) -> None:
    _trainer(root / "out", max_steps=1).train()


def trainer_resume(name: str):
    def run(folder):
        shutil.copytree(_pristine("trainer", _trainer_checkpoint) / "out", folder / "out")
        checkpoint = folder / "out" / "checkpoint-1"
        plant_pickle(checkpoint / name)
        return _trainer(folder / "out", max_steps=2).train(resume_from_checkpoint=str(checkpoint))

    return run


RESUME_CASES: list[Case] = [
    Case("files", "a truncated student.safetensors (manifest not updated)", "Distiller.fit(resume=True)",
         resume_after(_truncate("student.safetensors"), manifest=False), "student.safetensors"),
    Case("files", "student.safetensors replaced by a pickle", "Distiller.fit(resume=True)",
         resume_after(_plant("student.safetensors")), "student.safetensors", trust=True),
    Case("files", "optimizer.safetensors replaced by a torch.save archive", "Distiller.fit(resume=True)",
         resume_after(_plant("optimizer.safetensors", torch_save=True)), "optimizer.safetensors", trust=True),
    Case("files", "rng-rank0.safetensors replaced by a pickle", "Distiller.fit(resume=True)",
         resume_after(_plant("rng-rank0.safetensors")), "rng-rank0.safetensors", trust=True),
    Case("files", "state.json replaced by a pickle", "Distiller.fit(resume=True)",
         resume_after(_plant("state.json")), "state.json", trust=True),
    Case("files", "the checkpoint's manifest.json replaced by a pickle", "Distiller.fit(resume=True)",
         resume_after(_plant("manifest.json"), manifest=False), "manifest.json", trust=True),
    Case("files", "a finished stage's model.safetensors replaced by a torch.save archive", "dk distill --resume",
         finished_stage_replaced, "model.safetensors", trust=True),
    Case("files", "FSDP: the sharded checkpoint's .metadata replaced by a pickle", "Distiller.fit(resume=True) under FSDP",
         fsdp_metadata(lambda path: plant_pickle(path)), ".metadata", trust=True),
    Case("files", "FSDP: a truncated .metadata", "Distiller.fit(resume=True) under FSDP",
         fsdp_metadata(lambda path: path.write_bytes(path.read_bytes()[:50])), ".metadata"),
    Case("files", "optimizer.pt replaced by a pickle", "DistillationTrainer.train(resume_from_checkpoint=)",
         trainer_resume("optimizer.pt"), "weights_only=True", trust=True),
    Case("files", "rng_state.pth replaced by a pickle", "DistillationTrainer.train(resume_from_checkpoint=)",
         trainer_resume("rng_state.pth"), "weights_only=True", trust=True),
]  # fmt: skip
