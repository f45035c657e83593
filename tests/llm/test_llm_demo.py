import argparse
import json

import pytest

from darkknowledge.llm import demo


def test_demo_quick_runs_and_second_run_uses_the_cached_teacher(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    cache, out = tmp_path / "cache", tmp_path / "report"
    args = parser.parse_args(["--quick", "--cache-dir", str(cache), "--output-dir", str(out)])
    assert demo.run(args) == 0
    table = capsys.readouterr().out
    assert "student, distilled" in table and "student, data only" in table
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


def test_demo_rejects_bad_flags_before_training(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for flags, message in (
        (["--alpha", "2"], "--alpha"),
        (["--student-steps", "0"], "--student-steps"),
    ):
        args = parser.parse_args(["--quick", "--cache-dir", str(tmp_path), *flags])
        with pytest.raises(ValueError, match=message):
            demo.run(args)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached
