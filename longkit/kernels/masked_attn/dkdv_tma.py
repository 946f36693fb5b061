"""dk/dv kernels of the masked attention backward for Hopper, with every load through a TMA tensor descriptor.

Same math as the pointer dk/dv (:func:`bwd._dkdv_inner`: deterministic, one program per kv block and kv head, the GQA
group's query heads walked in one flat loop). Two differences from the pointer kernel:

* q, dO, lse, delta and the query mask table are loaded by TMA: no address arithmetic or bounds masks in registers,
  and out-of-bounds rows come back as zeros;
* one loop covers every query block that sees the kv block and applies the elementwise mask on each (no
  masked / unmasked loop split). That costs a compare and a select per score and was measured cheaper than the
  split's extra loops.

H200, 16k, bf16, same run (``benchmarks/results/attention_sweep_h200_tma_dkdv.json``), with the tiles of
``configs.py``: dk/dv 1.28-1.37x faster than the pointer kernel at hd 128 and 1.01-1.25x at hd 64, on every mask kind.

:func:`_bwd_dkdv_ws_kernel` is the same step under Triton 3.6's Hopper warp specialisation (``tl.range(...,
warp_specialize=True)``: a producer warp issues the loads). Specialised forms with 4-D descriptors in the loop hung
or gave wrong dk/dv on an H200; this one uses 2-D descriptors over flattened rows, made in the kernel
(``tma_ws.py``), and ``[1, BLOCK_M]`` row tables, and matches the plain kernel bit for bit. It is the hd 128 default
for causal / GQA / Λ (backward 1.02-1.06x, ``attention_sweep_h200_ws_dkdv_16k.json``; ``docs/kernel_notes.md`` has
the log). ``plan.py`` decides which of the two runs, ``launch_hopper.py`` builds their descriptors and launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _kv_block_rows, _visible
from .tma_ws import flat_rows_desc


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
