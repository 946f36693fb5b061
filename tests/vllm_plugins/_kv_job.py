"""Run vLLM ``LLM`` engines for the packed-KV-cache tests, in a process of their own:
``python _kv_job.py job.json out.json``.

job.json: ``{"engines": [engine, ...]}`` (built one after the other in this process, each deleted before the next)
or a single ``engine``: ``{"model", "dtype", "max_model_len", "kv_cache_memory_bytes", "kv_cache_dtype",
"additional_config", "max_num_seqs", "max_num_batched_tokens", "worker_state": bool,
"rounds": [[{"prompt_token_ids": [...], "max_tokens": n, "ignore_eos": bool}, ...], ...]}``.
Each round is one greedy ``LLM.generate`` call.

out.json: ``{"pid", "engines": [{"capacity_tokens", "num_blocks", "block_size", "init_s", "rounds": [{"tokens",
"texts", "seconds", "generated"}, ...], "prefix_cache_hits", "plugin_registered_main", "workers": [...]}, ...]}``
(``workers``: :func:`longkit.vllm_plugins.kv_cache.worker_kv_cache_state` of each worker, when asked). An engine
whose start raises gets ``{"error": "<type>: <message>"}`` instead, so a test can check the message a user would see.

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` vLLM runs its engine core and worker in this process: every request of a
``generate`` call is queued before the first step, so batches (and bf16 rounding) do not depend on timing.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any


def _prefix_cache_hits(llm: Any) -> float:
    """vLLM's prefix-cache hit counter (tokens; process-wide, so callers take differences)."""
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def run_engine(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import longkit.vllm_plugins as plugins

    kwargs = {k: job[k] for k in ("kv_cache_memory_bytes", "kv_cache_dtype", "max_num_batched_tokens")
              if job.get(k) is not None}
    t0 = time.perf_counter()
    try:
        llm = LLM(model=job["model"], dtype=job.get("dtype", "bfloat16"), max_model_len=job.get("max_model_len", 2048),
                  enforce_eager=True, seed=0, disable_log_stats=False,
                  additional_config=job.get("additional_config") or {},
                  max_num_seqs=job.get("max_num_seqs", 8), **kwargs)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(e).__name__}: {e}", "plugin_registered_main": plugins.is_registered()}
    init_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    result: dict[str, Any] = {
        "plugin_registered_main": plugins.is_registered(),
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "capacity_tokens": cache.num_gpu_blocks * cache.block_size,
        "init_s": init_s,
        "rounds": [],
    }
    hits0 = _prefix_cache_hits(llm)
    for rnd in job.get("rounds", []):
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in rnd]
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=r.get("ignore_eos", True))
                  for r in rnd]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        result["rounds"].append({"tokens": tokens, "texts": [o.outputs[0].text for o in outs], "seconds": seconds,
                                 "generated": sum(map(len, tokens))})
    result["prefix_cache_hits"] = _prefix_cache_hits(llm) - hits0
    if job.get("worker_state"):
        from longkit.vllm_plugins.kv_cache import worker_kv_cache_state

        result["workers"] = llm.collective_rpc(worker_kv_cache_state)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    engines = job["engines"] if "engines" in job else [job]
    json.dump({"pid": os.getpid(), "engines": [run_engine(e) for e in engines]}, open(out_path, "w"))


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main(sys.argv[1], sys.argv[2])
