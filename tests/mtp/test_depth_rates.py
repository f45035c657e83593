"""depth_acceptance_rates with greedy=True: how often depth k's argmax at row i equals the
model's own argmax at i + k, counted position by position from full logits."""

from __future__ import annotations

import torch
from mtp_models import tiny_lm

from darkknowledge.llm import logits_from_hidden, shift_labels
from darkknowledge.mtp import MTPStudent, depth_acceptance_rates


def test_depth_acceptance_rates_greedy_is_argmax_agreement():
    student = MTPStudent.from_model(tiny_lm(0, n_embd=16), "sequential", 2)
    with torch.no_grad():
        for parameter in student.heads.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    student.eval()
    ids = torch.randint(32, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # right padding
    rates = depth_acceptance_rates(
        student, ids, shift_labels(ids, mask), attention_mask=mask, greedy=True
    )
    with torch.no_grad():
        out = student(ids, mask)
        layer = student.output_layer()
        target = logits_from_hidden(out.hidden, layer).argmax(-1)  # (B, T)
        drafts = [logits_from_hidden(h, layer).argmax(-1) for h in out.depth_hidden]
    for depth in (1, 2):
        agree = [
            float(drafts[depth - 1][b, i] == target[b, i + depth])
            for b in range(3)
            for i in range(10 - depth - 1)  # the row predicts token i + depth + 1
            if mask[b, i + depth + 1]
        ]
        assert abs(float(rates[depth - 1]) - sum(agree) / len(agree)) < 1e-6
    assert float(rates.min()) > 0 and float(rates.max()) < 1
