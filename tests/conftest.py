"""Shared pytest setup: fresh seeds per test, CPU-only default tier (gpu/multigpu markers skip here)."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Triton reads TRITON_INTERPRET when triton.language is first imported (its own @jit helpers such as tl.zeros are
# interpreted or not from then on), and a test module may import it indirectly (transformers.masking_utils ->
# torch._dynamo -> triton) before tests/kernels/conftest.py is collected: set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test and per run (printed on failure) so tests see fresh random inputs.
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("LONGKIT_RANDOM_SEED", "1") == "1" else 0
    random.seed(seed)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[longkit] failing test ran with torch seed {value}")
