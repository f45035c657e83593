"""Bytes per token of the teacher cache on the `dk demo llm` corpus and teacher (docs/cache.md).

Usage: ``python tests/cache/storage_benchmark.py [--sequences N] [--cache-dir DIR]``.
The teacher is the one ``dk demo llm`` trained and cached (run that first); the dataset is the
first N windows of 64 bytes of the demo's training text, keyed by content hash. Prints a
markdown table: payload and on-disk bytes per token, and capture speed, for top-k 8, 32, 128
and sampled 12, 50.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import darkknowledge as dk
from darkknowledge.llm import demo
from darkknowledge.llm.data import stdlib_corpus

CONFIGURATIONS = (("topk", 8), ("topk", 32), ("topk", 128), ("sampled", 12), ("sampled", 50))


def _not_cached(*args, **kwargs):
    raise SystemExit("no cached demo teacher: run `dk demo llm` first (same --cache-dir)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=4096)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("DK_CACHE_DIR", str(Path.home() / ".cache" / "darkknowledge")),
    )
    args = parser.parse_args()
    recipe = demo.Recipe()
    corpus = stdlib_corpus(train_bytes=recipe.train_bytes, heldout_bytes=recipe.heldout_bytes)
    teacher, _ = demo.cached_teacher(
        recipe, corpus.digest, Path(args.cache_dir), _not_cached, print
    )
    windows = corpus.train[: args.sequences * recipe.block_size].long()
    dataset = [{"input_ids": row} for row in windows.view(args.sequences, recipe.block_size)]
    print(
        f"{args.sequences} sequences of {recipe.block_size} bytes, vocabulary 256, default shards"
    )
    print(
        "| representation | width | ids | values | payload B/token | on disk B/token | capture tokens/s |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for representation, width in CONFIGURATIONS:
            option = {"k": width} if representation == "topk" else {"num_samples": width}
            began = time.perf_counter()
            manifest = dk.cache.write_teacher_cache(
                teacher, dataset, Path(scratch) / f"{representation}-{width}",
                representation=representation, batch_size=64, progress=False, **option,
            )  # fmt: skip
            speed = manifest["dataset"]["positions"] / (time.perf_counter() - began)
            size = manifest["bytes_per_token"]
            print(
                f"| {representation} | {width} | {manifest['ids']['encoding']} | "
                f"{manifest['values']['dtype']} | {size['payload']} | {size['on_disk']:.2f} | "
                f"{speed:,.0f} |"
            )


if __name__ == "__main__":
    main()
