"""What the Distiller refuses about FSDP and injected Accelerators, checked in one process
(the refusals that need FSDP2 running are in test_train_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from trainkit import loader, mlp, points, teacher_mlp

import darkknowledge as dk
from darkknowledge.train.fsdp import check_versions

# Tiny models on a shared 2-core machine: intra-op threads only spin and wait.
pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(**options) -> dk.Distiller:
    data = loader(points(32), 16)
    return dk.Distiller(mlp(0), teacher_mlp(), data, max_steps=2, progress=False, **options)


def test_fsdp_on_cpu_is_refused_rather_than_silently_run_as_ddp(monkeypatch):
    # What `accelerate launch --use_fsdp --fsdp_version 2 ...` sets for its processes.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="on CPU it silently runs plain DDP instead"):
        _distiller()


def test_fsdp1_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_VERSION", raising=False)  # Accelerate's default: FSDP1
    with pytest.raises(ValueError, match=r"FSDP2 only, got fsdp_version=1 \(FSDP1\)"):
        _distiller()


@pytest.mark.parametrize(
    ("torch_version", "accelerate_version", "message"),
    [
        ("2.5.1", "1.15.0", r"needs torch >= 2\.6 .* got torch 2\.5\.1"),
        ("2.6.0+cu124", "1.5.2", r"needs accelerate >= 1\.6 .* got accelerate 1\.5\.2"),
    ],
)
def test_fsdp_versions_without_fsdp2_are_refused(torch_version, accelerate_version, message):
    with pytest.raises(ValueError, match=message):
        check_versions(torch_version, accelerate_version)
    check_versions("2.6.0", "1.6.0")  # the minimum passes


def test_distiller_trains_on_an_injected_accelerator():
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    injected = _distiller(accelerator=accelerator)
    assert injected.accelerator is accelerator
    injected.fit()
    default = _distiller()
    default.fit()
    for ours, theirs in zip(injected.student.parameters(), default.student.parameters()):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (
            lambda: Accelerator(gradient_accumulation_steps=2),
            {},
            "has gradient_accumulation_steps=2; build it with 1",
        ),
        (
            lambda: Accelerator(
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False)
            ),
            {},
            "unseeded sampler",
        ),
        (
            lambda: Accelerator(
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
            ),
            {"mixed_precision": "bf16"},
            "mixed_precision='bf16' differs from the given accelerator's 'no'",
        ),
    ],
)
def test_distiller_refuses_an_injected_accelerator_it_cannot_train_with(make, options, message):
    with pytest.raises(ValueError, match=message):
        _distiller(accelerator=make(), **options)


def test_distiller_accelerator_must_be_an_accelerator():
    with pytest.raises(TypeError, match=r"accelerator must be an accelerate\.Accelerator, got str"):
        _distiller(accelerator="fsdp")
