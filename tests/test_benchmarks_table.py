"""BENCHMARKS.md's attention table against the measured rows it cites (results/attention_h200.json, merged by
benchmarks/attention_table.py from the runs the table names): every number in the table is a measurement, copied
right, and every run it names is listed with its command and file."""

from __future__ import annotations

import json
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


def _listed_runs() -> dict[str, str]:
    """The runs list above the table: run -> the arguments of its ``benchmarks/attention.py`` command."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    start = text.index("| run | `python benchmarks/attention.py`")
    runs = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        run, args, _ = (c.strip().strip("`") for c in line.strip("|").split("|"))
        runs[run] = args
    return runs


def test_every_run_is_listed_with_its_command() -> None:
    attention_table = pytest.importorskip("attention_table")
    listed = _listed_runs()
    assert sorted(listed) == sorted(s[0] for s in attention_table.SOURCES)
    assert {row[-1] for row in _table_rows()} == set(listed)
    for run, args in listed.items():
        # the command writes results/attention_h200_<run>.json, and that run measured what the table takes from it
        assert args.endswith(f"--tag _{run}"), (run, args)
        env = json.loads((ROOT / "benchmarks" / "results" / attention_table.source_file(run)).read_text())
        recorded, listed_words = env["env"]["command"].split(), args.split()
        for flag in ("--hd", "--seqlens", "--masks", "--rounds", "--rep-ms", "--no-flex"):
            assert _flag_values(recorded, flag) == _flag_values(listed_words, flag), (run, flag)


def _flag_values(words: list[str], flag: str) -> list[str] | None:
    """The values after ``flag`` in a command line (None: the flag is absent)."""
    if flag not in words:
        return None
    i = j = words.index(flag) + 1
    while j < len(words) and not words[j].startswith("--"):
        j += 1
    return words[i:j]


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
