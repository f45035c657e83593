"""A full disk: ``dk distill`` and ``dk cache-teacher`` stop with one line naming the file they
could not write and what is kept; the last good checkpoint (or the shards written) stays
intact and the run continues from it once there is space, ending as an uninterrupted run.

Two ways to fill a disk: a real one, a small tmpfs mounted in a user and mount namespace
(``unshare -Urm``, where the kernel allows it), and a writer patched to fail as safetensors
does on a full disk (everywhere)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from faultkit import DK, ENV

from darkknowledge.cli import main
from darkknowledge.train import checkpoint as ckpt
from same_files import assert_same_file, assert_same_folder

# The uninterrupted reference runs in this process and is compared byte for byte with
# what the killed subprocesses (OMP_NUM_THREADS=1) wrote: the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

# A student whose checkpoint is about 230 KB (weights 77 KB, AdamW's moments twice that), a
# checkpoint every 10 steps, the newest 2 kept: the third checkpoint does not fit in 560 KB.
CONFIG = {
    "teacher": {"hidden": [32], "train_steps": 0},
    "student": {"hidden": [256]},
    "data": {"name": "digits", "batch_size": 32, "eval_batch_size": 512},
    "distill": {"temperature": 3.0, "alpha": 0.7},
    "train": {"max_steps": 60, "save_every": 10, "keep_last": 2, "log_every": 10,
              "progress": False},
}  # fmt: skip
LINE = re.compile(
    r"^dk distill: error: no space left on device while writing (?P<file>\S+); "
    r"the last good checkpoint is (?P<checkpoint>\S+)$"
)
SCRIPT = """
disk="$1"; out="$2"; size="$3"; shift 3
mount -t tmpfs -o size="$size" tmpfs "$disk" || exit 97
"$@"; code=$?
cp -a "$disk"/. "$out"/
exit $code
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def _namespaces_allowed(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    command = ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"]
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _in_tmpfs(
    tmp_path: Path, size: str, command: list[str]
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``command`` with ``tmp_path/disk`` a tmpfs of ``size``; what it left there is
    copied to ``tmp_path/remains`` (the tmpfs goes with the namespace)."""
    disk, remains = tmp_path / "disk", tmp_path / "remains"
    disk.mkdir()
    remains.mkdir()
    full = ["unshare", "-Urm", "sh", "-c", SCRIPT, "sh", str(disk), str(remains), size, *command]
    done = subprocess.run(full, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 97, done.stderr
    return done, remains


def _reference(tmp_path: Path, config: Path) -> Path:
    assert main(["distill", str(config), f"train.output_dir={tmp_path / 'reference'}"]) == 0
    return tmp_path / "reference" / "student" / "model.safetensors"


def _check_stopped_and_resumable(done, run: Path, config: Path, reference: Path) -> Path:
    """One line naming the file and the last good checkpoint, which verifies; nothing
    half-written is left; ``--resume`` on a disk with space ends as the uninterrupted run."""
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    found = LINE.match(lines[-1])
    assert found, lines[-1]
    assert not any("Traceback" in line for line in lines), done.stderr[-3000:]
    # Paths as the run saw them (under the tmpfs): the same names under the copy.
    checkpoint = run / "student" / ckpt.CHECKPOINTS / Path(found["checkpoint"]).name
    assert ckpt.latest_checkpoint(run / "student") == checkpoint
    for folder in ckpt.complete_checkpoints(run / "student"):
        ckpt.verify(folder)
    assert not list((run / "student" / ckpt.CHECKPOINTS).glob(".tmp-*"))  # space given back
    resumed = subprocess.run(
        [*DK, "distill", str(config), f"train.output_dir={run}", "--resume"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_file(run / "student" / "model.safetensors", reference)
    return Path(found["file"])


@pytest.mark.faults
def test_disk_full_on_a_real_tmpfs_keeps_the_last_good_checkpoint(tmp_path):
    if not _namespaces_allowed(tmp_path):
        pytest.skip("unshare -Urm (a user and mount namespace for a tmpfs) is not allowed here")
    config = _config(tmp_path)
    reference = _reference(tmp_path, config)
    command = [*DK, "distill", str(config), f"train.output_dir={tmp_path / 'disk' / 'run'}"]
    done, remains = _in_tmpfs(tmp_path, "560k", command)
    failed = _check_stopped_and_resumable(done, remains / "run", config, reference)
    assert failed.parent.name == ".tmp-step-00000030", failed  # inside the third checkpoint


PATCHED = """
import sys
from safetensors import SafetensorError
from safetensors.torch import save
from darkknowledge.cli import main
from darkknowledge.train import checkpoint

def full_disk(tensors, path):
    # The third checkpoint's student: half of the file reaches the disk, then safetensors'
    # own error for ENOSPC (the message its Rust writer gives).
    if ".tmp-step-00000030" in path and path.endswith("student.safetensors"):
        data = save(tensors)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return save_file(tensors, path)

save_file, checkpoint.save_file = checkpoint.save_file, full_disk
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.faults
def test_disk_full_in_the_safetensors_writer_keeps_the_last_good_checkpoint(tmp_path):
    config = _config(tmp_path)
    reference = _reference(tmp_path, config)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", PATCHED, "distill", str(config), f"train.output_dir={run}"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    failed = _check_stopped_and_resumable(done, run, config, reference)
    assert (
        failed == run / "student" / ckpt.CHECKPOINTS / ".tmp-step-00000030" / "student.safetensors"
    )
    assert LINE.match(done.stderr.strip().splitlines()[-1])["checkpoint"] == str(
        ckpt.checkpoint_dir(run / "student", 20)
    )


@pytest.mark.faults
def test_disk_full_during_a_cache_capture_keeps_the_shards_written(tmp_path):
    """``dk cache-teacher`` on a tmpfs too small for its shards: one line naming the shard,
    the shards before it complete; run again with space, the capture continues."""
    if not _namespaces_allowed(tmp_path):
        pytest.skip("unshare -Urm (a user and mount namespace for a tmpfs) is not allowed here")
    from test_faults_kill_cache import _config as cache_config

    config = cache_config(tmp_path)
    cache = tmp_path / "disk" / "cache"
    done, remains = _in_tmpfs(
        tmp_path, "400k", [*DK, "cache-teacher", str(config), f"teacher.cache={cache}"]
    )
    assert done.returncode == 1, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    found = re.match(
        r"^dk cache-teacher: error: no space left on device while writing (\S+/shard-\d+-of-00256"
        r"\.safetensors); the (\d+) shards written before it are complete and kept: free space "
        r"and run the same capture again to continue$",
        line,
    )
    assert found, line
    kept = sorted(p.name for p in (remains / "cache").glob("shard-*"))
    assert len(kept) == int(found[2]) > 0 and not list((remains / "cache").glob(".shard-*"))

    assert main(["cache-teacher", str(config), f"teacher.cache={tmp_path / 'reference'}"]) == 0
    moved = tmp_path / "cache"
    shutil.copytree(remains / "cache", moved)
    again = subprocess.run([*DK, "cache-teacher", str(config), f"teacher.cache={moved}"],
                           env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_folder(moved, tmp_path / "reference")
