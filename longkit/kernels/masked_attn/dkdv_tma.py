"""dk/dv of the masked attention backward on Hopper, with every load through a TMA tensor descriptor.

Same math as :func:`flash._dkdv_inner` (deterministic, one program per kv block and kv head, the GQA group's
query heads walked in one flat loop). Two differences from the pointer kernel in ``flash.py``:

* q, dO, lse, delta and the query mask table are loaded by TMA (``TensorDescriptor``): no address arithmetic or
  bounds masks in registers, and out-of-bounds rows come back as zeros;
* one loop covers every query block that sees the kv block and applies the elementwise mask on each (no
  masked / unmasked loop split). That costs a compare and a select per score and was measured cheaper than the
  split's extra loops.

H200, 16k, bf16, same run (``benchmarks/results/attention_sweep_h200_tma_dkdv.json``), with the tiles chosen here:
dk/dv 1.28-1.37x faster than the pointer kernel at hd 128 and 1.01-1.25x at hd 64, on every mask kind.

Warp specialisation (Triton 3.6's Hopper pass, ``tl.range(..., warp_specialize=True)``) was tried on this kernel
and removed: the first form hung on an H200, the second (k/v descriptors made in the kernel) finished but gave wrong
dk/dv (``docs/kernel_notes.md`` has the log).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .flash import _LOG2E, _interpreting, _kv_block_rows, _parse_cfg, _visible


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local", "BLK_OFF"])
def _bwd_dkdv_tma_kernel(
    q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, mq_desc, DK, DV, MK, mq_rows_per_b, s_mkb,
    Hq, Hkv, Tq, Tk, q_offset, n_global, n_local,
    sm_scale_log2, sm_scale, BLK_OFF,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    """Program ``(i, b * Hkv + hk)``: dk, dv of kv block ``BLK_OFF + i`` of kv head ``hk``, written to
    ``DK/DV [B, Hkv, Tk, HEAD_DIM]`` (contiguous).

    ``lse_desc`` / ``delta_desc``: ``[B * Hq, Tq]`` views, the log-sum-exp in base 2 with -inf (rows that see no
    key) replaced by +inf (p = 0 there). ``mq_desc``: the ``[Bm * 3, Tq]`` view of the query mask table,
    ``mq_rows_per_b`` = 3 (per-row tables) or 0 (one shared table). Row offsets of a 2-D descriptor may be
    anything, but TMA wants the innermost offset 16-byte aligned: hence 2-D views, not flat 1-D ones."""
    pid_n = tl.program_id(0) + BLK_OFF
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    _, _, _, m_start, m_end = _kv_block_rows(MK, b.to(tl.int64) * s_mkb, start_n, start_n + BLOCK_N - 1, Tq, Tk,
                                             q_offset, n_global, n_local, BLOCK_M, HAS_WINDOW, HAS_DOCS,
                                             HAS_PREFIX)
    n_m = m_end - m_start
    n_div = tl.maximum(n_m, 1)  # the pipeliner evaluates iterations it will not run: never divide by 0
    mrow = b * mq_rows_per_b
    for it in tl.range(0, GROUP * n_m):
        if GROUP == 1:
            g = 0
            mb = m_start + it
        else:
            g = it // n_div
            mb = m_start + it - g * n_div
        h = hk * GROUP + g
        start_m = mb * BLOCK_M
        q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        row = b * Hq + h
        offs_m = start_m + offs_m0
        lse = lse_desc.load([row, start_m]).reshape(BLOCK_M)
        delta = delta_desc.load([row, start_m]).reshape(BLOCK_M)
        st = tl.dot(k, tl.trans(q)) * sm_scale_log2  # [BLOCK_N, BLOCK_M]
        pos = q_offset + offs_m
        if HAS_DOCS:
            lo_r = mq_desc.load([mrow, start_m]).reshape(BLOCK_M)
        else:
            lo_r = offs_m0 * 0
        if HAS_PREFIX:
            hlo_r = mq_desc.load([mrow + 1, start_m]).reshape(BLOCK_M)
            hhi_r = mq_desc.load([mrow + 2, start_m]).reshape(BLOCK_M)
        else:
            hlo_r = offs_m0 * 0
            hhi_r = offs_m0 * 0
        vis = _visible(pos[None, :], offs_n[:, None], lo_r[None, :], hlo_r[None, :], hhi_r[None, :],
                       n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
        # rows past Tq load zeros (TMA pads out-of-bounds reads); masked anyway
        st = tl.where(vis & (offs_m[None, :] < Tq), st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)

    msk = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    out = (bh.to(tl.int64) * Tk + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=msk)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=msk)


def _aligned(t: torch.Tensor) -> bool:
    """TMA's constraints: 16-byte aligned base and strides, unit stride in the last dimension (and no stride-0
    broadcast dimension)."""
    e = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all((s * e) % 16 == 0 and (s > 0 or n == 1) for s, n in zip(t.stride()[:-1], t.shape[:-1])))


def tma_dkdv_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether the TMA dk/dv runs: by default on Hopper (sm_90) at head dims 64 and 128 (measured and GPU-tested)
    and under the interpreter (tests) at 16, 32, 64 and 128, when every input meets TMA's alignment; else the
    pointer kernel runs. Other head dims would need a zero-padded TMA box (not built). ``LONGKIT_ATTN_TMA_DKDV=0``
    turns it off; ``=1`` turns it on for 16/32/64/128 on any GPU and raises if the inputs cannot use it."""
    env = os.environ.get("LONGKIT_ATTN_TMA_DKDV")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"LONGKIT_ATTN_TMA_DKDV must be 0 or 1, got {env!r}")
    if env == "0":
        return False
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        if env == "1":
            raise ValueError(f"LONGKIT_ATTN_TMA_DKDV=1 but head dim {D} is not one of 16, 32, 64, 128; unset it to "
                             "use the pointer kernel")
        return False
    if not all(_aligned(t) for t in (q, k, v, grad_out)):
        if env == "1":
            raise ValueError("LONGKIT_ATTN_TMA_DKDV=1 but q/k/v/grad_out are not TMA-aligned (16-byte base and "
                             "strides, contiguous last dim); unset it to use the pointer kernel")
        return False
    if env == "1" or _interpreting():
        return True
    # by default only where it was measured and GPU-tested: Hopper, head dims 64 and 128
    return D in (64, 128) and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9


def tma_dkdv_config(head_dim: int, flags: dict[str, bool]) -> dict[str, int]:
    """Tiles, from a same-run H200 sweep at 16k (``attention_sweep_h200_tma_dkdv.json``): hd 128 takes 3 pipeline
    stages except with a window (2 were 3% faster there); hd 64 a 32-row query tile on 4 warps.
    ``LONGKIT_ATTN_TMA_DKDV_CONFIG="BM,BN,warps,stages"`` overrides (tuning, tests)."""
    env = os.environ.get("LONGKIT_ATTN_TMA_DKDV_CONFIG")
    if env:
        return _parse_cfg(env)
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if head_dim <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2 if flags["HAS_WINDOW"] else 3}


def _rows_2d(t: torch.Tensor, rows: int, cols: int, fill: float | int = 0) -> torch.Tensor:
    """``t`` as a ``[rows, cols]`` tensor whose row stride is a multiple of 16 bytes (TMA), copied only when
    ``cols`` needs padding."""
    per16 = 16 // t.element_size()
    pad = -cols % per16
    t2 = t.reshape(rows, cols)
    if pad == 0:
        return t2
    out = torch.full((rows, cols + pad), fill, dtype=t.dtype, device=t.device)
    out[:, :cols] = t2
    return out[:, :cols]


def _desc_2d(t: torch.Tensor, block_cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_cols])


def launch_tma_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                   delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, meta_q: torch.Tensor,
                   meta_k: torch.Tensor, s_mkb: int, q_offset: int, n_global: int, n_local: int,
                   scale: float, flags: dict[str, bool], blk_off: int, cfg: dict[str, int]) -> object:
    """dk, dv of kv blocks ``blk_off..`` into contiguous ``dk``/``dv`` (``[B, Hkv, Tk, D]``). ``lse``: the
    forward's (natural log, ``[B, Hq, Tq]``); ``delta`` ``[B, Hq, Tq]`` contiguous; ``meta_q`` as from
    :func:`flash.build_mask_tables`."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = max(16, triton.next_power_of_2(D))
    qd = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, bm, block_d])
    dod = TensorDescriptor(grad_out, list(grad_out.shape), list(grad_out.stride()), [1, 1, bm, block_d])
    kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, block_d])
    vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, block_d])
    lse2 = torch.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    lse_d = _desc_2d(_rows_2d(lse2, B * Hq, Tq), bm)
    delta_d = _desc_2d(_rows_2d(delta, B * Hq, Tq), bm)
    has_mq = flags["HAS_DOCS"] or flags["HAS_PREFIX"]
    if has_mq:
        mq_d = _desc_2d(_rows_2d(meta_q, meta_q.shape[0] * 3, Tq), bm)
    else:
        mq_d = lse_d  # placeholder, never read
    n_blk = triton.cdiv(Tk, bn) - blk_off
    return _bwd_dkdv_tma_kernel[(n_blk, B * Hkv)](
        qd, kd, vd, dod, lse_d, delta_d, mq_d, dk, dv, meta_k, 3 if has_mq and meta_q.shape[0] > 1 else 0, s_mkb,
        Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * _LOG2E, scale, blk_off,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, HAS_WINDOW=flags["HAS_WINDOW"],
        HAS_DOCS=flags["HAS_DOCS"], HAS_PREFIX=flags["HAS_PREFIX"], **cfg,
    )
