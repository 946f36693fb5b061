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


def test_limits_arithmetic() -> None:
    """benchmarks/attention_limits.py on a made-up run: rates per executed product, what 1.2x Flex needs, and the
    cuDNN yardstick taken from the causal row of the same shape."""
    limits = pytest.importorskip("attention_limits")
    # forward: 2 products over visible pairs of 1e12 FLOP each (2e12 counted) in 4 ms -> 500 TFLOP/s
    rows = [{"D": 128, "T": 4096, "mask": "lambda", "impl": "longkit", "fwd_ms": 4.0, "fwd_tflops": 500.0,
             "fwdbwd_ms": 18.0},
            {"D": 128, "T": 4096, "mask": "lambda", "impl": "flex", "fwd_ms": 5.0, "fwd_tflops": 400.0,
             "fwdbwd_ms": 24.0},
            {"D": 128, "T": 4096, "mask": "causal", "impl": "sdpa_cudnn", "fwd_ms": 2.0, "fwd_tflops": 600.0,
             "fwdbwd_ms": 7.0},
            {"D": 64, "T": 4096, "mask": "lambda", "impl": "longkit", "fwd_ms": 1.0, "fwd_tflops": 1.0,
             "fwdbwd_ms": 2.0}]  # no Flex row in this run: no output row
    (row,) = limits.limits(rows, "made_up.json")
    assert (row["D"], row["mask"], row["source"]) == (128, "lambda", "made_up.json")
    assert row["bwd_ms"] == 14.0 and row["flex_bwd_ms"] == 19.0
    assert row["bwd_rate"] == 500.0  # 7 products x 1e12 FLOP in 14 ms
    assert row["bwd_ms_for_goal"] == 16.0  # 24 / 1.2 - 4
    assert row["bwd_rate_for_goal"] == 437.5
    assert row["fwd_tflops_for_goal"] == 480.0
    # cuDNN: 2 x 0.6e12 FLOP per product, 5 products in 5 ms
    assert row["cudnn_fwd_tflops"] == 600.0 and row["cudnn_bwd_rate"] == 600.0
