"""What a verified draft token costs on the machine a ``spec_decode.py`` run measured (no new run needed).

For each workload, the four methods of one run (none, ngram, suffix, longkit) are fitted by least squares to
``wall seconds = alpha * request-steps + beta * verified tokens``, where request-steps = output tokens -
accepted draft tokens and verified tokens = request-steps + draft tokens (vLLM's counters in the results
JSON). ``alpha`` is a request's share of a step's fixed cost, ``beta`` the cost of one verified token, and
``beta / (alpha + beta)`` the break-even acceptance probability: a draft token accepted less often than this
makes decoding slower. Reported with the fit's worst relative error per workload::

    python research/spec_step_cost.py benchmarks/results/spec_decode_cpu_avx2_before_cost_aware.json \
        --name spec_step_cost_cpu

writes ``research/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One fitted row per workload of a ``spec_decode.py`` results file."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        sel = [r for r in rows if r["workload"] == w]
        steps = np.array([r["out_tokens"] - r["accepted"] for r in sel], float)
        x = np.stack([steps, steps + np.array([r["draft_tokens"] for r in sel], float)], 1)
        y = np.array([r["out_tokens"] / r["tok_s"] for r in sel])
        (alpha, beta), *_ = np.linalg.lstsq(x, y, rcond=None)
        err = np.abs(x @ np.array([alpha, beta]) / y - 1).max()
        out.append({"workload": w, "methods": len(sel), "alpha_s": alpha, "beta_s": beta,
                    "beta_over_alpha": beta / alpha, "break_even": beta / (alpha + beta), "max_rel_err": err})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results JSON of benchmarks/spec_decode.py")
    p.add_argument("--name", default=None, help="also write results/<name>.json")
    args = p.parse_args()
    rows = fit(json.loads(Path(args.results).read_text())["rows"])
    print_table(rows, ["workload", "methods", "alpha_s", "beta_s", "beta_over_alpha", "break_even", "max_rel_err"],
                title=f"step cost fit of {args.results}")
    if args.name:
        save_results(args.name, rows, {"source": args.results}, RESULTS)


if __name__ == "__main__":
    main()
