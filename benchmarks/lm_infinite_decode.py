"""Decode speed and memory at long context: vanilla HF vs LM-Infinite, eager and CUDA-graph, same model, same run.

Random-weight Llama with realistic layer shapes (default: Llama-3-8B), bf16. For each (batch, context) the same
random prompt is decoded greedily with ``model.generate`` by up to eight methods:

* ``vanilla_eager``: HF's default (DynamicCache), eager;
* ``vanilla_graph``: HF's ``cache_implementation="static"`` (StaticCache, fixed-shape 4-D mask built by
  ``generate()``), every one-token forward replayed from a CUDA graph by
  :class:`longkit.hf_patches.decode_graph.DecodeGraphRunner` (the same runner LM-Infinite uses);
* ``lminf_eager``: ``apply_patches(model, lm_infinite=LMInfiniteConfig(...))`` (bounded ring cache, eager);
* ``lminf_static``: ``LMInfiniteConfig(decode="static")`` (static ring cache, eager; a CPU-runnable check);
* ``lminf_graph``: ``LMInfiniteConfig(decode="cuda_graph")``;
* ``lminf_memory_eager``: ``lminf_eager`` + ``memory=MemoryConfig()`` (memory blocks at their defaults; their
  blocks are not counted in ``cache_gib``, the peak includes them);
* ``lminf_kv4_eager``: ``lminf_eager`` + ``kv_cache=KVCacheConfig()`` (4-bit rotated packed ring);
* ``lminf_kv4_graph``: ``lminf_graph`` + the same ring (its fixed-buffer form, decode steps replayed from graphs);
* ``kv4_eager``: vanilla attention over the full-length quantized cache, ``kv_cache=KVCacheConfig()`` alone.

The last four run only when named in ``--methods``; the headline ratio compares plain LM-Infinite with vanilla,
``<method>_vs_lminf_eager`` gives the stacked ones' decode speed against LM-Infinite alone (eager),
``lminf_kv4_graph_vs_lminf_graph`` the packed ring's against LM-Infinite's with graphs, and
``kv4_eager_vs_vanilla_eager`` the quantized cache's against HF's default decoding.

Timing: a streamer timestamps every token ``generate()`` emits (HF reads each token on the host anyway), so
one ``generate`` call gives the prefill time (first token) and the steady per-step decode time (tokens after
``--skip-steps`` warm-up steps: the runner's eager warm-up and its capture). Decode tok/s = batch / step time.
For graph methods, the GPU time of one replayed step (CUDA events, no HF host work) and the bytes it must read
(weights + KV cache) give the achieved GB/s. Peak memory = CUDA allocator peak over the ``generate`` call;
``cache_gib`` = the KV cache's own buffers. The SDPA backends are pinned to flash / memory-efficient (math as
a last resort), never cuDNN (it re-plans at every eager decode step): maskless steps (vanilla
eager, LM-Infinite once its ring is full) run flash, masked ones (vanilla's StaticCache) memory-efficient.

    python benchmarks/lm_infinite_decode.py            # H100: the default plan, 1x16k .. 1x128k, 4x16k .. 4x64k
    python benchmarks/lm_infinite_decode.py --plan 4x16384 4x32768 --methods vanilla_eager vanilla_graph lminf_graph
    python benchmarks/lm_infinite_decode.py --shape tiny --device cpu --plan 1x256 2x512 --new-tokens 8
    # host work per step (ATen ops dispatched, from a second short run per method)
    python benchmarks/lm_infinite_decode.py --shape tiny --device cpu --plan 1x4096 --count-ops \
        --methods lminf_eager lminf_memory_eager

Results: ``benchmarks/results/lm_infinite_decode_<gpu>_graph.json`` (``--out-name`` to change).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
METHODS = ("vanilla_eager", "vanilla_graph", "lminf_eager", "lminf_static", "lminf_graph", "lminf_memory_eager",
           "lminf_kv4_eager", "lminf_kv4_graph", "kv4_eager")
LMINF = ("lminf_eager", "lminf_static", "lminf_graph")  # plain LM-Infinite: the headline's candidates
VANILLA = ("vanilla_eager", "vanilla_graph")


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.eval()


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched from Python (views included): the host work of a step, whatever the device.
    A replayed CUDA graph dispatches none."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


class _TokenClock:
    """``generate(streamer=...)``: host time at every emitted token (first put = the prompt), and the op count of
    an active :class:`_OpCounter`."""

    def __init__(self, counter: _OpCounter | None = None) -> None:
        self.times: list[float] = []
        self.counter = counter
        self.ops: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.counter is not None:
            self.ops.append(self.counter.n)

    def end(self) -> None:
        pass


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _cleanup(device: str) -> None:
    gc.collect()
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _cache_bytes(cache: Any) -> int:
    if callable(getattr(cache, "memory", None)):  # longkit's quantized caches: packed buffers + full-precision part
        mem = cache.memory()
        return int(mem["packed_allocated"] + mem["window"])
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _replay_ms(runner: Any, device: str, n: int) -> float | None:
    """GPU time of one replayed decode step (median of ``n``); advances the cache, so run it last."""
    graphs = list(getattr(runner, "_graphs", {}).values())
    if not graphs or not _cuda(device) or n < 1:
        return None
    graph = graphs[-1][1]  # the last captured phase: the steady state
    times = []
    for _ in range(n):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def run_method(model, method: str, prompt: torch.Tensor, args: argparse.Namespace, lm_kw: dict,
               prefill_chunk: int | None = None) -> dict:
    """One ``generate`` call of ``method``: prefill time, steady decode tok/s, memory, and (graphs) GPU step time."""
    import longkit
    from longkit import KVCacheConfig, LMInfiniteConfig, MemoryConfig
    from longkit.hf_patches.decode_graph import graphed_decode

    device, b = args.device, prompt.shape[0]
    n_new = args.skip_steps + args.new_tokens + 1
    gen: dict[str, Any] = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    clock = _TokenClock(getattr(args, "op_counter", None))
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats()
    gpu_ms, stats = None, None
    t0 = time.perf_counter()
    if method == "vanilla_eager":
        out = model.generate(prompt, streamer=clock, **gen)
    elif method == "kv4_eager":  # the full-length quantized cache (no LM-Infinite): 4-bit rotated, 128-token window
        with longkit.patched(model, kv_cache=KVCacheConfig()):
            out = model.generate(prompt, streamer=clock, **gen)
    elif method == "vanilla_graph":
        from transformers import StaticCache

        with graphed_decode(model, accept=lambda c: isinstance(c, StaticCache)) as runner:
            chunk = {"prefill_chunk_size": prefill_chunk} if prefill_chunk else {}
            out = model.generate(prompt, streamer=clock, cache_implementation="static", **chunk, **gen)
            stats = dict(runner.stats)
            for layer in out.past_key_values.layers:  # rewind the write index: replays must stay inside the cache
                layer.cumulative_length.fill_(prompt.shape[1])
            gpu_ms = _replay_ms(runner, device, min(args.replay_steps, n_new - 1))
    else:
        decode = {"lminf_graph": "cuda_graph", "lminf_kv4_graph": "cuda_graph", "lminf_static": "static"}.get(
            method, "eager")
        extra: dict[str, Any] = {}
        if method == "lminf_memory_eager":  # InfLLM-style memory blocks at their defaults
            extra["memory"] = MemoryConfig()
        elif method in ("lminf_kv4_eager", "lminf_kv4_graph"):  # LM-Infinite's window in a 4-bit rotated packed ring
            extra["kv_cache"] = KVCacheConfig(key_bits=4, value_bits=4)
        with longkit.patched(model, lm_infinite=LMInfiniteConfig(**lm_kw, decode=decode), **extra):
            out = model.generate(prompt, streamer=clock, **gen)
            runner = getattr(model, "_longkit_graph_runner", None)
            if runner is not None:
                stats = dict(runner.stats)
                gpu_ms = _replay_ms(runner, device, args.replay_steps)
    if _cuda(device):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if _cuda(device) else None
    tok = clock.times[1:]  # [first token (prefill), after decode step 1, 2, ...]
    k0 = args.skip_steps
    step_s = (tok[-1] - tok[k0]) / (len(tok) - 1 - k0)
    steps = sorted(b2 - a for a, b2 in zip(tok[k0:-1], tok[k0 + 1:]))
    cache = out.past_key_values
    res = {
        "tok_s": b / step_s, "step_ms": step_s * 1e3, "step_ms_median": steps[len(steps) // 2] * 1e3,
        "prefill_s": tok[0] - t0, "peak_gib": peak,
        "cache_gib": _cache_bytes(cache) / 2**30,
    }
    if clock.ops:
        ops = clock.ops[1:]
        res["ops_per_step"] = (ops[-1] - ops[k0]) / (len(ops) - 1 - k0)
    if method.endswith("graph"):
        res["gpu_step_ms"] = gpu_ms
        res["runner"] = stats
        if gpu_ms:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            res["gbps"] = (weight_bytes + _cache_bytes(cache)) / (gpu_ms * 1e-3) / 1e9
    del out, cache
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--plan", nargs="+", default=["1x16384", "1x32768", "1x65536", "1x131072", "4x16384", "4x32768",
                                                   "4x65536"], help="BATCHxCONTEXT pairs, run in this order")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="default: vanilla_eager vanilla_graph lminf_eager lminf_graph (CUDA); no graphs on CPU")
    ap.add_argument("--eager-max-tokens", type=int, default=131072,
                    help="skip the eager methods when batch*context exceeds this (their prefill dominates the run)")
    ap.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    ap.add_argument("--skip-steps", type=int, default=3, help="untimed decode steps first (warm-up, capture)")
    ap.add_argument("--vanilla-prefill-chunk", type=int, default=None,
                    help="if vanilla_graph runs out of memory, retry it with HF's prefill_chunk_size=N (the timed "
                         "decode steps are unaffected); the row records both")
    ap.add_argument("--replay-steps", type=int, default=20, help="graph replays timed alone after generate()")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=None, help="default: the model's max_position_embeddings")
    ap.add_argument("--count-ops", action="store_true",
                    help="after each timed run, a short untimed one counts the ATen ops dispatched per decode step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-name", default=None, help="results/<name>.json; default lm_infinite_decode_<gpu>_graph")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    methods = args.methods or (["vanilla_eager", "vanilla_graph", "lminf_eager", "lminf_graph"] if _cuda(args.device)
                               else ["vanilla_eager", "lminf_eager", "lminf_static"])

    from longkit import LMInfiniteConfig

    dtype = torch.bfloat16 if _cuda(args.device) else torch.float32
    model = build_model(args.shape, args.device, dtype)
    n_local = LMInfiniteConfig(n_local=args.n_local).resolved(model.config.max_position_embeddings).n_local
    lm_kw = dict(n_global=args.n_global, n_local=n_local)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    plan = [tuple(int(x) for x in p.split("x")) for p in args.plan]
    rows: list[dict] = []
    with torch.no_grad(), sdpa_kernel(backends):
        # Warm-up of every method at a short length (kernel autotuning, cuBLAS handles, Triton compiles).
        warm = torch.randint(1, model.config.vocab_size, (1, min(1024, min(t for _, t in plan))), device=args.device)
        wargs = argparse.Namespace(**{**vars(args), "new_tokens": 2, "skip_steps": 2, "replay_steps": 0})
        for m in methods:
            try:
                run_method(model, m, warm, wargs, lm_kw)
            except Exception as e:  # noqa: BLE001 - the timed rows will record the error
                print(f"  warm-up {m} failed: {type(e).__name__}: {e}", flush=True)
        _cleanup(args.device)
        for batch, context in plan:
            prompt = torch.randint(1, model.config.vocab_size, (batch, context), device=args.device)
            row: dict[str, Any] = {"batch": batch, "context": context, "n_global": args.n_global, "n_local": n_local}
            for m in methods:
                if m.endswith(("eager", "static")) and batch * context > args.eager_max_tokens:
                    row[f"{m}_skipped"] = f"batch*context > --eager-max-tokens {args.eager_max_tokens}"
                    continue
                _cleanup(args.device)
                res = _attempt(model, m, prompt, args, lm_kw)
                if res.get("oom") and m == "vanilla_graph" and args.vanilla_prefill_chunk:
                    # Retry with HF's chunked prefill (outside the failed attempt's except block, so its tensors
                    # are freed first): only the prefill changes, the timed decode steps do not.
                    retry = _attempt(model, m, prompt, args, lm_kw, args.vanilla_prefill_chunk)
                    res = ({**retry, "prefill_chunk": args.vanilla_prefill_chunk, "unchunked_error": res["error"]}
                           if not retry.get("oom") else {**res, "chunked_error": retry["error"]})
                if args.count_ops and "error" not in res and not m.endswith("graph"):  # a replay dispatches no op
                    counter = _OpCounter()
                    cargs = argparse.Namespace(**{**vars(args), "new_tokens": 4, "replay_steps": 0,
                                                  "op_counter": counter})
                    with counter:
                        res["ops_per_step"] = run_method(model, m, prompt, cargs, lm_kw)["ops_per_step"]
                for k, v in res.items():
                    row[f"{m}_{k}"] = v
                print(f"  {batch}x{context} {m}: " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
            _ratios(row, methods)
            rows.append(row)
            _save(args, rows, methods)  # after every row: a run cut short keeps what it measured
    cols = (["batch", "context"] + [f"{m}_tok_s" for m in methods]
            + ["fastest_vanilla", "fastest_lminf", "speedup_vs_fastest_vanilla", "lminf_graph_vs_vanilla_graph"]
            + [f"{m}_vs_lminf_eager" for m in ("lminf_memory_eager", "lminf_kv4_eager") if m in methods]
            + (["lminf_kv4_graph_vs_lminf_graph"] if "lminf_kv4_graph" in methods else [])
            + (["kv4_eager_vs_vanilla_eager"] if "kv4_eager" in methods else [])
            + [f"{m}_peak_gib" for m in methods]
            + ([f"{m}_ops_per_step" for m in methods] if args.count_ops else []))
    print_table(rows, cols, title=f"LM-Infinite decode ({args.shape}, {args.new_tokens} timed steps, decode tok/s)")
    print_table(rows, ["batch", "context"] + [f"{m}_gpu_step_ms" for m in methods if m.endswith("graph")]
                + [f"{m}_gbps" for m in methods if m.endswith("graph")] + [f"{m}_cache_gib" for m in methods],
                title="graph replay GPU time per step (ms), achieved GB/s (weights + KV), KV cache GiB")
    return rows


def _attempt(model, m: str, prompt: torch.Tensor, args: argparse.Namespace, lm_kw: dict,
             prefill_chunk: int | None = None) -> dict:
    """``run_method`` that records out-of-memory and other errors instead of stopping the run."""
    try:
        return run_method(model, m, prompt, args, lm_kw, prefill_chunk)
    except torch.OutOfMemoryError as e:
        res = {"oom": True, "error": _where(e)}
    except Exception as e:  # noqa: BLE001 - record and go on: the other methods' numbers still count
        res = {"error": _where(e)}
    _cleanup(args.device)  # after the except block: the traceback (and the tensors its frames hold) is gone
    return res


def _where(e: BaseException) -> str:
    """First line of an error and the innermost frames that raised it."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)[-5:]
    return (str(e).split("\n")[0][:200] + " @ " + " < ".join(
        f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames)))


def _ratios(row: dict, methods: list[str]) -> None:
    """Headline: the fastest LM-Infinite method vs the fastest vanilla method measured in this row."""
    vanilla = {m: row[f"{m}_tok_s"] for m in VANILLA if row.get(f"{m}_tok_s")}
    lminf = {m: row[f"{m}_tok_s"] for m in methods if m in LMINF and row.get(f"{m}_tok_s")}
    if vanilla and lminf:
        bv, bl = max(vanilla, key=vanilla.get), max(lminf, key=lminf.get)
        row["fastest_vanilla"], row["fastest_lminf"] = bv, bl
        row["speedup_vs_fastest_vanilla"] = lminf[bl] / vanilla[bv]
        if row.get(f"{bv}_peak_gib") and row.get(f"{bl}_peak_gib"):
            row["peak_ratio_vs_fastest_vanilla"] = row[f"{bv}_peak_gib"] / row[f"{bl}_peak_gib"]
    if row.get("vanilla_graph_tok_s") and row.get("lminf_graph_tok_s"):
        row["lminf_graph_vs_vanilla_graph"] = row["lminf_graph_tok_s"] / row["vanilla_graph_tok_s"]
    if row.get("lminf_eager_tok_s") and row.get("lminf_graph_tok_s"):
        row["lminf_graph_vs_lminf_eager"] = row["lminf_graph_tok_s"] / row["lminf_eager_tok_s"]
    for m in ("lminf_memory_eager", "lminf_kv4_eager"):  # the stacked techniques against LM-Infinite alone, eager
        if row.get(f"{m}_tok_s") and row.get("lminf_eager_tok_s"):
            row[f"{m}_vs_lminf_eager"] = row[f"{m}_tok_s"] / row["lminf_eager_tok_s"]
    if row.get("lminf_kv4_graph_tok_s") and row.get("lminf_graph_tok_s"):
        row["lminf_kv4_graph_vs_lminf_graph"] = row["lminf_kv4_graph_tok_s"] / row["lminf_graph_tok_s"]
    if row.get("kv4_eager_tok_s") and row.get("vanilla_eager_tok_s"):
        row["kv4_eager_vs_vanilla_eager"] = row["kv4_eager_tok_s"] / row["vanilla_eager_tok_s"]


def _save(args: argparse.Namespace, rows: list[dict], methods: list[str]) -> None:
    gpu = "cpu"
    if _cuda(args.device):
        name = torch.cuda.get_device_name(0).lower()
        gpu = next((g for g in ("h100", "h200", "a100", "b200") if g in name), name.split()[-1])
    name = args.out_name or (f"lm_infinite_decode_{gpu}_graph" if args.shape != "tiny" else "lm_infinite_decode_tiny")
    save_results(name, rows, {
        "shape": args.shape, "model": SHAPES[args.shape], "methods": methods, "timed_steps": args.new_tokens,
        "skip_steps": args.skip_steps, "vanilla_prefill_chunk": args.vanilla_prefill_chunk,
        "sdpa_backends": "flash, efficient (math last resort); no cuDNN",
        "timing": "per-token host timestamps inside generate(); decode tok/s = batch / steady step time",
    }, args.out_dir)


if __name__ == "__main__":
    main()
