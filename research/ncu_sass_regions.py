"""Where a kernel's warps spend their time, by code region, from an Nsight Compute source-page export.

Input: ``ncu --import X.ncu-rep --page source --csv --print-source sass > X_sass.csv`` of a report taken with
``--set full --import-source yes`` (warp-state sampling per SASS instruction). Consecutive instructions executed
the same number of times form a region (a loop body, a prologue, an epilogue); the script prints each region's
share of the stall samples, the loop's instruction mix, and writes JSON. Used for the hd 128 × 4k causal forward
against cuDNN (``docs/kernel_notes.md``; outputs in ``research/results/ncu_fwd4k_hd128_*``)::

    python research/ncu_sass_regions.py fwd4k_longkit_sass.csv fwd4k_sdpa_cudnn_sass.csv --out regions.json
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
from pathlib import Path
from typing import Any


def regions(path: Path, min_share: float = 0.005) -> dict[str, Any]:
    """Regions of equal execution count with at least ``min_share`` of the samples, and the hottest region's
    instruction mix (opcode -> count, share of samples)."""
    rows = list(csv.reader(path.open()))
    header_at = next(i for i, r in enumerate(rows) if "Warp Stall Sampling (All Samples)" in r)
    hdr, data = rows[header_at], [r for r in rows[header_at + 1:] if len(r) > 5]
    i_smp, i_exe = hdr.index("Warp Stall Sampling (All Samples)"), hdr.index("Instructions Executed")
    seq = [(r[1].strip(), float(r[i_smp] or 0), float(r[i_exe] or 0)) for r in data]
    total = sum(s for _, s, _ in seq) or 1.0
    groups: list[dict[str, Any]] = []
    for text, smp, exe in seq:
        if groups and groups[-1]["executed"] == exe:
            groups[-1]["instructions"] += 1
            groups[-1]["samples"] += smp
            groups[-1]["_text"].append((text, smp))
        else:
            groups.append({"executed": exe, "instructions": 1, "samples": smp, "_text": [(text, smp)]})
    hot = max(groups, key=lambda g: g["samples"])
    mix: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for text, smp in hot["_text"]:
        op = (text.split()[1] if text.startswith("@") else text.split()[0]).split(".")[0]
        mix[op][0] += 1
        mix[op][1] += smp / total
    out = [{"executed": g["executed"], "instructions": g["instructions"], "share": round(g["samples"] / total, 4)}
           for g in groups if g["samples"] / total >= min_share]
    return {"file": path.name, "total_samples": total, "regions": out,
            "hot_region": {"executed": hot["executed"], "instructions": hot["instructions"],
                           "share": round(hot["samples"] / total, 4),
                           "mix": {k: {"count": v[0], "share": round(v[1], 4)}
                                   for k, v in sorted(mix.items(), key=lambda kv: -kv[1][1])}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = [regions(p) for p in args.csv]
    for r in res:
        print(f"{r['file']}: {r['total_samples']:.0f} samples")
        for g in r["regions"]:
            print(f"  executed {g['executed']:>12.0f}  instructions {g['instructions']:>5d}  samples {g['share']:6.1%}")
        top = list(r["hot_region"]["mix"].items())[:8]
        print("  hottest region:", ", ".join(f"{k} {v['count']} ({v['share']:.1%})" for k, v in top))
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
