"""``dk demo rlhf --quick``: end to end through the command, and the reward really rises."""

from __future__ import annotations

import json

import pytest

from darkknowledge.cli import main
from darkknowledge.llm import rlhf


def test_rlhf_demo_quick_writes_its_report_and_the_reward_rises_without_kl(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "report"
    argv = ["demo", "rlhf", "--quick", "--cache-dir", str(cache), "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for row in (
        "reference (start)",
        "kl coefficient 0 ",
        "kl coefficient 0.05",
        "kl coefficient 0.2",
    ):
        assert row in printed
    assert str(out / "results.json") in printed
    assert (out / "reward_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "results.json").read_text())
    policies = report["policies"]
    assert list(policies) == ["reference", "kl=0", "kl=0.05", "kl=0.2"]
    assert len(list(cache.glob("llm-demo-teacher-*/*.safetensors"))) == 1  # the llm demo's cache
    for name, policy in policies.items():
        assert policy["bits_per_byte"] > 0 and len(policy["sample"]) == rlhf.QUICK.completion_length
        if name != "reference":
            assert len(policy["history"]) == rlhf.QUICK.steps
    # At KL 0 the policy learns to emit the target byte: the reward of the last three steps is
    # several times that of the first three (the starting model gives 'e' about 1% of bytes).
    rewards = [row["reward"] for row in policies["kl=0"]["history"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 3 * first + 0.05, rewards
    # Every policy starts from the reference: the first step's exact KL is 0 (before any update).
    for name in ("kl=0", "kl=0.05", "kl=0.2"):
        assert policies[name]["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert policies[name]["history"][-1]["kl"] > 0


def test_rlhf_demo_rejects_bad_flags_before_any_work(tmp_path, capsys):
    for flags, message in (
        (["--target", "ab"], "--target"),
        (["--steps", "0"], "--steps"),
        (["--kl-coefficients", "-1"], "--kl-coefficients"),
    ):
        argv = ["demo", "rlhf", "--quick", "--cache-dir", str(tmp_path), *flags]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached
