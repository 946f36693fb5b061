"""Draft-length policies for a batch on a CPU, compared by replay (no model, a simulated step clock).

Why: on diverse chat no drafting policy beat plain decoding on the CPU (``BENCHMARKS.md``). Verifying a token
costs ``t1`` of compute there, and the batch runs until its slowest request ends, so a draft pays off only if it
shortens that *critical* request. The drafter's cost model (``cost.py``) assumes every row is equally likely to be
critical (each accepted token saves ``t0 / rows`` of the step's fixed cost). This script tests alternatives on
recorded greedy outputs (the ``none`` run of ``benchmarks/spec_decode.py --workdir DIR``), through
:func:`longkit.vllm_plugins.spec.replay_batch` with :class:`SimulatedEngineClock` (step = ``t0 + t1 · tokens``):

* ``current``: the library's drafter (one break-even probability for every row);
* ``critical``: a row is critical if its expected remaining steps (``max_tokens`` budget left ÷ its recent tokens
  per step) is within ``--slack`` of the batch's largest; critical rows share the fixed cost, the others get the
  cost model's cap (``max_break_even``);
* ``critical_strict``: the same, but non-critical rows never draft.

Workloads run in the benchmark's order through one drafter (its global cache carries over), one drafter per policy
and clock. Prints tok/s of each policy ÷ no drafting and writes ``research/results/<name>.json``::

    python research/spec_policy_replay.py --workdir DIR/rep0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402
from longkit.vllm_plugins.spec import BatchDrafter, SuffixSpecConfig, replay_batch  # noqa: E402
from longkit.vllm_plugins.spec.simulate import SimulatedEngineClock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (t0, t1) seconds: the range the drafter learned on the AVX2 CPU (BENCHMARKS.md), and a GPU-like t1 << t0
CLOCKS = [(0.015, 0.020), (0.025, 0.020), (0.037, 0.021), (0.005, 0.020), (0.010, 0.0005)]


class NoDraft(BatchDrafter):
    """Plain decoding: same bookkeeping, no drafts."""

    def propose(self, sampled_token_ids: Any, *args: Any, **kwargs: Any) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


class CriticalPath(BatchDrafter):
    """Per-row break-even from a speed-aware guess of which rows end last (see the module docstring)."""

    slack = 0.2
    strict = False
    speed_decay = 0.7  # weight of the past in a row's tokens-per-step average

    def propose(self, sampled_token_ids: Any, num_tokens_no_spec: Any, token_ids_cpu: Any, *args: Any,
                **kwargs: Any) -> list[list[int]]:
        batch, requests = self._batch, self._requests or {}
        speed: dict[Any, float] = self.__dict__.setdefault("_speed", {})
        est: dict[Any, float] = {}
        for i, sampled in enumerate(sampled_token_ids):
            rid = batch.req_ids[i]
            if len(sampled):
                speed[rid] = self.speed_decay * speed.get(rid, 1.0) + (1 - self.speed_decay) * len(sampled)
            params = getattr(requests.get(rid), "sampling_params", None)
            limit = getattr(params, "max_tokens", None)
            n = int(num_tokens_no_spec[i])
            budget = limit - (n - int(batch.num_prompt_tokens[i])) if limit is not None else self.max_model_len - n
            est[rid] = max(budget, 0) / speed.get(rid, 1.0)
        top = max(est.values(), default=0.0)
        critical = {rid for rid, e in est.items() if e >= (1 - self.slack) * top}
        fit = self.cost.coefficients
        per_row: dict[Any, float | None] = {}
        for rid in est:
            if fit is None:
                per_row[rid] = None
                continue
            t0, t1 = fit
            if rid in critical:
                per_row[rid] = min(self.cost.max_break_even, t1 / (t0 / len(critical) + t1)) if t0 + t1 > 0 else 0.0
            else:
                per_row[rid] = 1.01 if self.strict else self.cost.max_break_even
        inner = self.drafter.propose

        def propose_row(req_id: Any, max_tokens: int | None = None, min_prob: float | None = None) -> list[int]:
            return inner(req_id, max_tokens, per_row.get(req_id, min_prob))

        self.drafter.propose = propose_row  # type: ignore[method-assign]
        try:
            return super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, *args, **kwargs)
        finally:
            del self.drafter.propose


class CriticalStrict(CriticalPath):
    strict = True


POLICIES = {"current": BatchDrafter, "critical": CriticalPath, "critical_strict": CriticalStrict}


def run(cls: type[BatchDrafter], workloads: dict[str, Any], t0: float, t1: float) -> dict[str, dict[str, float]]:
    clock = SimulatedEngineClock(t0, t1)
    bd = cls(SuffixSpecConfig(num_speculative_tokens=16), max_model_len=4096, clock=clock)
    out = {}
    for name, (prompts, outputs, max_tokens) in workloads.items():
        start = clock.now
        ids = [f"{name}-{i}" for i in range(len(prompts))]
        res, steps = replay_batch(bd, prompts, outputs, req_ids=ids, max_tokens=[max_tokens] * len(prompts),
                                  clock=clock)
        out[name] = {"tok_s": sum(r.output_tokens for r in res) / (clock.now - start), "steps": steps,
                     "draft_tokens": sum(r.draft_tokens for r in res),
                     "accepted": sum(r.accepted_tokens for r in res)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="a spec_decode.py --workdir run folder (rep0)")
    ap.add_argument("--slack", type=float, default=0.2)
    ap.add_argument("--name", default="spec_policy_replay")
    args = ap.parse_args()
    CriticalPath.slack = args.slack
    job = json.loads((args.workdir / "none.job.json").read_text())
    ref = json.loads((args.workdir / "none.out.json").read_text())
    workloads = {w: (job["workloads"][w], ref["workloads"][w]["tokens"], job["max_tokens"][w])
                 for w in job["workloads"]}
    rows = []
    for t0, t1 in CLOCKS:
        base = run(NoDraft, workloads, t0, t1)
        for policy, cls in POLICIES.items():
            res = run(cls, workloads, t0, t1)
            for w, r in res.items():
                rows.append({"t0": t0, "t1": t1, "policy": policy, "workload": w, **r,
                             "x_none": r["tok_s"] / base[w]["tok_s"], "steps_none": base[w]["steps"]})
        print(f"t0={t0} t1={t1} done", flush=True)
    print_table(rows, ["t0", "t1", "workload", "policy", "x_none", "steps", "steps_none", "draft_tokens", "accepted"],
                title="drafting policies by replay (tok/s ÷ no drafting, simulated clock)")
    save_results(args.name, rows, {"workdir": str(args.workdir), "slack": args.slack}, RESULTS)


if __name__ == "__main__":
    main()
