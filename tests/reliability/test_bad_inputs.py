"""Every bad input of the catalogue gets a clear answer, and docs/reliability.md shows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import make_table
import pytest
from catalogue import Outcome, all_cases, run_case

CASES = all_cases()
_OUTCOMES: dict[int, Outcome] = {}  # filled by the parametrized test, reused by the doc test
ROOT = Path(__file__).resolve().parents[2]


def outcome_of(index: int) -> Outcome:
    if index not in _OUTCOMES:
        _OUTCOMES[index] = run_case(CASES[index])
    return _OUTCOMES[index]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c.via}: {c.what}"[:90] for c in CASES])
def test_bad_input_gets_a_clear_answer(index):
    case, outcome = CASES[index], outcome_of(index)
    assert not outcome.marker, f"the planted pickle ran: {outcome}"
    assert outcome.message and "Traceback" not in outcome.message
    if outcome.kind == "result":  # a documented answer (its case checked it)
        return
    assert case.names in outcome.message, f"{case.names!r} not named in {outcome.message!r}"
    if outcome.kind.startswith("exit"):
        assert outcome.kind == "exit 2"
        command = case.via.split()[1]
        if command != "validate":  # dk validate lists every problem, one per line
            assert "\n" not in outcome.message
            assert outcome.message.startswith(f"dk {command}: error: ")
    else:
        assert "\n" not in outcome.message


def test_reliability_doc_tables_are_current():
    results = [(case, outcome_of(index)) for index, case in enumerate(CASES)]
    current = make_table.DOC.read_text(encoding="utf-8")
    assert make_table.render(current, make_table.blocks(results)) == current, (
        "docs/reliability.md is stale: run .venv/bin/python tests/reliability/make_table.py"
    )


def test_dk_script_bad_config_one_line_no_traceback(tmp_path):
    """The installed command itself (a real process), not only main() in this one."""
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\x80\x04\x95 not yaml")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 1000 + "]" * 1000 + "\n")
    dk = Path(sys.executable).with_name("dk")
    for command, path in (("distill", binary), ("validate", deep)):
        done = subprocess.run(
            [str(dk), command, str(path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        if command == "distill":
            assert (
                done.stderr.strip()
                == f"dk distill: error: {binary}: not UTF-8 text (byte 0x80 at offset 0)"
            )
        else:
            assert (
                done.stderr.splitlines()[-1].strip() == "not a config: nested too deeply to parse"
            )
