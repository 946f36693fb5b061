"""Cost of the ``longkit_suffix`` drafter per request and step, without vLLM.

Replays recorded greedy outputs (the ``none`` run of ``benchmarks/spec_decode.py --workdir DIR``)
through :func:`longkit.vllm_plugins.spec.replay_batch`, which drives the drafter exactly as vLLM's runner
does (runner hook, ``propose`` on a NumPy token buffer, rows compacted, finish notices one step late).
Workloads run in the benchmark's order through one drafter, so the global cache carries over as in the
engine. Reported per workload: engine steps, request-steps (rows drafted for), µs per request-step and
per engine step (min over ``--repeats``: other processes only add time), where the time goes (index
update, drafting incl. the global-cache lookup, vLLM glue), and a digest of every draft, so two
versions of the drafter can be checked for identical behaviour::

    python benchmarks/spec_drafter_cost.py --workdir DIR/rep0 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402


def _instrument(bd: Any, clock: dict[str, float], drafts: list[Any]) -> Callable[[], None]:
    """Time the drafter's parts on this instance (a wrapper costs ~0.2 µs per call); returns the undo."""
    from longkit.vllm_plugins.spec.cache import CacheMatcher

    def wrap(fn: Callable[..., Any], key: str, record: bool = False) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            clock[key] += time.perf_counter() - t
            if record:
                drafts.append(out)
            return out

        return wrapper

    d = bd.drafter
    d.update = wrap(d.update, "update")
    d.propose = wrap(d.propose, "draft")
    bd.propose = wrap(bd.propose, "glue_total", record=True)
    lookup = CacheMatcher.lookup  # per-request matchers are made on first use: patch the class
    CacheMatcher.lookup = wrap(lookup, "cache_lookup")

    def undo() -> None:
        for obj, attr in ((d, "update"), (d, "propose"), (bd, "propose")):
            vars(obj).pop(attr)
        CacheMatcher.lookup = lookup

    return undo


def run_once(workloads: dict[str, tuple[list[list[int]], list[list[int]], int]], breakdown: bool) -> dict[str, Any]:
    from longkit.vllm_plugins.spec import BatchDrafter, SuffixSpecConfig, replay_batch

    bd = BatchDrafter(SuffixSpecConfig(num_speculative_tokens=16), max_model_len=4096)
    out: dict[str, Any] = {}
    for name, (prompts, outputs, max_tokens) in workloads.items():
        clock = dict.fromkeys(("update", "draft", "cache_lookup", "glue_total"), 0.0)
        drafts: list[Any] = []
        undo = _instrument(bd, clock, drafts) if breakdown else None
        before = dict(vars(bd.timing))
        ids = [f"{name}-{i}" for i in range(len(prompts))]
        results, engine_steps = replay_batch(bd, prompts, outputs, req_ids=ids, max_tokens=[max_tokens] * len(prompts))
        if undo is not None:
            undo()
        t = {k: v - before[k] for k, v in vars(bd.timing).items()}
        out[name] = {
            "engine_steps": engine_steps,
            "rows": t["propose_rows"],
            "propose_s": t["propose_s"],
            "hook_s": t["hook_s"],
            "drafted": sum(r.draft_tokens for r in results),
            "accepted": sum(r.accepted_tokens for r in results),
            "verifications": sum(r.steps - 1 for r in results),
            "clock": clock,
            "drafts": drafts,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a rep dir of spec_decode.py --workdir (none.job/out.json)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--name", default=None, help="also write results/<name>.json")
    args = p.parse_args()
    wd = Path(args.workdir)
    job = json.loads((wd / "none.job.json").read_text())
    ref = json.loads((wd / "none.out.json").read_text())
    workloads = {
        w: (job["workloads"][w], ref["workloads"][w]["tokens"], job["max_tokens"][w]) for w in job["workloads"]
    }

    timed_runs = [run_once(workloads, breakdown=False) for _ in range(args.repeats)]
    parts = run_once(workloads, breakdown=True)  # separate run: wrappers would inflate the totals
    rows = []
    for w in workloads:
        runs = [r[w] for r in timed_runs]
        first = runs[0]
        c = parts[w]["clock"]
        digest = hashlib.sha256(json.dumps([list(map(int, d)) for ds in parts[w]["drafts"] for d in ds]).encode())
        total = c["glue_total"]
        rows.append(
            {
                "workload": w,
                "engine_steps": first["engine_steps"],
                "request_steps": first["rows"],
                # min over repeats: other processes on a shared machine only ever add time
                "us_per_request_step": min(1e6 * r["propose_s"] / r["rows"] for r in runs),
                "us_per_engine_step": min(1e6 * (r["propose_s"] + r["hook_s"]) / r["engine_steps"] for r in runs),
                "update_pct": 100 * c["update"] / total,
                "draft_pct": 100 * c["draft"] / total,
                "lookup_pct": 100 * c["cache_lookup"] / total,
                "glue_pct": 100 * (total - c["update"] - c["draft"]) / total,
                "drafted": first["drafted"],
                "accepted": first["accepted"],
                "mean_accepted_len": 1 + first["accepted"] / first["verifications"] if first["verifications"] else None,
                "drafts_sha": digest.hexdigest()[:12],
            }
        )
    all_s = [sum(r[w]["propose_s"] + r[w]["hook_s"] for w in workloads) for r in timed_runs]
    all_rows = sum(timed_runs[0][w]["rows"] for w in workloads)
    overall = {"request_steps": all_rows, "min_ms": 1e3 * min(all_s), "median_ms": 1e3 * statistics.median(all_s),
               "us_per_request_step": 1e6 * min(all_s) / all_rows}
    print_table(rows, title="longkit_suffix drafter cost (replay, no vLLM)")
    print(f"\nall workloads: {overall['min_ms']:.1f} ms for {all_rows} request-steps "
          f"({overall['us_per_request_step']:.1f} us each, hook included; min of {args.repeats}; "
          f"median {overall['median_ms']:.1f} ms)")
    if args.name:
        save_results(args.name, rows, {"workdir": str(wd), "repeats": args.repeats, "all_workloads": overall})


if __name__ == "__main__":
    main()
