"""A Distiller's training state to and from a checkpoint (the folder format is
:mod:`darkknowledge.train.checkpoint`'s): student, learnable temperature, optimizer, grad
scaler, RNGs, step, data position, the run's config and its last log records. Under FSDP the
student and optimizer are shards, read and written by every process (:mod:`.fsdp`).

Resume takes the newest checkpoint that verifies; a missing or corrupted file gives a warning
naming it and the previous checkpoint is used instead. A checkpoint of another run (another
config, another number of processes, more steps than ``max_steps``) is refused.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import _files
from . import checkpoint as ckpt
from . import fsdp
from .data import DataStream
from .fingerprint import check_resumable, config_hash
from .logging import METRICS_FILE
from .setup import student_config_dict


def save_training_state(distiller: Any) -> Path:
    """Write ``<output_dir>/checkpoints/step-<step>/``; every process must call it. Under FSDP
    the student and optimizer go to ``sharded/`` (see :mod:`.fsdp`), one shard per process.
    On a full disk the unfinished folder is deleted (its space given back) and
    :class:`darkknowledge._files.DiskFull` names the file; the older checkpoints are intact."""
    final = ckpt.checkpoint_dir(distiller.output_dir, distiller.step)
    temporary = final.with_name(f".tmp-{final.name}")
    try:
        return _save(distiller, final, temporary)
    except _files.DiskFull:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _save(distiller: Any, final: Path, temporary: Path) -> Path:
    acc, output_dir = distiller.accelerator, distiller.output_dir
    sharded = fsdp.is_sharded(acc)
    if not sharded:
        student_state = acc.get_state_dict(distiller.student)  # a collective: all processes
    if acc.is_main_process:
        ckpt.start(final)
        if not sharded:
            ckpt.write_safetensors(
                temporary / "student.safetensors", ckpt.plain_state_dict(student_state)
            )
            tensors: dict[str, torch.Tensor] = {}
            tree = ckpt.encode_tree(distiller.optimizer.state_dict(), tensors)
            ckpt.write_json(temporary / "optimizer.json", tree)
            ckpt.write_safetensors(temporary / "optimizer.safetensors", tensors)
        if distiller.temperature_module is not None:
            state = acc.unwrap_model(distiller.temperature_module).state_dict()
            ckpt.write_safetensors(
                temporary / "temperature.safetensors", ckpt.plain_state_dict(state)
            )
        if distiller.config is not None:
            ckpt.write_json(temporary / "config.json", distiller.config)
    acc.wait_for_everyone()  # the folder exists before the other processes write into it
    layout = None
    if sharded:
        saved_optimizer = fsdp.save_sharded(
            distiller.student, distiller.optimizer, temporary / fsdp.SHARDED
        )
        layout = {"optimizer": saved_optimizer}
    if acc.is_main_process:
        ckpt.write_json(temporary / "state.json", _state(distiller, layout))
    rng_json, rng_tensors = ckpt.rng_state()
    rank = acc.process_index
    ckpt.write_json(temporary / f"rng-rank{rank}.json", rng_json)
    ckpt.write_safetensors(temporary / f"rng-rank{rank}.safetensors", rng_tensors)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.finish(temporary, final)
        ckpt.prune(output_dir, distiller.keep_last)
    acc.wait_for_everyone()
    return final


def _state(distiller: Any, sharded: dict | None) -> dict[str, Any]:
    acc, stream = distiller.accelerator, distiller.stream
    return {
        "step": distiller.step,
        "epoch": stream.epoch,
        "batch_index": stream.index,  # the next micro-batch to read
        "world_size": acc.num_processes,
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "config_hash": None if distiller.config is None else config_hash(distiller.config),
        "records": _last_records(distiller),
        "sharded": sharded,  # FSDP: {"optimizer": saved or not}; None: whole-state files
        "nonfinite_steps": distiller._nonfinite.skipped,  # on_nonfinite="skip": steps skipped
    }


def load_training_state(distiller: Any) -> Path | None:
    """Restore the newest usable checkpoint of ``distiller.output_dir``; None when there is
    none (the run starts afresh)."""
    candidates = ckpt.complete_checkpoints(distiller.output_dir)
    rank = distiller.accelerator.process_index
    for number, path in enumerate(candidates):
        try:
            loaded = _read(path, rank)
        except ckpt.CheckpointError as error:
            if number + 1 == len(candidates):
                raise ckpt.CheckpointError(
                    f"{error}; no earlier complete checkpoint to fall back to in "
                    f"{path.parent}; start afresh in another output_dir"
                ) from None
            warnings.warn(
                f"{error}; resuming from the previous checkpoint {candidates[number + 1].name}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        _check_same_run(distiller, path, loaded)
        _apply(distiller, loaded)
        return path
    return None


def _read(path: Path, rank: int) -> dict[str, Any]:
    """Every file of the checkpoint, verified and parsed, before anything is changed."""
    ckpt.verify(path)
    loaded = {
        "state": ckpt.read_json(path / "state.json"),
        "rng": (
            ckpt.read_json(path / f"rng-rank{rank}.json"),
            ckpt.read_safetensors(path / f"rng-rank{rank}.safetensors"),
        ),
    }
    if loaded["state"].get("sharded") is None:  # FSDP's shards are read in _apply (collective)
        loaded["student"] = ckpt.read_safetensors(path / "student.safetensors")
        loaded["optimizer"] = ckpt.decode_tree(
            ckpt.read_json(path / "optimizer.json"),
            ckpt.read_safetensors(path / "optimizer.safetensors"),
        )
    else:
        loaded["shards"] = path / fsdp.SHARDED
    if (path / "temperature.safetensors").exists():
        loaded["temperature"] = ckpt.read_safetensors(path / "temperature.safetensors")
    if (path / "config.json").exists():
        loaded["config"] = ckpt.read_json(path / "config.json")
    return loaded


def _check_same_run(distiller: Any, path: Path, loaded: dict[str, Any]) -> None:
    state, acc = loaded["state"], distiller.accelerator
    was_sharded = state.get("sharded") is not None
    if was_sharded != fsdp.is_sharded(acc):
        raise ValueError(
            f"checkpoint {path} was written {'with' if was_sharded else 'without'} FSDP (a "
            f"sharded student and optimizer) and this run is {'without' if was_sharded else 'with'} "
            "it; resume under the same launch set-up"
        )
    if state["world_size"] != acc.num_processes:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} processes, this run has "
            f"{acc.num_processes}; resume with the same number of processes"
        )
    if state["step"] > distiller.max_steps:
        raise ValueError(
            f"checkpoint {path} is at step {state['step']}, past max_steps={distiller.max_steps}; "
            "max_steps may only grow on resume"
        )
    saved_hash, config = state.get("config_hash"), distiller.config
    if saved_hash is not None and config is not None and saved_hash != config_hash(config):
        check_resumable(loaded.get("config", {}), config, f"from {path}")
    if (distiller.temperature_module is None) != ("temperature" not in loaded):
        raise ValueError(
            f"checkpoint {path} {'has' if 'temperature' in loaded else 'has no'} learnable "
            "temperature and this Distiller "
            f"{'has none' if distiller.temperature_module is None else 'has one'}; resume with "
            "the same temperature"
        )


def _apply(distiller: Any, loaded: dict[str, Any]) -> None:
    acc, state = distiller.accelerator, loaded["state"]
    if "shards" in loaded:
        fsdp.load_sharded(
            distiller.student, distiller.optimizer, loaded["shards"],
            with_optimizer=state["sharded"]["optimizer"],
        )  # fmt: skip
    else:
        acc.unwrap_model(distiller.student).load_state_dict(loaded["student"])
        distiller.optimizer.load_state_dict(loaded["optimizer"])
    if distiller.temperature_module is not None:
        acc.unwrap_model(distiller.temperature_module).load_state_dict(loaded["temperature"])
    if state["scaler"] is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(*loaded["rng"])
    distiller.step = state["step"]
    distiller._nonfinite.skipped = state.get("nonfinite_steps", 0)
    distiller.stream = DataStream(
        distiller.train_data, acc, epoch=state["epoch"], index=state["batch_index"]
    )
    _restore_records(distiller, state.get("records"))


def _last_records(distiller: Any) -> dict[str, Any]:
    """The newest train record and evaluation, as a checkpoint stores them."""
    evaluation = None
    if distiller._eval_step is not None:
        evaluation = {"step": distiller._eval_step, "metrics": distiller._eval_metrics}
    return {"train": distiller._last_train or None, "eval": evaluation}


def _restore_records(distiller: Any, records: dict[str, Any] | None) -> None:
    """Take back :func:`_last_records` from a checkpoint (so a resumed run that has no step
    left reports what the uninterrupted one did)."""
    records = records or {}
    distiller._last_train = dict(records.get("train") or {})
    evaluation = records.get("eval")
    if evaluation is not None:
        distiller._eval_step, distiller._eval_metrics = (
            evaluation["step"],
            dict(evaluation["metrics"]),
        )


def export_weights(
    accelerator: Any, student: torch.nn.Module, path: str | os.PathLike, config: dict | None
) -> Path:
    """``<path>/model.safetensors`` (atomic, fsynced) and ``<path>/config.json`` when the
    student has a config (``config``, or a Hugging Face ``model.config``). Every process must
    call it; the main one writes."""
    path = Path(path)
    state = accelerator.get_state_dict(student)  # a collective: all processes
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        config = student_config_dict(accelerator.unwrap_model(student), config)
        if config is not None:
            _files.write_json(path / "config.json", config, indent=1)
        with _files.atomic_path(path / "model.safetensors") as temporary:
            ckpt.write_safetensors(temporary, ckpt.plain_state_dict(state))
    accelerator.wait_for_everyone()
    return path


def check_fresh_output(output_dir: Path | None) -> None:
    """Refuse to start a new run where a previous one left its log or checkpoints."""
    if output_dir is None:
        return
    leftovers = [
        name
        for name in (METRICS_FILE, ckpt.CHECKPOINTS)
        if (output_dir / name).exists() and _not_empty(output_dir / name)
    ]
    if leftovers:
        raise ValueError(
            f"output_dir {output_dir} holds a previous run ({', '.join(leftovers)}); continue it "
            "with fit(resume=True), or use another output_dir"
        )


def _not_empty(path: Path) -> bool:
    return any(path.iterdir()) if path.is_dir() else os.path.getsize(path) > 0
