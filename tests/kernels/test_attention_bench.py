"""benchmarks/attention.py's timing loop (no GPU: the timer is replaced): rotated rounds, medians, failing baselines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_rounds_rotate_the_order_and_report_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    attention = pytest.importorskip("attention")
    calls: list[tuple[str, bool]] = []
    clock = iter(range(1, 1000))

    def fake_bench(fn, grad, ts, do, rep):  # noqa: ANN001, ANN202
        calls.append((fn.__name__, grad))
        return float(next(clock))

    monkeypatch.setattr(attention, "bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    x = torch.randn(2, 3, requires_grad=True)

    def a():  # noqa: ANN202
        return x * 2

    def b():  # noqa: ANN202
        return x * 3

    def broken():  # noqa: ANN202
        raise RuntimeError("unsupported shape")

    impls = [("a", a, [x]), ("b", b, [x]), ("broken", broken, [x])]
    args = argparse.Namespace(no_bwd=False, rep_ms=None, rounds=3)
    rows = attention.time_impls(impls, torch.ones(2, 3), args, {"T": 7}, 1e9)
    # every round times a and b, forward then forward+backward, in the order a b | b (broken) a | (broken) a b
    firsts = [calls[i][0] for i in (0, 4, 8)]
    assert firsts == ["a", "b", "a"], calls
    assert len(calls) == 12
    by = {r["impl"]: r for r in rows}
    assert by["a"]["fwd_runs"] == [1.0, 7.0, 9.0] and by["a"]["fwd_ms"] == 7.0
    assert by["b"]["fwdbwd_runs"] == [4.0, 6.0, 12.0] and by["b"]["fwdbwd_ms"] == 6.0
    assert by["a"]["T"] == 7 and "unsupported shape" in by["broken"]["error"] and "fwd_ms" not in by["broken"]
    # one round: plain medians, no per-round lists
    args.rounds = 1
    rows = attention.time_impls(impls[:2], torch.ones(2, 3), args, {}, 1e9)
    assert all("fwd_runs" not in r and "fwd_ms" in r for r in rows)
