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

``_bwd_dkdv_ws_kernel`` is the same step under Triton 3.6's Hopper warp specialisation (``tl.range(...,
warp_specialize=True)``: a producer warp issues the loads). Session 7's specialised forms, with 4-D descriptors in the
loop, hung or gave wrong dk/dv on an H200; this one uses 2-D descriptors over flattened rows, made in the kernel, and
``[1, BLOCK_M]`` row tables, and matches the plain kernel bit for bit. It is the hd 128 default for causal / GQA / Λ
(backward 1.02-1.06x, ``attention_sweep_h200_ws_dkdv_16k.json``; ``docs/kernel_notes.md`` has the log).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .flash import _LOG2E, _interpreting, _kv_block_rows, _parse_cfg, _visible
from .tma_ws import ensure_allocator, flat_rows_desc, ws_switch


@triton.jit
def _query_blocks(MK, mkbase, start_n, Tq, Tk, q_offset, n_global, n_local, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """The query blocks ``[m_start, m_start + n_m)`` that see kv block ``start_n``, and ``max(n_m, 1)``."""
    _, _, _, m_start, m_end = _kv_block_rows(MK, mkbase, start_n, start_n + BLOCK_N - 1, Tq, Tk, q_offset, n_global,
                                             n_local, BLOCK_M, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    n_m = m_end - m_start
    return m_start, n_m, tl.maximum(n_m, 1)  # the pipeliner evaluates iterations it will not run: never divide by 0


@triton.jit
def _group_block(it, m_start, n_div, GROUP: tl.constexpr):
    """Iteration ``it`` of the flat (query head of the group, query block) loop: the head's index in the group and
    the query block."""
    if GROUP == 1:
        g = 0
        mb = m_start + it
    else:
        g = it // n_div
        mb = m_start + it - g * n_div
    return g, mb


@triton.jit
def _dkdv_finish(dk, dv, st, v, q, do, lse, delta, pos, lo_r, hlo_r, hhi_r, offs_m, offs_n, Tq, n_global, n_local,
                 HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """The rest of one (kv block, query block) step once ``st = k qᵀ`` (log2 units) is issued: mask, P, dv, dP,
    dk. ``lse``, ``delta``, ``pos`` and the query mask rows are ``[1, BLOCK_M]``."""
    vis = _visible(pos, offs_n[:, None], lo_r, hlo_r, hhi_r, n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    # query rows past Tq come back as zeros (or, from flattened descriptors, the next head's rows): masked
    st = tl.where(vis & (offs_m[None, :] < Tq), st, float("-inf"))
    pt = tl.math.exp2(st - lse)
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta)
    dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


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
    m_start, n_m, n_div = _query_blocks(MK, b.to(tl.int64) * s_mkb, start_n, Tq, Tk, q_offset, n_global, n_local,
                                        BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    mrow = b * mq_rows_per_b
    for it in tl.range(0, GROUP * n_m):
        g, mb = _group_block(it, m_start, n_div, GROUP)
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
        dk, dv = _dkdv_finish(dk, dv, st, v, q, do, lse[None, :], delta[None, :], pos[None, :], lo_r[None, :],
                              hlo_r[None, :], hhi_r[None, :], offs_m, offs_n, Tq, n_global, n_local,
                              HAS_WINDOW, HAS_DOCS, HAS_PREFIX)

    msk = (offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    out = (bh.to(tl.int64) * Tk + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=msk)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=msk)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local", "BLK_OFF"])
def _bwd_dkdv_ws_kernel(
    Q, K, V, DO, LSE2, DELTA2, MQ2, DK, DV, MK, s_l, s_mq, n_mq_rows, mq_rows_per_b, s_mkb,
    B, Hq, Hkv, Tq, Tk, q_offset, n_global, n_local,
    sm_scale_log2, sm_scale, BLK_OFF,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    """:func:`_bwd_dkdv_tma_kernel` under Triton's Hopper warp specialisation (a producer warp feeds the two
    consumer warpgroups). The pass needs descriptors made in the kernel and hangs or miscomputes with 4-D or
    reshaped ones (``tma_ws.py``, ``docs/kernel_notes.md``), so q/dO/k/v are 2-D views of contiguous
    ``[B, H, T, HEAD_DIM]`` tensors (rows past a head's end are the next head's: masked, as rows past Tq are),
    and ``LSE2`` / ``DELTA2`` / ``MQ2`` 2-D row tables (row stride ``s_l`` / ``s_mq``) read as ``[1, BLOCK_M]``."""
    pid_n = tl.program_id(0) + BLK_OFF
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    do_desc = flat_rows_desc(DO, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    lse_desc = tl.make_tensor_descriptor(LSE2, shape=[B * Hq, Tq], strides=[s_l, 1], block_shape=[1, BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA2, shape=[B * Hq, Tq], strides=[s_l, 1], block_shape=[1, BLOCK_M])
    mq_desc = tl.make_tensor_descriptor(MQ2, shape=[n_mq_rows, Tq], strides=[s_mq, 1], block_shape=[1, BLOCK_M])
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m0 = tl.arange(0, BLOCK_M)
    k = k_desc.load([bh * Tk + start_n, 0])
    v = v_desc.load([bh * Tk + start_n, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_start, n_m, n_div = _query_blocks(MK, b.to(tl.int64) * s_mkb, start_n, Tq, Tk, q_offset, n_global, n_local,
                                        BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    mrow = b * mq_rows_per_b
    for it in tl.range(0, GROUP * n_m, warp_specialize=True):
        g, mb = _group_block(it, m_start, n_div, GROUP)
        row = b * Hq + hk * GROUP + g
        start_m = mb * BLOCK_M
        q = q_desc.load([row * Tq + start_m, 0])
        do = do_desc.load([row * Tq + start_m, 0])
        lse = lse_desc.load([row, start_m])
        delta = delta_desc.load([row, start_m])
        offs_m = start_m + offs_m0
        st = tl.dot(k, tl.trans(q)) * sm_scale_log2
        zero = offs_m0[None, :] * 0
        lo_r = mq_desc.load([mrow, start_m]) if HAS_DOCS else zero
        hlo_r = mq_desc.load([mrow + 1, start_m]) if HAS_PREFIX else zero
        hhi_r = mq_desc.load([mrow + 2, start_m]) if HAS_PREFIX else zero
        dk, dv = _dkdv_finish(dk, dv, st, v, q, do, lse, delta, (q_offset + offs_m)[None, :], lo_r, hlo_r, hhi_r,
                              offs_m, offs_n, Tq, n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)

    msk = offs_n[:, None] < Tk
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


def ws_dkdv_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                    flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised TMA dk/dv (``_bwd_dkdv_ws_kernel``) runs instead of the plain TMA one. It takes
    contiguous aligned q/k/v/dO, head dims 16-128, and every mask but shared prefix and documents with a window
    (Triton's warp-specialisation pass fails to compile those two). By default: Hopper, head dim 128, causal /
    GQA / Λ (with or without the distance limit), where an H200 sweep at 16k measured the backward 1.02-1.06x
    faster (documents 1.00x, hd 64 mostly slower; ``attention_sweep_h200_ws_dkdv_16k.json``).
    ``LONGKIT_ATTN_WS_DKDV``: see :func:`tma_ws.ws_switch`."""
    problem = None
    if flags["HAS_PREFIX"] or (flags["HAS_DOCS"] and flags["HAS_WINDOW"]):
        problem = ("the mask has a shared prefix, or documents with a window (Triton's warp-specialisation pass "
                   "fails there)")
    return ws_switch("LONGKIT_ATTN_WS_DKDV", problem, (q, k, v, grad_out), "q/k/v/grad_out", "the plain TMA dk/dv",
                     q.shape[-1] == 128 and not flags["HAS_DOCS"])


def ws_dkdv_config(head_dim: int, tma_cfg: dict[str, int]) -> dict[str, int]:
    """Tiles of the warp-specialised dk/dv; the kv tile must be the plain TMA kernel's (the distance limit's sink
    launch is sized by it). ``LONGKIT_ATTN_WS_DKDV_CONFIG="BM,BN,warps,stages"`` overrides (tuning)."""
    env = os.environ.get("LONGKIT_ATTN_WS_DKDV_CONFIG")
    if env:
        cfg = _parse_cfg(env)
        if cfg["BLOCK_N"] != tma_cfg["BLOCK_N"]:
            raise ValueError(f"LONGKIT_ATTN_WS_DKDV_CONFIG kv tile {cfg['BLOCK_N']} must equal the TMA dk/dv's "
                             f"({tma_cfg['BLOCK_N']})")
        return cfg
    if _interpreting():
        return dict(tma_cfg)
    # 4 warps (the pass adds the producer warp); at hd 128 two stages were fastest on every mask of the sweep
    if head_dim > 64:
        return {**tma_cfg, "num_warps": 4, "num_stages": 2}
    return {**tma_cfg, "num_warps": 4}


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
    # lse in base 2, -inf (rows that see no key) as +inf so that p = 0; row tables with 16-byte aligned rows
    lse_r = _rows_2d(torch.where(lse == float("-inf"), float("inf"), lse * _LOG2E), B * Hq, Tq)
    delta_r = _rows_2d(delta, B * Hq, Tq)
    has_mq = flags["HAS_DOCS"] or flags["HAS_PREFIX"]
    mq_r = _rows_2d(meta_q, meta_q.shape[0] * 3, Tq) if has_mq else lse_r  # placeholder, never read
    mq_rows_per_b = 3 if has_mq and meta_q.shape[0] > 1 else 0
    grid = (triton.cdiv(Tk, bn) - blk_off, B * Hkv)
    mask_flags = {"HAS_WINDOW": flags["HAS_WINDOW"], "HAS_DOCS": flags["HAS_DOCS"], "HAS_PREFIX": flags["HAS_PREFIX"]}
    if ws_dkdv_enabled(q, k, v, grad_out, flags):
        if q.is_cuda:
            ensure_allocator()
        return _bwd_dkdv_ws_kernel[grid](
            q, k, v, grad_out, lse_r, delta_r, mq_r, dk, dv, meta_k, lse_r.stride(0), mq_r.stride(0), mq_r.shape[0],
            mq_rows_per_b, s_mkb, B, Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * _LOG2E, scale,
            blk_off, GROUP=Hq // Hkv, HEAD_DIM=D, **mask_flags, **ws_dkdv_config(D, cfg),
        )
    block_d = max(16, triton.next_power_of_2(D))
    qd = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, bm, block_d])
    dod = TensorDescriptor(grad_out, list(grad_out.shape), list(grad_out.stride()), [1, 1, bm, block_d])
    kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, block_d])
    vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, block_d])
    lse_d, delta_d, mq_d = (_desc_2d(t, bm) for t in (lse_r, delta_r, mq_r))
    return _bwd_dkdv_tma_kernel[grid](
        qd, kd, vd, dod, lse_d, delta_d, mq_d, dk, dv, meta_k, mq_rows_per_b, s_mkb,
        Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * _LOG2E, scale, blk_off,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, **mask_flags, **cfg,
    )
