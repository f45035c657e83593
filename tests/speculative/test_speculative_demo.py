"""``dk demo speculative --quick``: end to end through the command (every row measured, the
report and plot written), trained drafts cached and reloaded, and bad flags refused."""

from __future__ import annotations

import json

import pytest

from darkknowledge.cli import main
from darkknowledge.llm import speculative_demo

PNG = b"\x89PNG\r\n\x1a\n"


def test_speculative_demo_quick_reports_every_draft_and_reuses_them(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "report"
    argv = ["demo", "speculative", "--quick", "--cache-dir", str(cache), "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for text in ("(a) draft, data alone", "(b) draft, distilled: TVD", "(c) MTP heads, distilled"):
        assert text in printed
    assert "draft tvd: distilled (tvd) on target samples: training" in printed
    assert (
        "draft on_policy_jsd: distilled (jsd) on its own samples (on-policy): training" in printed
    )
    report = json.loads((out / "results.json").read_text())
    assert list(report["rows"]) == ["data", "tvd", "on_policy_jsd", "mtp_labels", "mtp_distilled"]
    quick = speculative_demo.QUICK
    for name, row in report["rows"].items():
        assert row["new_tokens"] == quick.prompts * quick.max_new_tokens
        assert 0 <= row["alpha_offline_samples"] <= 1 and 0 <= row["alpha_offline_text"] <= 1
        assert row["speedup"] > 0 and row["cost_ratio"] > 0
        assert row["tokens_per_target_call"] <= quick.gamma + 1
        assert (row["depth_rates_offline"] is None) == (not name.startswith("mtp"))
    assert (out / "speculative.png").read_bytes()[:8] == PNG
    assert len(list(cache.glob("speculative-demo-drafts-*/*.safetensors"))) == 5

    assert main(argv) == 0  # the drafts come from the cache: the same offline numbers
    printed = capsys.readouterr().out
    assert printed.count("loaded from") == 5 and ": training" not in printed
    again = json.loads((out / "results.json").read_text())
    for name, row in again["rows"].items():
        assert row["alpha_offline_samples"] == report["rows"][name]["alpha_offline_samples"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gamma", "0"], "--gamma must be >= 1"),
        (["--divergences", "kl"], "--divergences: unknown"),
        (["--on-policy", "tv"], "--on-policy: unknown"),
        (["--max-new-tokens", "60"], "--max-new-tokens must leave room"),
        (["--temperature", "0"], "--temperature must be finite and > 0"),
    ],
)
def test_speculative_demo_refuses_bad_flags(tmp_path, capsys, flags, message):
    argv = ["demo", "speculative", "--cache-dir", str(tmp_path), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
