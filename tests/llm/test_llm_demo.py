import json
import re

import pytest

from darkknowledge.cli import main
from darkknowledge.llm import demo


def test_demo_quick_runs_and_second_run_uses_the_cached_teacher(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "report"
    argv = ["demo", "llm", "--quick", "--cache-dir", str(cache), "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "student, distilled" in printed and "student, data only" in printed
    first = json.loads((out / "results.json").read_text())
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first["models"]["teacher"]["cached"] is False
    assert len(list(cache.glob("llm-demo-teacher-*/*.safetensors"))) == 1
    for name in ("distilled", "data_only"):
        model = first["models"][name]
        assert model["parameters"] < first["models"]["teacher"]["parameters"]
        assert (
            model["bits_per_byte"] > 0
            and len(model["curve"]) == demo.QUICK.student_steps // demo.QUICK.eval_every
        )

    second = demo.run_demo(demo.QUICK, cache_dir=cache, output_dir=out)
    teacher = second["models"]["teacher"]
    assert teacher["cached"] is True
    assert (
        teacher["bits_per_byte"] == first["models"]["teacher"]["bits_per_byte"]
    )  # the same weights
    # Same seed and batches: the students are trained identically again.
    assert second["models"]["distilled"]["curve"] == first["models"]["distilled"]["curve"]
    assert capsys.readouterr().out == ""  # run_demo without log= is silent


def test_demo_llm_says_each_stage_and_where_the_report_went(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "report"
    argv = ["demo", "llm", "--quick", "--cache-dir", str(cache), "--output-dir", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    patterns = [
        r"corpus: 20,000 training bytes from \d+ standard library files, 1,024 held-out bytes .*",
        r"teacher \(1 x 32, [\d,]+ parameters\): 8 steps from the data \(cached for later runs\)",
        r"teacher: trained in [\d.]+ s, saved to .*",
        r"teacher: [\d.]+ held-out bits per byte",
        r"student, distilled \(1 x 16, [\d,]+ parameters\): 4 steps distilled from the teacher",
        r"student, distilled: [\d.]+ held-out bits per byte \([\d.]+ s\)",
        r"student, data only \(1 x 16, [\d,]+ parameters\): 4 steps from the data alone",
        r"student, data only: [\d.]+ held-out bits per byte \([\d.]+ s\)",
    ]
    for line, pattern in zip(lines[: len(patterns)], patterns, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    teacher_path = next(cache.glob("llm-demo-teacher-*"))
    assert lines[2] == f"teacher: trained in {lines[2].split()[3]} s, saved to {teacher_path}"
    assert lines[-2] == f"teacher weights: {teacher_path}"
    assert lines[-1] == f"report: {out / 'results.json'}, {out / 'val_loss.png'}"
    assert main(argv) == 0  # second run: the cache says so
    assert f"teacher: loaded from the cache {teacher_path}" in capsys.readouterr().out


def test_demo_rejects_bad_flags_before_training(tmp_path, capsys):
    for flags, message in (
        (["--alpha", "2"], "--alpha must be in [0, 1], got 2.0"),
        (["--student-steps", "0"], "--student-steps must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ):
        argv = ["demo", "llm", "--quick", "--cache-dir", str(tmp_path), *flags]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"dk demo: error: {message}"
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached


def test_demo_output_flag_is_one_name_with_a_deprecated_alias(tmp_path, capsys):
    from darkknowledge.commands import demo_classifier, demo_llm

    for module in (demo_classifier, demo_llm):
        import argparse

        parser = argparse.ArgumentParser(prog="dk demo x")
        module.add_arguments(parser)
        assert parser.parse_args(["--output-dir", "a"]).output_dir == "a"
        assert parser.parse_args(["--output", "b"]).output_dir == "b"
        assert "--output is deprecated, use --output-dir" in capsys.readouterr().err
        assert "--output-dir" in parser.format_help()
        assert "--output " not in parser.format_help()  # the old name is not advertised
    with pytest.raises(SystemExit):
        main(["demo", "llm", "--outptu-dir", "x"])
