"""BENCHMARKS.md's current-kernel table as one file: ``results/attention_h200.json`` (no GPU needed).

A Flex compile per (length, mask) keeps each GPU run of ``benchmarks/attention.py`` to one or two lengths and a few
masks, so the table's 36 cells (head dim 64 / 128 × T = 4k / 16k / 64k × six masks) come from several runs, each
with its baselines in the same process. ``SOURCES`` says which run supplies which cells; this script copies those
rows (longkit and every baseline of the same cell), tags each with its run and file, checks that every cell comes
from exactly one run, prints the table in BENCHMARKS.md's layout and writes the merged file::

    python benchmarks/attention_table.py [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import RESULTS_DIR, print_table, save_results  # noqa: E402

MASKS = ["causal", "causal_gqa", "lambda", "lambda_qglobal", "documents", "shared_prefix"]
LENGTHS = [4096, 16384, 65536]  # nominal: documents / shared prefix runs round T to whole documents
# (run, head dim, nominal lengths, masks): the runs BENCHMARKS.md lists, each saved as
# results/attention_h200_<run>.json; a later source of a cell replaces an earlier one
SOURCES = [
    ("hd128_16k_docs_prefix", 128, [16384], ["documents", "shared_prefix"]),
    ("hd64_16k", 64, [16384], MASKS),
    ("hd128_causal", 128, [16384, 65536], ["causal", "causal_gqa"]),
    ("hd128_4k64k_docs_prefix", 128, [4096, 65536], ["documents", "shared_prefix"]),
    ("hd64_4k64k", 64, [4096, 65536], MASKS),
    ("hd128_4k_causal", 128, [4096], ["causal", "causal_gqa"]),
    ("hd128_lambda", 128, LENGTHS, ["lambda", "lambda_qglobal"]),
    ("hd64_4k_lambda", 64, [4096], ["lambda", "lambda_qglobal"]),
]


def source_file(run: str) -> str:
    """The results file of a run named in ``SOURCES`` (and in BENCHMARKS.md's table)."""
    return f"attention_h200_{run}.json"


def _nominal(T: int) -> int:
    """The grid length a row belongs to (shared-prefix runs use whole DPO pairs: 3,073 for 4k, ...)."""
    return min(LENGTHS, key=lambda n: abs(n - T))


def merge(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every implementation's row of every cell, from the run ``SOURCES`` assigns it."""
    cells: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for run, D, lengths, masks in SOURCES:
        name = source_file(run)
        env = json.loads((results_dir / name).read_text())
        found = set()
        for r in env["rows"]:
            key = (r["D"], _nominal(r["T"]), r["mask"])
            if r["D"] == D and key[1] in lengths and r["mask"] in masks:
                if key not in found:  # a newer source replaces the cell's rows
                    cells[key] = []
                    found.add(key)
                cells[key].append({**r, "run": run, "file": name, "date": env["env"].get("date")})
        missing = {(D, T, m) for T in lengths for m in masks} - found
        if missing:
            raise ValueError(f"{name} (run {run}) lacks the cells {sorted(missing)}")
    want = {(D, T, m) for D in (64, 128) for T in LENGTHS for m in MASKS}
    if set(cells) != want:
        raise ValueError(f"cells without a source: {sorted(want - set(cells))}")
    return [r for key in sorted(cells, key=lambda k: (-k[0], k[1], MASKS.index(k[2]))) for r in cells[key]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    rows = merge()
    print_table([r for r in rows if r["impl"] == "longkit"],
                ["D", "T", "mask", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops", "fwd_x_flex", "fwdbwd_x_flex",
                 "fwd_x_sdpa_cudnn", "run"], title="current kernels (longkit rows; baselines in the JSON)")
    save_results("attention_h200", rows, {"sources": [[s[0], source_file(s[0])] for s in SOURCES]}, args.out_dir)


if __name__ == "__main__":
    main()
