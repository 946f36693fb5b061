"""Which change to the quantizer could bring 3-bit keys and values under +2% perplexity? A fast emulation of
``benchmarks/kv_quality.py``'s protocol with fake quantization (quantize -> dequantize in PyTorch), one forward per
document instead of a cache run per 256-token chunk.

The protocol's chunked prefill makes query chunk ``c`` (tokens ``[s_c, s_c + 256)``) read the keys and values older
than ``s_c - 128`` quantized and the rest in full precision. Quantization is per token (rotated groups), so one
forward over all tokens in which each query chunk attends to ``[quantized k/v before s_c - 128 | full k/v after]``
computes the same thing; ``ppl@L`` scores the chunk ``[L, L + 256)`` as the benchmark does. The baseline
reproduces the benchmark's ``fp`` row exactly; the rotation signs here come from another generator than
``KVQuantState``, so a variant's seed ``s`` is not the benchmark's seed ``s``.

Variants (``--variants``, default all): ``rot3`` (3-bit min/max groups of 32 after a randomized Hadamard rotation,
keys and values), ``cb3`` (3-bit Gaussian codebook, one group per head), ``rot3_mse`` / ``cb3_mse`` (each group's
range / scale chosen among a few shrink factors to minimise its squared error), ``rot3_bal`` (keys scaled per channel
by ``sqrt(rms_q / rms_k)`` from the first 256 tokens, queries by its inverse), ``*_sink4`` (the first 4 tokens kept
in full precision), ``k3_only`` / ``k3_layers{a}`` (3-bit keys only, in every layer / in layers ``a .. a+4``);
``@s`` suffix: another rotation seed.

    python research/kv_fake_quant.py --out research/results/kv_fake_quant_cpu.txt   # CPU: ~45 s per variant
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import kv_quality  # noqa: E402

from longkit.kernels.kv_quant import naive as N  # noqa: E402

CHUNK, RESIDUAL = 256, 128


def _signs(heads: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (heads, d), generator=g) * 2 - 1).float()


def _minmax(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    c, s, z = N.quantize_groups(x, bits, g)
    return N.dequantize_groups(c, s, z, g)


def _codebook(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    c, s = N.quantize_codebook(x, bits, g)
    return N.dequantize_codebook(c, s, bits, g)


def _best_of(candidates: list[torch.Tensor], xg: torch.Tensor) -> torch.Tensor:
    """Per group, the candidate with the least squared error."""
    err = torch.stack([(c - xg).square().sum(-1) for c in candidates])  # [n, ..., groups]
    pick = err.argmin(0)
    return torch.stack(candidates).gather(0, pick[None, ..., None].expand(1, *xg.shape))[0]


def _minmax_mse(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    xg = x.unflatten(-1, (x.shape[-1] // g, g))
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    mid, half, levels = (lo + hi) / 2, (hi - lo) / 2, 2 ** bits - 1
    cands = []
    for a in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        z = (mid - a * half).half().float()
        s = (2 * a * half / levels).half().float().clamp(min=1e-8)
        cands.append(((xg - z) / s + 0.5).floor().clamp(0, levels) * s + z)
    return _best_of(cands, xg).flatten(-2)


def _codebook_mse(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    xg = x.unflatten(-1, (x.shape[-1] // g, g))
    cents, bounds = N.codebook_tensors(bits, x.device)
    rms = xg.square().mean(-1, keepdim=True).sqrt()
    cands = []
    for a in (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2):
        s = (rms * a).half().float().clamp(min=1e-12)
        cands.append(cents[((xg / s).unsqueeze(-1) > bounds).sum(-1)] * s)
    return _best_of(cands, xg).flatten(-2)


QUANTIZERS = {"minmax": (_minmax, 32), "codebook": (_codebook, 64), "minmax_mse": (_minmax_mse, 32),
              "codebook_mse": (_codebook_mse, 64)}


def variants() -> dict[str, dict]:
    base = {"rot3": dict(q="minmax"), "cb3": dict(q="codebook"), "rot3_mse": dict(q="minmax_mse"),
            "cb3_mse": dict(q="codebook_mse"), "rot3_bal": dict(q="minmax", balance=True),
            "rot3_sink4": dict(q="minmax", sink=4), "cb3_sink4": dict(q="codebook", sink=4),
            "k3_only": dict(q="minmax", values=False)}
    out = {"fp": None, **base}
    for name in ("rot3", "cb3", "rot3_sink4", "cb3_sink4"):
        out[f"{name}@1"] = dict(base[name], seed=1)
    out["rot3@2"] = dict(base["rot3"], seed=2)
    for a in range(0, 30, 5):
        out[f"k3_layers{a}"] = dict(q="minmax", values=False, layers=range(a, a + 5))
    return out


def fake_quant(x: torch.Tensor, signs: torch.Tensor, q: str) -> torch.Tensor:
    """``x [B, Hkv, T, D]``: rotate, quantize to 3 bits, dequantize, rotate back."""
    fn, g = QUANTIZERS[q]
    return N.unrotate(fn(N.rotate(x.float(), signs), 3, g), signs).to(x.dtype)


ACTIVE: dict = {}


def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):  # noqa: ANN001, ANN201, ARG001
    """Every query chunk over ``[quantized k/v older than its start - RESIDUAL | full-precision k/v]``, causal."""
    opt, li = ACTIVE.get("opt"), module.layer_idx
    hkv, group = k.shape[1], q.shape[1] // k.shape[1]
    kq, vq = k, v
    if opt is not None and li in opt.get("layers", range(10**6)):
        seed = opt.get("seed", 0) * 7919
        ks, vs = _signs(hkv, k.shape[-1], 1000 + li + seed), _signs(hkv, v.shape[-1], 2000 + li + seed)
        if opt.get("balance"):  # k·s and q/s leave q·k unchanged; s from the first chunk's channel RMS
            qg = q[0, :, :CHUNK].float().reshape(hkv, group, -1, q.shape[-1]).flatten(1, 2)
            s = (qg.square().mean(1).sqrt() / k[0, :, :CHUNK].float().square().mean(1).sqrt().clamp(min=1e-6)).sqrt()
            s = (s / s.square().mean(-1, keepdim=True).sqrt())[None, :, None, :]
            kq = (fake_quant(k * s, ks, opt["q"]) / s).to(k.dtype)
        else:
            kq = fake_quant(k, ks, opt["q"])
        if opt.get("values", True):
            vq = fake_quant(v, vs, opt["q"])
        n = opt.get("sink", 0)
        if n:
            kq, vq = torch.cat([k[:, :, :n], kq[:, :, n:]], 2), torch.cat([v[:, :, :n], vq[:, :, n:]], 2)
    k2, v2, kq2, vq2 = (t.repeat_interleave(group, 1) for t in (k, v, kq, vq))
    T, outs = q.shape[2], []
    for s in range(0, T, CHUNK):
        e, b = min(s + CHUNK, T), max(0, s - RESIDUAL)
        keys = torch.cat([kq2[:, :, :b], k2[:, :, b:e]], 2)
        vals = torch.cat([vq2[:, :, :b], v2[:, :, b:e]], 2)
        visible = torch.ones(e - s, e, dtype=torch.bool).tril(diagonal=s)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], keys, vals, attn_mask=visible, scale=scaling))
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--docs", type=int, default=2, help="documents per kind (code, prose)")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the printed lines to this file")
    args = ap.parse_args()
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("kv_fake_quant", attention)
    AttentionMaskInterface.register("kv_fake_quant", sdpa_mask)
    model, tok = kv_quality.load(False, torch.device("cpu"), torch.float32)
    model.set_attn_implementation("kv_fake_quant")
    need = max(args.ctx) + CHUNK + 1
    docs, _ = kv_quality.documents(tok, args.docs, need)
    table = variants()
    names = ["fp"] + [n for n in (args.variants or table) if n != "fp"]
    lines = [f"# {' '.join(sys.argv)}; {len(docs)} documents, torch {torch.__version__}"]
    print(lines[0], flush=True)
    base = None
    for name in names:
        ACTIVE["opt"] = table[name]
        t0 = time.perf_counter()
        nll = dict.fromkeys(args.ctx, 0.0)
        with torch.no_grad():
            for d in docs:
                logits = model(input_ids=d[None, :need - 1]).logits[0]
                for L in args.ctx:
                    nll[L] += float(F.cross_entropy(logits[L:L + CHUNK], d[L + 1:L + CHUNK + 1], reduction="sum"))
        ppl = {L: math.exp(nll[L] / (CHUNK * len(docs))) for L in args.ctx}
        base = base or ppl
        line = f"{name:14s} " + "  ".join(f"ppl@{L} {ppl[L]:.4f} ({100 * (ppl[L] / base[L] - 1):+.2f}%)"
                                          for L in args.ctx) + f"  [{time.perf_counter() - t0:.0f} s]"
        print(line, flush=True)
        lines.append(line)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
