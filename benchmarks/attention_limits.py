"""What the ≥1.2× Flex goal asks of the backward, from measured runs of ``benchmarks/attention.py`` (no GPU needed).

By default it reads BENCHMARKS.md's current table (``results/attention_h200.json``, merged by
``benchmarks/attention_table.py``: each cell from one run, with its baselines). For every longkit row that has Flex
in the same cell it computes, from that cell's times only:

* each implementation's backward time (forward+backward − forward) and the rate at which it runs the backward's
  matrix products: 7 products of ``QKᵀ`` size for longkit and Flex (dq recomputes ``QKᵀ`` and ``dO·Vᵀ``), 5 for
  cuDNN (dq by atomics), each product counted over the visible (query, key) pairs only, so the rates are lower
  bounds of what the tensor cores execute;
* the rate longkit's 7 products would need for forward+backward = Flex's / 1.2 with its forward as measured;
* next to it, cuDNN SDPA's backward rate on the causal mask at the same head dim and length (the fastest backward
  measured on these GPUs; for the other masks the causal cell's cuDNN rows, which may come from another run), and
  the forward rates (longkit, Flex, and what 1.2× Flex needs).

    python benchmarks/attention_limits.py [FILES...] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import RESULTS_DIR, print_table, save_results  # noqa: E402

DEFAULT_RUNS = ["attention_h200.json"]
PRODUCTS = {"longkit": 7, "flex": 7, "sdpa_cudnn": 5}
GOAL = 1.2


def _rate(products: int, product_flops: float, ms: float) -> float:
    return products * product_flops / ms / 1e9  # TFLOP/s


def limits(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """One output row per (head dim, length, mask) of ``rows`` where longkit and Flex both have times (``source``:
    the file, or a row's own ``run`` tag where it has one)."""
    by = {(r["D"], r["T"], r["mask"], r["impl"]): r for r in rows if r.get("fwd_ms") and r.get("fwdbwd_ms")}
    out = []
    for (D, T, mask, impl), lk in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        fx = by.get((D, T, mask, "flex"))
        if impl != "longkit" or fx is None:
            continue
        # one product of QKᵀ size over the visible pairs: half the forward's counted FLOPs
        prod = lk["fwd_tflops"] * lk["fwd_ms"] * 1e9 / 2
        bwd = {n: r["fwdbwd_ms"] - r["fwd_ms"] for n, r in (("longkit", lk), ("flex", fx))}
        need_bwd = fx["fwdbwd_ms"] / GOAL - lk["fwd_ms"]
        row = {"D": D, "T": T, "mask": mask, "source": lk.get("run", source),
               "fwd_tflops": round(lk["fwd_tflops"], 1), "flex_fwd_tflops": round(fx["fwd_tflops"], 1),
               "fwd_tflops_for_goal": round(GOAL * fx["fwd_tflops"], 1),
               "bwd_ms": round(bwd["longkit"], 2), "flex_bwd_ms": round(bwd["flex"], 2),
               "bwd_ms_for_goal": round(need_bwd, 2),
               "bwd_rate": round(_rate(PRODUCTS["longkit"], prod, bwd["longkit"]), 1),
               "flex_bwd_rate": round(_rate(PRODUCTS["flex"], prod, bwd["flex"]), 1),
               "bwd_rate_for_goal": round(_rate(PRODUCTS["longkit"], prod, need_bwd), 1) if need_bwd > 0 else None}
        # cuDNN runs the causal masks only: its causal row of the same run and shape is the yardstick
        cd = by.get((D, T, "causal", "sdpa_cudnn")) or by.get((D, T, "causal_gqa", "sdpa_cudnn"))
        if cd is not None:
            cprod = cd["fwd_tflops"] * cd["fwd_ms"] * 1e9 / 2
            row["cudnn_fwd_tflops"] = round(cd["fwd_tflops"], 1)
            row["cudnn_bwd_rate"] = round(_rate(PRODUCTS["sdpa_cudnn"], cprod, cd["fwdbwd_ms"] - cd["fwd_ms"]), 1)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", default=DEFAULT_RUNS, help="result JSON files (names in benchmarks/results)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    sources = []
    for name in args.files:
        path = Path(name) if Path(name).exists() else RESULTS_DIR / name
        run = json.loads(path.read_text())
        rows += limits(run["rows"], path.name)
        sources.append({"file": path.name, **{k: run["env"].get(k) for k in ("device", "date", "command")}})
    print_table(rows, ["D", "T", "mask", "fwd_tflops", "flex_fwd_tflops", "fwd_tflops_for_goal", "cudnn_fwd_tflops",
                       "bwd_ms", "flex_bwd_ms", "bwd_ms_for_goal", "bwd_rate", "flex_bwd_rate", "bwd_rate_for_goal",
                       "cudnn_bwd_rate", "source"],
                title=f"what {GOAL}x Flex asks (TFLOP/s over visible pairs; backward rates per executed product)")
    # an analysis on this machine of runs made on the GPU: the measured runs' device and date go with it
    save_results("attention_limits_h200", rows, {"analysis_of": sources}, args.out_dir)


if __name__ == "__main__":
    main()
