"""BENCHMARKS.md's current-kernel attention table against the measured rows it cites (results/attention_h200.json,
merged by benchmarks/attention_table.py from the runs the table names): every number in the table is a measurement,
copied right."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

LABELS = {"causal": "causal", "causal GQA 4:1": "causal_gqa", "Λ": "lambda", "Λ (= causal here)": "lambda",
          "Λ + distance limit": "lambda_qglobal", "Λ + distance limit (= causal here)": "lambda_qglobal",
          "documents": "documents", "shared prefix": "shared_prefix"}


def _table_rows() -> list[list[str]]:
    text = (ROOT / "BENCHMARKS.md").read_text()
    start = text.index("| hd | T | mask | longkit fwd ms (TFLOP/s)")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip("|").split("|")])
    return rows


def test_current_table_matches_the_merged_runs() -> None:
    attention_table = pytest.importorskip("attention_table")
    merged = attention_table.merge()
    by = {(r["D"], r["T"], r["mask"], r["impl"]): r for r in merged}
    rows = _table_rows()
    assert len(rows) == 36, len(rows)
    for hd, T, label, fwd, flex_fwd, fb, flex_fb, ratios, cudnn, run in rows:
        key = (int(hd), int(T.replace(",", "")), LABELS[label])
        lk = by[(*key, "longkit")]
        flex = by.get((*key[:2], "lambda" if key[2] == "lambda_qglobal" else key[2], "flex"))
        assert run == lk["run"], (key, run)
        assert fwd == f"{lk['fwd_ms']:.2f} ({lk['fwd_tflops']:.0f})", (key, fwd)
        assert fb == f"{lk['fwdbwd_ms']:.2f} ({lk['fwdbwd_tflops']:.0f})", (key, fb)
        assert flex_fwd.strip("()") == f"{flex['fwd_ms']:.2f}", (key, flex_fwd)
        assert flex_fb.strip("()") == f"{flex['fwdbwd_ms']:.2f}", (key, flex_fb)
        got = [float(x) for x in re.findall(r"[0-9.]+", ratios)]
        # from the times (the JSON's ratios are rounded to 3 places already)
        assert got == [round(flex["fwd_ms"] / lk["fwd_ms"], 2), round(flex["fwdbwd_ms"] / lk["fwdbwd_ms"], 2)], \
            (key, ratios)
        if key[2].startswith("causal"):
            cd = by[(*key, "sdpa_cudnn")]
            assert cudnn == f"{cd['fwd_ms'] / lk['fwd_ms']:.3f}", (key, cudnn)
        else:
            assert cudnn == "–", (key, cudnn)
