"""Quality of longkit's quantized KV cache on real text: perplexity and greedy agreement against a full-precision cache.

The model is the embedded default, SmolLM2-135M-Instruct (30 layers, 3 KV heads of dim 64), in fp32 on the CPU
(bf16 on CUDA with ``--dtype bf16``). Every configuration runs in this one process on the same documents:

* ``fp`` (baseline): the stock model with transformers' ``DynamicCache`` (keys and values in the model's dtype);
* ``k16v16``: longkit's cache storing keys and values raw in 16 bits (no rotation): the cache machinery alone;
* ``rot{b}``: TurboQuant-style, ``b``-bit keys and values after a randomized Hadamard rotation, fp16 scale and
  zero per group of 32 channels; ``rot{b}+qjl`` adds the 1-bit QJL sketch of the key residual (64 projections);
* ``norot{b}``: the same groups and bits without the rotation (the no-rotation baseline at equal bytes);
* ``kivi{b}``: KIVI (``KVCacheConfig.kivi``): no rotation, per-channel key scales over 32 tokens, per-token values;
* ``rot4_keep0.5`` / ``norot4_keep0.75``: ThinK key-channel pruning on 4-bit keys (32 resp. 48 of 64 key channels
  kept, chosen from the prompt's queries; 48 channels cannot be Hadamard-rotated, hence ``norot``, groups of 16).

Every quantized configuration keeps the newest ``--residual`` tokens (default 128) in full precision (KIVI's window).

Perplexity at context ``L`` (``--ctx``, default 2048 4096 8192): per document, tokens ``[0, L)`` are fed through
the cache in chunks of ``--chunk`` tokens (default 256; chunked prefill: each chunk attends to itself in full
precision and to the earlier tokens through the cache, i.e. quantized except the window), then the next chunk
``[L, L + chunk)`` is fed the same way and scored: ``exp`` of the mean next-token loss of its ``chunk`` predictions,
over all documents. So every scored token reads ``L - residual`` quantized tokens, and the baseline runs the same
chunking with the full-precision cache: the difference is the cache's alone. ``dppl@L`` is the relative increase
over ``fp`` in percent.

Greedy agreement: per document, its first ``--gen-prompt`` tokens (default 2048) as the prompt (one prefill: the
prompt is attended in full precision once, then quantized), ``--gen-tokens`` (default 64) greedy tokens with EOS
off; ``agree`` is the fraction of positions where the tokens equal the baseline's, ``first_diff`` the mean index of
the first differing token (``gen-tokens`` = never).

Bytes: ``B/tok/layer`` is :func:`longkit.kernels.kv_quant.bytes_per_token` (codes, scales, zeros, QJL bits and
norms; KIVI's per-token share of its key scales), exact; ``x_bf16`` is the ratio to a bf16 cache (``4·64·3 = 768``
bytes per token and layer). The full-precision window (``residual`` tokens per layer) is not included.

Documents (offline, real text): ``--docs N`` code documents (the standard library's largest top-level ``.py`` files)
and ``N`` prose documents (the standard library's ``.txt``/``.rst`` files outside test directories: IDLE's NEWS,
LICENSE, ...), each file tokenized alone, files joined with a blank line until a document has
``max(ctx) + chunk + 1`` tokens; no file is used twice. The JSON lists the files.

    # CPU check of the script (< 1 min): a tiny random Llama (head dim 64) with a byte tokenizer
    python benchmarks/kv_quality.py --dry-run --out-dir /tmp/kvq
    # the measurement -> results/kv_quality_<device>.json (CPU: hours at the defaults; see --ctx/--docs)
    python benchmarks/kv_quality.py
    python benchmarks/kv_quality.py --ctx 2048 --docs 1 --gen-tokens 32           # a small CPU run

Seeds (``--seeds``): the rotation signs and the QJL matrix come from ``KVCacheConfig.seed``; with several seeds every
rotated or QJL configuration runs once per seed (rows ``name seed=s``), a second table gives the mean increase over
the seeds with its min and max, and the goals are checked on the means.

Goals (issue #25): 4-bit at most +0.5% perplexity, 3-bit at most +2%, each better than the no-rotation baseline at
equal bits; the script prints whether the measured numbers meet them. One run, no repeats: differences of a few
tenths of a percent are within the spread one would see between document sets.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402

BASELINE = "fp"


def configs(group: int = 32, head_dim: int = 64) -> dict[str, dict[str, Any] | None]:
    """Name -> :class:`longkit.KVCacheConfig` options (without ``residual_length``); ``None`` = the baseline.
    ``cb<bits>``: the Gaussian codebook with one group (one fp16 RMS) per head of ``head_dim`` channels."""
    out: dict[str, dict[str, Any] | None] = {BASELINE: None,
                                              "k16v16": dict(key_bits=16, value_bits=16, rotate=False)}
    for b in (4, 3, 2):
        out[f"rot{b}"] = dict(key_bits=b, value_bits=b, group_size=group, rotate=True)
        out[f"rot{b}+qjl"] = dict(key_bits=b, value_bits=b, group_size=group, rotate=True, qjl=True)
        out[f"norot{b}"] = dict(key_bits=b, value_bits=b, group_size=group, rotate=False)
        out[f"kivi{b}"] = dict(key_bits=b, value_bits=b, group_size=group, key_axis="channel", rotate=False)
        out[f"cb{b}"] = dict(key_bits=b, value_bits=b, group_size=head_dim, rotate=True, codebook=True)
    # mixed widths: which of keys and values costs the quality at 3 bits
    out["k4v3"] = dict(key_bits=4, value_bits=3, group_size=group, rotate=True)
    out["k3v4"] = dict(key_bits=3, value_bits=4, group_size=group, rotate=True)
    out["rot4_keep0.5"] = dict(key_bits=4, value_bits=4, group_size=group, rotate=True, keep_channels=0.5)
    out["norot4_keep0.75"] = dict(key_bits=4, value_bits=4, group_size=16, rotate=False, keep_channels=0.75)
    return out


class ByteTokenizer:
    """Bytes as token ids (vocabulary 256), for the dry run's tiny random model."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


def load(dry_run: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the default model, or the dry run's tiny random Llama (same weights every run)."""
    if dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), ByteTokenizer()
    from longkit.models import load_default

    model, tok = load_default(dtype=dtype, device=device)
    tok.model_max_length = 1 << 30  # whole files are tokenized at once
    return model, tok


def _files(kind: str) -> list[Path]:
    std = Path(sysconfig.get_paths()["stdlib"])
    if kind == "code":
        found = [p for p in std.glob("*.py") if p.is_file()]
    else:
        skip = {"site-packages", "test", "tests", "idle_test"}
        found = [p for ext in ("*.txt", "*.rst") for p in std.rglob(ext)
                 if p.is_file() and not skip & set(p.relative_to(std).parts)]
    return sorted(found, key=lambda p: (-p.stat().st_size, str(p)))


def documents(tokenizer: Any, n_per_kind: int, need: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """``n_per_kind`` code and ``n_per_kind`` prose documents of at least ``need`` tokens (see the docstring)."""
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    std = Path(sysconfig.get_paths()["stdlib"])
    docs, desc = [], []
    for kind in ("code", "prose"):
        files = iter(_files(kind))
        for _ in range(n_per_kind):
            ids: list[int] = []
            names: list[str] = []
            for p in files:
                ids += (sep if ids else []) + tokenizer.encode(p.read_text(encoding="utf-8", errors="replace"),
                                                                 add_special_tokens=False)
                names.append(str(p.relative_to(std)))
                if len(ids) >= need:
                    break
            if len(ids) < need:
                raise SystemExit(f"the standard library ({std}) has too few {kind} tokens for {n_per_kind} documents "
                                 f"of {need} tokens; lower --docs or --ctx")
            docs.append(torch.tensor(ids[:need]))
            desc.append({"kind": kind, "files": names, "tokens": need})
    return docs, desc


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"`` (the results file's suffix)."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _cache(model: Any, cfg: Any, length: int) -> Any:
    """A fresh cache for one run: longkit's quantized cache, or the stock dynamic cache for the baseline."""
    if cfg is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from longkit.hf_patches.kv_cache import QuantizedKVCache

    return QuantizedKVCache(model.config, cfg, max_cache_len=length)


def _patch(model: Any, cfg: Any) -> None:
    import longkit

    longkit.remove_patches(model)
    if cfg is not None:
        longkit.apply_patches(model, kv_cache=cfg)


@torch.no_grad()
def chunk_nll(model: Any, ids: torch.Tensor, ctx: int, chunk: int, cfg: Any) -> float:
    """Summed loss of the ``chunk`` predictions of tokens ``[ctx + 1, ctx + chunk]`` after ``[0, ctx)`` went through
    the cache in chunks (``ids`` holds at least ``ctx + chunk + 1`` tokens)."""
    ids = ids[None].to(model.device)
    cache = _cache(model, cfg, ctx + chunk)
    for s in range(0, ctx, chunk):
        model(input_ids=ids[:, s:min(s + chunk, ctx)], past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = model(input_ids=ids[:, ctx:ctx + chunk], past_key_values=cache, use_cache=True).logits
    return float(F.cross_entropy(logits[0].float(), ids[0, ctx + 1:ctx + chunk + 1], reduction="sum"))


@torch.no_grad()
def greedy(model: Any, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens after ``prompt`` (EOS off, so every run has ``n``)."""
    out = model.generate(prompt[None].to(model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, prompt.numel():].cpu()


def bytes_row(cfg: Any, model: Any) -> dict[str, Any]:
    from longkit.hf_patches.kv_cache.cache import model_head_dim
    from longkit.kernels.kv_quant import bytes_per_token

    d, h = model_head_dim(model.config), model.config.num_key_value_heads
    full = 4 * d * h
    per = full if cfg is None else bytes_per_token(cfg.spec(), d, h)
    return {"B/tok/layer": per, "x_bf16": full / per, "bits/value": 8 * per / (2 * d * h)}


def run_config(name: str, opts: dict[str, Any] | None, model: Any, docs: list[torch.Tensor], args: argparse.Namespace,
               ref_tokens: list[torch.Tensor] | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Perplexities and generations of one configuration: one table row (and its generated tokens)."""
    from longkit.config import KVCacheConfig

    cfg = None if opts is None else KVCacheConfig(**opts, residual_length=args.residual)
    _patch(model, cfg)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"config": name, "options": opts, **bytes_row(cfg, model)}
    for L in args.ctx:
        nll = sum(chunk_nll(model, d, L, args.chunk, cfg) for d in docs)
        mean = nll / (len(docs) * args.chunk)
        row[f"ppl@{L}"] = math.inf if mean > 700 else math.exp(mean)
    t1 = time.perf_counter()
    gens = [greedy(model, d[:args.gen_prompt], args.gen_tokens) for d in docs] if args.gen_tokens else []
    if ref_tokens is not None and gens:
        same = torch.stack([a == b for a, b in zip(gens, ref_tokens)]).float()  # [docs, n]
        first = [int(s.argmin()) if not s.all() else args.gen_tokens for s in same]
        row.update({"agree": float(same.mean()), "first_diff": sum(first) / len(first)})
    row.update({"ppl_s": t1 - t0, "gen_s": time.perf_counter() - t1})
    _patch(model, None)
    print(f"[{name}] " + "  ".join(f"ppl@{L} {row[f'ppl@{L}']:.4f}" for L in args.ctx)
          + (f"  agree {row['agree']:.3f} first_diff {row['first_diff']:.1f}" if "agree" in row else "")
          + f"  ({row['ppl_s']:.0f} s + {row['gen_s']:.0f} s)", flush=True)
    return row, gens


def _seeded(opts: dict[str, Any] | None) -> bool:
    """Whether a configuration depends on the seed (a rotation or a QJL sketch)."""
    return opts is not None and bool(opts.get("rotate", True) or opts.get("qjl"))


def seed_means(rows: list[dict[str, Any]], ctx: list[int]) -> dict[str, dict[str, Any]]:
    """Per configuration: perplexities and their increase averaged over its seeds (one row: itself), with the
    min-max of the increase and the seeds that went in."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("base_config", r["config"]), []).append(r)
    out = {}
    for name, rs in groups.items():
        m: dict[str, Any] = {"config": name, "seeds": [r.get("seed") for r in rs]}
        for L in ctx:
            m[f"ppl@{L}"] = sum(r[f"ppl@{L}"] for r in rs) / len(rs)
            d = [r[f"dppl@{L}"] for r in rs]
            m[f"dppl@{L}"], m[f"dppl@{L}_min"], m[f"dppl@{L}_max"] = sum(d) / len(d), min(d), max(d)
        out[name] = m
    return out


def goals(rows: list[dict[str, Any]], ctx: list[int]) -> list[str]:
    """The issue's goals checked on the measured rows, averaged over seeds (one line each)."""
    by = seed_means(rows, ctx)
    lines = []
    for bits, limit in ((4, 0.5), (3, 2.0)):
        for name in (f"rot{bits}", f"rot{bits}+qjl", f"cb{bits}"):
            if name in by:
                worst = max(by[name][f"dppl@{L}"] for L in ctx)
                lines.append(f"{name}: worst ppl increase {worst:+.3f}% (goal <= {limit}%): "
                             + ("met" if worst <= limit else "NOT met"))
    for bits in (4, 3, 2):
        for base in (f"norot{bits}", f"kivi{bits}"):
            if f"rot{bits}" in by and base in by:
                better = all(by[f"rot{bits}"][f"ppl@{L}"] < by[base][f"ppl@{L}"] for L in ctx)
                lines.append(f"rot{bits} vs {base}: " + ("lower perplexity at every context" if better else
                                                         "NOT lower at every context"))
    return lines


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(configs())
    ap.add_argument("--configs", nargs="+", choices=names, default=names, help="configurations (the baseline always)")
    ap.add_argument("--ctx", type=int, nargs="+", help="context lengths (default 2048 4096 8192; dry run 32 64)")
    ap.add_argument("--chunk", type=int, help="prefill and scored chunk in tokens (default 256; dry run 32)")
    ap.add_argument("--residual", type=int, help="full-precision window in tokens (default 128; dry run 8)")
    ap.add_argument("--docs", type=int, help="documents per kind, code and prose (default 2; dry run 1)")
    ap.add_argument("--gen-prompt", type=int, help="prompt tokens of the greedy runs (default 2048; dry run 32)")
    ap.add_argument("--gen-tokens", type=int, help="greedy tokens per document (default 64; dry run 4; 0 = none)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="rotation / QJL seeds: every quantized configuration runs once per seed (the spread between "
                         "seeds is part of the result); the goals use the mean over seeds")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="model dtype (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--dry-run", action="store_true", help="tiny random Llama, byte tokenizer, small shapes: checks "
                                                           "the script in under a minute")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="results file name (default kv_quality_<device>)")
    args = ap.parse_args(argv)

    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    defaults = dict(ctx=[32, 64], chunk=32, residual=8, docs=1, gen_prompt=32, gen_tokens=4) if dry else \
        dict(ctx=[2048, 4096, 8192], chunk=256, residual=128, docs=2, gen_prompt=2048, gen_tokens=64)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ctx = sorted(set(args.ctx))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if min(*args.ctx, args.chunk, args.docs, args.gen_prompt) < 1 or min(args.residual, args.gen_tokens) < 0:
        raise SystemExit("--ctx, --chunk, --docs and --gen-prompt must be >= 1, --residual and --gen-tokens >= 0")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    model, tok = load(dry, device, dtype)
    model.generation_config.eos_token_id = None  # every greedy run produces --gen-tokens tokens
    need = max(max(args.ctx) + args.chunk + 1, args.gen_prompt)
    docs, desc = documents(tok, args.docs, need)
    tag = "cpu_dry_run" if dry else ("cpu" if device.type == "cpu" else gpu_tag(torch.cuda.get_device_name(0)))
    out_name = args.name or f"kv_quality_{tag}"
    print(f"{len(docs)} documents of {need} tokens; ctx {args.ctx}, chunk {args.chunk}, residual {args.residual}, "
          f"greedy {args.gen_tokens} tokens after {args.gen_prompt}; {args.dtype} on {device}", flush=True)
    chosen = [n for n in names if n == BASELINE or n in args.configs]
    extra = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "model": "tiny random Llama (dry run)" if dry else "SmolLM2-135M-Instruct (longkit default)",
             "documents": desc}
    rows: list[dict[str, Any]] = []
    ref_tokens: list[torch.Tensor] | None = None
    from longkit.hf_patches.kv_cache.cache import model_head_dim

    all_opts = configs(head_dim=model_head_dim(model.config))
    runs = [(name, seed) for name in chosen for seed in (args.seeds if _seeded(all_opts[name]) else [None])]
    for name, seed in runs:
        opts = all_opts[name] if seed is None else {**all_opts[name], "seed": seed}
        row, gens = run_config(name if seed is None or len(args.seeds) == 1 else f"{name} seed={seed}", opts, model,
                               docs, args, ref_tokens)
        row["base_config"], row["seed"] = name, seed
        if name == BASELINE:
            ref_tokens = gens
        for L in args.ctx:
            row[f"dppl@{L}"] = 100.0 * (row[f"ppl@{L}"] / rows[0][f"ppl@{L}"] - 1) if rows else 0.0
        rows.append(row)
        save_results(out_name, rows, extra, args.out_dir)  # a cut-short run keeps its rows
    cols = ["config", "B/tok/layer", "x_bf16", *(f"ppl@{L}" for L in args.ctx), *(f"dppl@{L}" for L in args.ctx)]
    print_table(rows, cols + (["agree", "first_diff"] if args.gen_tokens else []),
                title=f"quantized KV cache quality ({tag}; residual {args.residual}, chunk {args.chunk})")
    lines = goals(rows, args.ctx)
    if len(args.seeds) > 1:
        means = list(seed_means(rows, args.ctx).values())
        extra["seed_means"] = means
        print_table(means, ["config", *(f"dppl@{L}{k}" for L in args.ctx for k in ("", "_min", "_max"))],
                    title=f"mean over seeds {args.seeds} (min, max)")
    print("\n".join(["", "goals:"] + lines))
    extra["goals"] = lines
    return save_results(out_name, rows, extra, args.out_dir)


if __name__ == "__main__":
    main()
