"""Damaged, foreign and malicious files wherever a path is accepted: teacher caches, weights
named in configs, ``dk eval --checkpoint``, MTP heads, Hugging Face folders, the demo's cached
teacher. Checkpoints that ``--resume`` reads are in :mod:`cases_resume`.

Cases marked ``trust`` plant a pickle whose unpickling would create ``$TMP/PWNED``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from cases_models import gpt2
from cases_resume import RESUME_CASES
from catalogue import Case, dk, plant_pickle, write

import darkknowledge as dk_lib

CLASSIFIER = "student: {hidden: [8]}\nteacher: {hidden: [16], train_steps: 1}\n"
TINY_TEXT = "data: {name: stdlib_bytes, train_bytes: 2048, heldout_bytes: 512, block_size: 16}\n"
GPT2_ARGS = "{model_type: gpt2, n_layer: 1, n_embd: 8, n_head: 2, n_positions: 16}"
HF_FOLDER_CONFIG = (
    f"task: causal_lm\n{TINY_TEXT}teacher: {{name: hf_causal_lm, checkpoint: teacher}}\n"
    f"student: {{name: hf_causal_lm, args: {GPT2_ARGS}}}\n"
)


# ---- teacher caches ------------------------------------------------------------------------


def tiny_cache(folder: Path) -> Path:
    """A 2-shard top-4 cache of a tiny GPT-2 over four sequences, in ``folder/cache``."""
    dataset = [{"input_ids": torch.arange(5) * (i + 1) % 40, "id": i} for i in range(4)]
    path = folder / "cache"
    dk_lib.cache.write_teacher_cache(
        gpt2(40).eval(), dataset, path, k=4, shard_size=2, progress=False
    )
    return path


def damaged_cache(damage, *, read: bool = True, **options):
    """Open (and read the first entry of) a tiny cache after ``damage(cache_folder)``."""

    def run(folder):
        path = tiny_cache(folder)
        damage(path)
        cache = dk_lib.cache.TeacherCache(path, **options)
        return cache[0] if read else cache

    return run


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _set_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(**fields):
    def damage(path):
        _set_manifest(path, {**_manifest(path), **fields})

    return damage


def _first_shard(path: Path) -> Path:
    return path / _manifest(path)["shards"][0]["file"]


def _truncate(path: Path) -> None:
    shard = _first_shard(path)
    shard.write_bytes(shard.read_bytes()[:-10])


def _flip_a_byte(path: Path) -> None:
    shard = _first_shard(path)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))


def _pickle_shard(torch_save: bool):
    """A pickle in the first shard's place, the manifest updated to its size and SHA-256 (as
    whoever planted it would)."""

    def damage(path):
        shard = plant_pickle(_first_shard(path), torch_save=torch_save)
        manifest = _manifest(path)
        manifest["shards"][0].update(
            bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest()
        )
        _set_manifest(path, manifest)

    return damage


def _delete_shard(path: Path) -> None:
    _first_shard(path).unlink()


def resumed_capture_with_pickle(folder: Path):
    """An unfinished capture (its plan, no manifest) whose finished shard was replaced by a
    pickle: capturing again resumes it and reads that shard's header."""
    from darkknowledge.cache import manifest as manifest_file

    path = tiny_cache(folder)
    shard, plan = _first_shard(path), manifest_file.settings_of(_manifest(path))
    (path / manifest_file.PLAN).write_text(json.dumps(plan))
    (path / "manifest.json").unlink()
    plant_pickle(shard)
    return tiny_cache(folder)


# ---- weights -------------------------------------------------------------------------------


def classifier_weights(folder: Path, hidden: int = 8) -> Path:
    """``student.safetensors``: the weights of the config's student (mlp [8] on digits)."""
    from safetensors.torch import save_file

    from darkknowledge.models import build_model

    model = build_model("mlp", in_features=64, num_classes=10, hidden=(hidden,))
    path = folder / "student.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def evaluate(checkpoint: str, prepare=None):
    def run(folder):
        if prepare is not None:
            prepare(folder)
        return dk("eval", write("config.yaml", CLASSIFIER), "--checkpoint", checkpoint)

    return run


def distill_with(config: str, prepare, command: str = "distill"):
    def run(folder):
        prepare(folder)
        return dk(command, write("config.yaml", config))

    return run


def validate_with(config: str, prepare):
    return distill_with(config, prepare, command="validate")


def hf_folder_with_bin(folder: Path) -> None:
    """A save_pretrained folder whose weights are a malicious ``pytorch_model.bin``."""
    import transformers

    config = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    config.save_pretrained(folder / "teacher")
    plant_pickle(folder / "teacher" / "pytorch_model.bin", torch_save=True)


def demo_teacher_cache(folder: Path):
    """``dk demo llm``'s cached teacher, its safetensors swapped for a ``pytorch_model.bin``."""
    from darkknowledge.llm import demo

    def fit(*_):  # the cache entry, without the training
        return {"train_seconds": 0.0, "train_tokens_per_s": 0.0, "curve": []}

    _, info = demo.cached_teacher(demo.QUICK, "corpus", folder / "cache", fit, lambda message: None)
    entry = Path(info["cache_path"])
    (entry / "model.safetensors").unlink()
    plant_pickle(entry / "pytorch_model.bin", torch_save=True)
    return demo.cached_teacher(demo.QUICK, "corpus", folder / "cache", fit, lambda message: None)


# ---- MTP heads -----------------------------------------------------------------------------


def heads_file(folder: Path) -> Path:
    from darkknowledge.mtp import ParallelMTPHeads, save_heads

    path = folder / "heads.safetensors"
    save_heads(ParallelMTPHeads(hidden_size=8, num_depths=2), str(path))
    return path


def heads_with_other_tensors(folder: Path):
    """A heads file whose spec says 2 depths, holding the tensors of 1."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from darkknowledge.mtp import ParallelMTPHeads, load_heads

    path = heads_file(folder)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    one = ParallelMTPHeads(hidden_size=8, num_depths=1).state_dict()
    save_file({k: v.contiguous() for k, v in one.items()}, str(path), metadata=metadata)
    return load_heads(str(path))


def load_heads(path: str, prepare=None):
    def run(folder):
        if prepare is not None:
            prepare(folder)
        return dk_lib.mtp.load_heads(path)

    return run


FILE_CASES: list[Case] = [
    Case("files", "a cache folder that does not exist", "TeacherCache", lambda f: dk_lib.cache.TeacherCache("nope"), "nope"),
    Case("files", "a manifest that is not JSON", "TeacherCache", damaged_cache(lambda p: write(p / "manifest.json", "{")), "manifest.json"),
    Case("files", "a pickle as the manifest", "TeacherCache",
         damaged_cache(lambda p: plant_pickle(p / "manifest.json")), "manifest.json", trust=True),
    Case("files", "a manifest of another format", "TeacherCache", damaged_cache(_edit_manifest(format="other")), "manifest.json"),
    Case("files", "a manifest of version 99", "TeacherCache", damaged_cache(_edit_manifest(version=99)), "version"),
    Case("files", "a manifest field out of range (width -1)", "TeacherCache", damaged_cache(_edit_manifest(width=-1)), "width"),
    Case("files", "a missing shard", "TeacherCache", damaged_cache(_delete_shard), "shard"),
    Case("files", "a truncated shard", "TeacherCache", damaged_cache(_truncate), "truncated"),
    Case("files", "a shard with one byte changed", "TeacherCache", damaged_cache(_flip_a_byte), "SHA-256"),
    Case("files", "a pickle in a shard's place (manifest updated to match)", "TeacherCache",
         damaged_cache(_pickle_shard(False)), "pickle", trust=True),
    Case("files", "a torch.save archive in a shard's place (manifest updated, verify=False)", "TeacherCache",
         damaged_cache(_pickle_shard(True), verify=False), "pickle", trust=True),
    Case("files", "a pickle in place of a finished shard of an unfinished capture", "write_teacher_cache (resuming)",
         resumed_capture_with_pickle, "pickle", trust=True),
    Case("files", "a checkpoint that does not exist", "dk eval --checkpoint", evaluate("nope.safetensors"), "nope.safetensors"),
    Case("files", "a folder without weights", "dk eval --checkpoint", evaluate(".", lambda f: None), "model.safetensors"),
    Case("files", "a pickle named .safetensors", "dk eval --checkpoint",
         evaluate("evil.safetensors", lambda f: plant_pickle("evil.safetensors")), "evil.safetensors", trust=True),
    Case("files", "an export folder whose model.safetensors is a torch.save archive", "dk eval --checkpoint",
         evaluate("export", lambda f: plant_pickle("export/model.safetensors", torch_save=True)), "model.safetensors", trust=True),
    Case("files", "a folder holding only pytorch_model.bin", "dk eval --checkpoint",
         evaluate("export", lambda f: plant_pickle("export/pytorch_model.bin", torch_save=True)), "pytorch_model.bin", trust=True),
    Case("files", "a truncated safetensors file", "dk eval --checkpoint",
         evaluate("cut.safetensors", lambda f: write("cut.safetensors", classifier_weights(f).read_bytes()[:300])), "cut.safetensors"),
    Case("files", "weights of another model (hidden 16, config 8)", "dk eval --checkpoint",
         evaluate("student.safetensors", lambda f: classifier_weights(f, hidden=16)), "does not fit"),
    Case("files", "`teacher.checkpoint` that is a pickle", "dk distill",
         distill_with("student: {hidden: [8]}\nteacher: {hidden: [16], checkpoint: t.safetensors}\n",
                      lambda f: plant_pickle("t.safetensors")), "teacher.checkpoint", trust=True),
    Case("files", "`student.checkpoint` that is a torch.save archive", "dk distill",
         distill_with("student: {hidden: [8], checkpoint: s.pt}\nteacher: {hidden: [16], train_steps: 1}\n",
                      lambda f: plant_pickle("s.pt", torch_save=True)), "student.checkpoint", trust=True),
    Case("files", "`teacher.checkpoint` that is a folder", "dk distill",
         distill_with("student: {hidden: [8]}\nteacher: {hidden: [16], checkpoint: .}\n", lambda f: None),
         "teacher.checkpoint"),
    Case("files", "causal LM `teacher.checkpoint`: a save_pretrained folder with pytorch_model.bin", "dk distill",
         distill_with(HF_FOLDER_CONFIG, hf_folder_with_bin),
         "teacher.checkpoint", trust=True),
    Case("files", "causal LM `teacher.checkpoint`: a save_pretrained folder with pytorch_model.bin", "dk validate",
         validate_with(HF_FOLDER_CONFIG, hf_folder_with_bin), "teacher.checkpoint", trust=True),
    Case("files", "causal LM `teacher.checkpoint`: a pickle named .safetensors", "dk distill",
         distill_with(f"task: causal_lm\n{TINY_TEXT}teacher: {{name: hf_causal_lm, args: {GPT2_ARGS}, checkpoint: t.safetensors}}\n"
                      f"student: {{name: hf_causal_lm, args: {GPT2_ARGS}}}\n", lambda f: plant_pickle("t.safetensors")),
         "teacher.checkpoint", trust=True),
    Case("files", "the cached teacher of `dk demo llm` holding pytorch_model.bin", "dk demo llm --cache-dir",
         demo_teacher_cache, "pytorch_model.bin", trust=True),
    Case("files", "a heads file that does not exist", "mtp.load_heads", load_heads("nope.safetensors"), "nope.safetensors"),
    Case("files", "a folder", "mtp.load_heads", load_heads("."), "folder"),
    Case("files", "a pickle named .safetensors", "mtp.load_heads",
         load_heads("evil.safetensors", lambda f: plant_pickle("evil.safetensors")), "evil.safetensors", trust=True),
    Case("files", "weights of a model, not heads", "mtp.load_heads",
         load_heads("student.safetensors", classifier_weights), "student.safetensors"),
    Case("files", "a heads file whose tensors do not match its spec", "mtp.load_heads", heads_with_other_tensors, "heads.safetensors"),
    *RESUME_CASES,
]  # fmt: skip
