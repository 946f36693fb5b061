"""Decode speed and memory at long context: vanilla HF vs LM-Infinite, same model, same run.

Random-weight Llama with realistic layer shapes (default: Llama-3-8B), bf16. For each context length the
same random prompt is decoded greedily with ``model.generate`` by the unpatched model (DynamicCache, SDPA)
and by ``longkit.apply_patches(model, lm_infinite=...)`` (bounded LMInfiniteCache). Decode tokens/s is
``new_tokens * batch / (t(1 + N new) - t(1 new))`` so prefill is excluded; peak memory is the CUDA
allocator's peak over the whole generate call. The SDPA backend is pinned to flash/efficient for both
(the cuDNN backend re-plans at every decode step and would handicap the baseline, see shared notes).

    python benchmarks/lm_infinite_decode.py                      # H100: 16k/32k/64k, batch 1 and 4
    python benchmarks/lm_infinite_decode.py --shape tiny --device cpu --contexts 256 512 --new-tokens 8
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import print_table, save_results  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


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
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate(model, prompt, new_tokens: int, device: str) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - t0, out


def measure(model, prompt, new_tokens: int, device: str, repeats: int) -> dict:
    """Median over ``repeats`` of prefill+1 and prefill+1+N; peak memory of the longer call."""
    t1s, tns = [], []
    for _ in range(repeats):
        t1s.append(_generate(model, prompt, 1, device)[0])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tn, out = _generate(model, prompt, 1 + new_tokens, device)
        tns.append(tn)
    t1, tn = sorted(t1s)[len(t1s) // 2], sorted(tns)[len(tns) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    b = prompt.shape[0]
    decode = new_tokens * b / (tn - t1) if tn > t1 else None  # None: timing noise exceeded the decode time
    return {"prefill_s": t1, "decode_tok_s": decode, "peak_gib": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--plan", nargs="+", default=None,
                    help="explicit BATCHxCONTEXT pairs, e.g. 1x65536 4x32768 (overrides --batches/--contexts)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=None, help="default: the model's max_position_embeddings")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    import longkit
    from longkit import LMInfiniteConfig

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(args.shape, args.device, dtype)
    lm_cfg = LMInfiniteConfig(n_global=args.n_global, n_local=args.n_local)
    n_local = lm_cfg.resolved(model.config.max_position_embeddings).n_local
    ctx = torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                                          torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
                                          torch.nn.attention.SDPBackend.MATH])
    rows = []
    with torch.no_grad(), ctx:
        # Warm-up (kernel compilation/autotuning) for both methods at a short length.
        warm = torch.randint(1, model.config.vocab_size, (1, min(args.contexts)), device=args.device)
        _generate(model, warm, 2, args.device)
        with longkit.patched(model, lm_infinite=lm_cfg):
            _generate(model, warm, 2, args.device)
        plan = ([tuple(int(x) for x in p.split("x")) for p in args.plan] if args.plan
                else [(b, c) for b in args.batches for c in args.contexts])
        for batch, context in plan:
            prompt = torch.randint(1, model.config.vocab_size, (batch, context), device=args.device)
            res = {}
            for method in ("vanilla", "lm_infinite"):
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                try:
                    if method == "vanilla":
                        res[method] = measure(model, prompt, args.new_tokens, args.device, args.repeats)
                    else:
                        with longkit.patched(model, lm_infinite=lm_cfg):
                            res[method] = measure(model, prompt, args.new_tokens, args.device, args.repeats)
                except torch.OutOfMemoryError:
                    res[method] = {"prefill_s": None, "decode_tok_s": None, "peak_gib": None, "oom": True}
            v, lm = res["vanilla"], res["lm_infinite"]
            speedup = (lm["decode_tok_s"] / v["decode_tok_s"]) if v.get("decode_tok_s") and lm.get(
                "decode_tok_s") else None
            mem_ratio = (v["peak_gib"] / lm["peak_gib"]) if v.get("peak_gib") and lm.get("peak_gib") else None
            rows.append({
                "batch": batch, "context": context, "n_local": n_local, "n_global": args.n_global,
                "vanilla_tok_s": v.get("decode_tok_s"), "lminf_tok_s": lm.get("decode_tok_s"),
                "decode_speedup": speedup,
                "vanilla_peak_gib": v.get("peak_gib"), "lminf_peak_gib": lm.get("peak_gib"),
                "peak_mem_ratio": mem_ratio,
                "vanilla_prefill_s": v.get("prefill_s"), "lminf_prefill_s": lm.get("prefill_s"),
                "vanilla_oom": v.get("oom", False), "lminf_oom": lm.get("oom", False),
            })
            print_table(rows[-1:], title=f"batch {batch}, context {context}")
            _save(args, rows)  # after every row: a run cut short keeps what it measured
    print_table(rows, ["batch", "context", "vanilla_tok_s", "lminf_tok_s", "decode_speedup", "vanilla_peak_gib",
                       "lminf_peak_gib", "peak_mem_ratio", "vanilla_prefill_s", "lminf_prefill_s"],
                title=f"LM-Infinite decode ({args.shape}, {args.new_tokens} new tokens, SDPA flash/efficient)")
    _save(args, rows)
    return rows


def _save(args: argparse.Namespace, rows: list[dict]) -> None:
    gpu = "cpu"
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(0).lower()
        gpu = next((g for g in ("h100", "h200", "a100", "b200") if g in name), name.split()[-1])
    save_results(f"lm_infinite_decode_{gpu}" if args.shape != "tiny" else "lm_infinite_decode_tiny", rows,
                 {"shape": args.shape, "model": SHAPES[args.shape], "new_tokens": args.new_tokens,
                  "sdpa_backends": "flash, efficient (math as last resort)"}, args.out_dir)


if __name__ == "__main__":
    main()
