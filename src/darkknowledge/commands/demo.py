"""``dk demo [NAME] [options]``: the self-contained demonstrations (no network).

``dk demo`` (or ``dk demo classifier``) distils a digits classifier and writes a report folder;
``dk demo llm`` distils a byte-level GPT-2. Each demo is a module with ``add_arguments(parser)``
and ``run(args)``, imported only when it runs; :data:`CHOICES` maps names to modules, so a new
demo is one line here and one module. Every demo writes its report under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

# name -> (module, one-line help). The first entry is the default (`dk demo` alone).
CHOICES: dict[str, tuple[str, str]] = {
    "classifier": (
        "darkknowledge.commands.demo_classifier",
        "distil a digits classifier with few labels (the default)",
    ),
    "llm": (
        "darkknowledge.commands.demo_llm",
        "distil a byte-level GPT-2 on the Python standard library",
    ),
    "rlhf": (
        "darkknowledge.commands.demo_rlhf",
        "GRPO on the llm demo's model, with and without a KL penalty to the reference",
    ),
    "speculative": (
        "darkknowledge.commands.demo_speculative",
        "speculative decoding of the llm demo's teacher: data-trained vs distilled drafts, MTP heads",
    ),
}
DEFAULT = next(iter(CHOICES))


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(CHOICES[name][0])
    except ImportError as error:  # e.g. transformers missing for the llm demo
        raise ValueError(f"the {name} demo is not available: {error}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    demos = "; ".join(f"{name}: {help_text}" for name, (_, help_text) in CHOICES.items())
    parser.add_argument(
        "which", nargs="?", default=DEFAULT, choices=tuple(CHOICES), help=f"which demo ({demos})"
    )
    # `dk demo --quick`: the default demo's options may come without its name.
    _module(DEFAULT).add_arguments(parser)
    # Whatever follows the name belongs to that demo's own parser (see run()).
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    module = _module(args.which)
    if args.which != DEFAULT or args.rest:  # options came after the name: the demo's parser
        parser = argparse.ArgumentParser(
            prog=f"dk demo {args.which}", description=CHOICES[args.which][1]
        )
        module.add_arguments(parser)
        args = parser.parse_args(args.rest)
    return int(module.run(args) or 0)
