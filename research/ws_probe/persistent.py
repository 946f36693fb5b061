"""Probe: a persistent warp-specialised causal forward (one program per SM walking query-block tiles) against the
shipped specialised forward (``fwd_ws.py``, one program per tile) and cuDNN SDPA, hd 128, bf16, one run.

Why: at hd 128 × 4k the shipped kernel is at 0.82-0.88x cuDNN; the profile put the rest of the gap in the per-tile
prologue / epilogue, which a persistent kernel whose producer warp loads the next tile's q during the current
epilogue (cuDNN's scheme) can hide. Triton 3.6 specialises a persistent loop either as a whole (``outer``: the
producer runs ahead across tiles; ``flatten`` fuses the two loops) or only the inner kv loop (``inner``).

The ``paired`` order won at short lengths and now ships as ``fwd_ws._fwd_ws_paired_kernel`` (the default up to
4k); this probe keeps its own copy so that the four orders stay comparable in one script.

Each variant runs in its own process under a time limit (specialised kernels have hung on this GPU), is checked
against the shipped kernel's output, then timed.

    python research/ws_probe/persistent.py --out-dir research/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from longkit.kernels.masked_attn.fwd_ws import _ws_inner, _ws_store  # noqa: E402
from longkit.kernels.masked_attn.tma_ws import ensure_allocator, flat_rows_desc  # noqa: E402

# (specialise the tile loop, specialise the kv loop, flatten the two, deal out (i, n-1-i) query-block pairs)
VARIANTS = {"outer": (True, False, False, False), "outer_flatten": (True, False, True, False),
            "inner": (False, True, False, False), "paired": (True, False, False, True)}


@triton.jit
def _persistent_fwd(Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, sm_scale_log2, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OUTER_WS: tl.constexpr,
                    INNER_WS: tl.constexpr, FLATTEN: tl.constexpr, PAIRED: tl.constexpr):
    """Causal forward (q_offset 0). Tiles head-major, each head's heavy query blocks first, dealt round-robin; or,
    ``PAIRED``, pairs of query blocks (n-1-i, i) of one head (each pair costs n+1 kv blocks, so every program's
    share is equal to within one pair; needs an even number of query blocks), dealt round-robin."""
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    half = n_m // 2
    if PAIRED:
        lo, hi, step = 0, 2 * tl.cdiv(B * Hq * half - pid, n_prog), 1
    else:
        lo, hi, step = pid, n_m * B * Hq, n_prog
    for tile in tl.range(lo, hi, step, warp_specialize=OUTER_WS, flatten=FLATTEN):
        if PAIRED:
            pair = pid + (tile // 2) * n_prog
            bh = pair // half
            i = pair - bh * half
            pid_m = tl.where(tile % 2 == 0, n_m - 1 - i, i)
        else:
            bh = tile // n_m
            pid_m = n_m - 1 - (tile - bh * n_m)
        kv_row0 = ((bh // Hq) * Hkv + (bh % Hq) // GROUP) * Tk
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lim = tl.minimum(offs_m, Tk - 1)
        q = q_desc.load([bh * Tq + start_m, 0])
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # the shipped kernel's kv loop (specialised here only for the "inner" variant) and epilogue
        acc, l_i, m_i = _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, lim, sm_scale_log2, 0,
                                  tl.cdiv(tl.minimum(Tk, start_m + BLOCK_M), BLOCK_N), HEAD_DIM, BLOCK_N, INNER_WS)
        _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM)


def one(variant: str, T: int, B: int, H: int, D: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longkit.kernels.masked_attn.launch import flash_masked_attention_fwd

    ensure_allocator()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = D ** -0.5
    row = {"variant": variant, "T": T, "B": B, "H": H, "D": D}

    def shipped():  # noqa: ANN202
        return flash_masked_attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, scale)

    if variant == "shipped":
        fn = shipped
    elif variant == "sdpa_cudnn":
        def fn():  # noqa: ANN202
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), None
    else:
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, device="cuda", dtype=torch.float32)
        n_sm = torch.cuda.get_device_properties(0).multi_processor_count
        ow, iw, fl, paired = VARIANTS[variant]
        if paired and triton.cdiv(T, 128) % 2:
            raise ValueError("the paired order needs an even number of 128-row query blocks")

        def fn():  # noqa: ANN202
            _persistent_fwd[(n_sm,)](q, k, v, out, lse, B, H, H, T, T, scale * 1.4426950408889634, GROUP=1,
                                     HEAD_DIM=D, BLOCK_M=128, BLOCK_N=128, OUTER_WS=ow, INNER_WS=iw, FLATTEN=fl,
                                     PAIRED=paired,
                                     num_warps=4, num_stages=2)
            return out, lse
    got = fn()
    torch.cuda.synchronize()
    ref = shipped()
    row["rel_err_out"] = ((got[0].float() - ref[0].float()).abs().max() / ref[0].float().abs().max()).item()
    if got[1] is not None:
        row["rel_err_lse"] = ((got[1] - ref[1]).abs().max() / ref[1].abs().max()).item()
    row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")
    row["tflops"] = 4.0 * D * B * H * T * (T + 1) / 2 / row["ms"] / 1e9
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--variants", nargs="+", default=["shipped", "sdpa_cudnn", *VARIANTS])
    ap.add_argument("--timeout", type=int, default=90)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        v, T = args.one.split(":")
        T = int(T)
        print(json.dumps(one(v, T, max(1, 65536 // T), 32, 128)))
        return
    rows = []
    for T in args.seqlens:
        for v in args.variants:
            try:
                p = subprocess.run([sys.executable, __file__, "--one", f"{v}:{T}"], capture_output=True, text=True,
                                   timeout=args.timeout)
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"variant": v, "T": T,
                                                           "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"variant": v, "T": T, "error": f"timed out after {args.timeout} s (hang?)"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "ws_persistent_probe_h200.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
             "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
