"""Generate with a quantized KV cache and compare with the full-precision cache.

Loads a causal LM (default: the embedded SmolLM2-135M-Instruct), puts a document (default: a Python standard-library
source file) and a question in the prompt, and generates twice: with transformers' own cache, then with
``longkit.apply_patches(model, kv_cache=KVCacheConfig(...))`` (rotated 2/3/4-bit keys and values, a full-precision
window of the newest tokens); with ``--lm-infinite N`` both runs use LM-Infinite (window ``N``) and the quantized one
packs the older part of that window (``--decode cuda_graph``: decode steps replayed from CUDA graphs). Prints both
answers, how many greedy tokens agree, the times and the cache memory.

    python recipes/kv_cache_generate.py --help
    python recipes/kv_cache_generate.py                                   # toy size, CPU: 3-bit keys and values
    python recipes/kv_cache_generate.py --bits 4 --qjl --tokens 4000
    python recipes/kv_cache_generate.py --kivi --bits 2                   # the KIVI baseline
    python recipes/kv_cache_generate.py --lm-infinite 512 --bits 4        # on LM-Infinite: bounded and quantized
    python recipes/kv_cache_generate.py --lm-infinite 4096 --decode cuda_graph --device cuda --tokens 32000
    python recipes/kv_cache_generate.py --model /path/to/llama --device cuda --dtype bfloat16 --tokens 32000
"""

from __future__ import annotations

import argparse
import time

import torch

import longkit
from longkit.config import KVCacheConfig, LMInfiniteConfig


def build_config(args: argparse.Namespace) -> KVCacheConfig:
    """The :class:`~longkit.KVCacheConfig` the command line asks for."""
    if args.kivi:
        return KVCacheConfig.kivi(args.bits, group_size=args.group_size, residual_length=args.residual)
    return KVCacheConfig(key_bits=args.bits, value_bits=args.value_bits or args.bits, group_size=args.group_size,
                         rotate=not args.no_rotate, qjl=args.qjl, keep_channels=args.keep_channels,
                         residual_length=args.residual)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--document", default=None, help="text file (default: a stdlib source file)")
    ap.add_argument("--tokens", type=int, default=1000, help="document tokens kept in the prompt")
    ap.add_argument("--question", default="Summarise in one sentence what the code above implements.")
    ap.add_argument("--bits", type=int, default=3, choices=[2, 3, 4, 16], help="key bits (and value bits)")
    ap.add_argument("--value-bits", type=int, default=None, choices=[2, 3, 4, 16], help="default: --bits")
    ap.add_argument("--group-size", type=int, default=32, help="channels per fp16 scale and zero")
    ap.add_argument("--no-rotate", action="store_true", help="no Hadamard rotation")
    ap.add_argument("--qjl", action="store_true", help="1-bit QJL sketch of the key residual")
    ap.add_argument("--keep-channels", type=float, default=1.0, help="ThinK: fraction of key channels stored")
    ap.add_argument("--kivi", action="store_true", help="the KIVI baseline (per-channel keys, no rotation)")
    ap.add_argument("--residual", type=int, default=128, help="newest tokens kept in full precision")
    ap.add_argument("--lm-infinite", type=int, default=0, metavar="N_LOCAL",
                    help="both runs on LM-Infinite with this window (0: off); kv_cache then packs its older part")
    ap.add_argument("--decode", default="eager", choices=["eager", "static", "cuda_graph"],
                    help="LM-Infinite's decode mode (with --lm-infinite; cuda_graph needs CUDA)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    cfg = build_config(args)  # bad options fail here, before the model loads
    if args.decode != "eager" and not args.lm_infinite:
        ap.error("--decode chooses LM-Infinite's decode mode: use it with --lm-infinite N_LOCAL")
    lm = LMInfiniteConfig(n_local=args.lm_infinite, decode=args.decode) if args.lm_infinite else None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model is None:
        from longkit.models import default_model_dir

        args.model = str(default_model_dir())
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    if args.document:
        text = open(args.document, encoding="utf-8", errors="replace").read()
    else:
        from longkit.models import find_text_document

        _, text = find_text_document(args.tokens, tok)
    doc_ids = tok(text, add_special_tokens=False).input_ids[: args.tokens]
    messages = [{"role": "user", "content": tok.decode(doc_ids) + "\n\n" + args.question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"].to(args.device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True,
               pad_token_id=tok.pad_token_id or tok.eos_token_id)

    runs = {}
    for name in ("full precision", "quantized"):
        if lm is not None:  # lm_infinite first: kv_cache stacks on it
            longkit.apply_patches(model, lm_infinite=lm, **({"kv_cache": cfg} if name == "quantized" else {}))
        elif name == "quantized":
            longkit.apply_patches(model, kv_cache=cfg)
        t0 = time.perf_counter()
        out = model.generate(ids, **gen)
        runs[name] = (out, time.perf_counter() - t0)
    longkit.remove_patches(model)

    ref, fast = runs["full precision"][0].sequences[0, ids.shape[1]:], runs["quantized"][0].sequences[0, ids.shape[1]:]
    n = min(ref.numel(), fast.numel())
    agree = int((ref[:n] == fast[:n]).int().cumprod(0).sum())
    cache = runs["quantized"][0].past_key_values
    mem = cache.memory()
    layers, width = len(cache.layers), cache.layers[0].keys.shape[-1]
    kv_heads = cache.layers[0].keys.shape[1]
    full_bytes = 2 * 2 * width * kv_heads * layers * cache.get_seq_length()  # a bf16 cache of every token
    print(f"prompt: {ids.shape[1]} tokens; {cfg}")
    for name, (out, dt) in runs.items():
        answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"\n[{name}] {dt:.1f} s\n{answer}")
    print(f"\ngreedy tokens identical before the first difference: {agree} of {n}")
    print(f"quantized cache ({type(cache).__name__}): {cache.packed_tokens()} tokens packed at "
          f"{cache.bytes_per_token():g} bytes per token and layer ({mem['packed_used'] / 2**20:.2f} MiB), "
          f"full-precision part {mem['window'] / 2**20:.2f} MiB; a bf16 cache of every token: "
          f"{full_bytes / 2**20:.2f} MiB")
    return {"agree": agree, "compared": n, "memory": mem, "config": cfg}


if __name__ == "__main__":
    main()
