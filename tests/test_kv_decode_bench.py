"""benchmarks/kv_decode.py's dry run (CPU, tiny shapes, the reference path): every implementation runs, the quantized
outputs are close to exact attention, and the memory ratios follow the exact bytes per token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_dry_run(tmp_path: Path) -> None:
    bench = pytest.importorskip("kv_decode")
    from longkit.kernels.kv_quant import bytes_per_token

    result = json.loads(bench.main(["--dry-run", "--out-dir", str(tmp_path)]).read_text())
    rows = result["rows"]
    impls = {r["impl"] for r in rows}
    assert impls == {"sdpa_bf16", "longkit_bf16"} | {f"longkit_{n}" for n in bench.SPECS}
    for r in rows:
        if r["impl"] in ("sdpa_bf16", "longkit_bf16"):
            assert r["rel_err"] < 1e-5 and r["mem_ratio"] == 1.0
        else:
            spec = bench.spec_for(r["impl"].removeprefix("longkit_"), r["D"])
            assert r["kv_bytes"] == bytes_per_token(spec, r["D"], r["Hkv"]) * r["T"] * r["B"]
            assert r["mem_ratio"] > 3.0
            assert r["rel_err"] < {4: 0.25, 3: 0.6, 2: 0.9}[spec.key_bits], r  # random keys: a flat softmax
    first = [r for r in rows if "kernel_vs_ref" in r]
    assert first and all(r["kernel_vs_ref"] == 0.0 for r in first)  # CPU: the reference itself
    assert result["capacity"] and all(c["3bit_seqs"] >= 4 * c["bf16_seqs"] for c in result["capacity"])
    # the codebook at D=64: 3 bits + one fp16 RMS per 64 values = 3.25 bits, 4.92x less than bf16
    assert all(c["3bit_cb_seqs"] >= 4.9 * c["bf16_seqs"] for c in result["capacity"])
