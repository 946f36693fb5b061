"""benchmarks/lasp.py: the kernel comparison's dry run (CPU, tiny shapes) and the sequence-parallel step on a tiny
MiniMax-style hybrid with 2 gloo processes (same losses as one process; communication timed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_kernel_dry_run(tmp_path: Path) -> None:
    bench = pytest.importorskip("lasp")
    path = bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in ("lightning", "gdn")
                                                    for impl in ("longkit", "torch_chunked")}
    for r in rows:
        assert r["ms"] > 0 and math.isfinite(r["tok_s"])
        assert r["max_rel_err_vs_longkit"] < 1e-5, r  # on CPU both are the chunked PyTorch path


def test_sp_tiny_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    bench = pytest.importorskip("lasp")
    path = bench.main(["--sp", "none@1:128", "lasp2@2:128", "--sp-shape", "tiny", "--warmup", "0", "--steps", "2",
                       "--out-dir", str(tmp_path)])
    one, two = json.loads(path.read_text())["rows"]
    assert one["error"] is None and two["error"] is None, (one, two)
    assert (one["sp"], two["sp"]) == (1, 2) and two["tokens_per_gpu"] == 64
    assert one["comm_s"] == 0.0 and 0.0 < two["comm_share"] < 1.0
    assert two["loss_max_abs_diff_vs_1proc"] < 1e-4, (one["losses"], two["losses"])
