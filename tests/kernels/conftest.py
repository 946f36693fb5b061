"""Kernel-test setup: Triton's CPU interpreter on machines without CUDA, and NaN-poisoned allocations.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is *defined*, so it is set here, before any
test imports a longkit kernel module (longkit imports Triton lazily, on first kernel call).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty``/``torch.empty_like`` return NaN-filled float tensors: unwritten outputs fail."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = orig_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = orig_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
