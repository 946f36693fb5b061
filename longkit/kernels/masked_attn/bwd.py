"""The pointer backward kernels: every mask kind, on any GPU Triton supports (and in its interpreter).

``delta = rowsum(dO * O) - dlse`` first (:func:`_bwd_preprocess_kernel`), then two kernels with no atomics, so the
backward is deterministic:

* :func:`_bwd_dkdv_kernel`, kv-block parallel: dk, dv (and dk_global) of one kv block, looping over the query blocks
  that see it and over the query heads of its GQA group. Where one output tile is split over programs (the sink
  blocks' query chunks, GQA head subsets) it writes fp32 partial sums that the launcher adds in a fixed order.
* :func:`_bwd_dq_kernel`, query-block parallel: dq (and dq_global), walking the forward's block schedule.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import (
    _block_full,
    _kv_block_rows,
    _kv_schedule,
    _q_block,
    _qmeta,
    _row_scores,
    _sched_block,
    _sel,
    _split_kv_block,
    _split_q_block,
    _visible,
)


@triton.jit(do_not_specialize=["Tq"])
def _bwd_preprocess_kernel(Out, DO, DLSE, DELTA, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, Hq, Tq,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_DLSE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None].to(tl.int64) * s_dt + offs_d[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = (b * Hq + h) * Tq + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + row, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < Tq)


@triton.jit
def _dq_inner(dq, dqg, q, qg, do, lse, delta, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok,
              pos, lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local,
              sm_scale_log2, start, ga0, gal, gb0, gbl, it_lo, it_hi, um_lo, um_hi,
              BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              HAS_PREFIX: tl.constexpr, GLOBAL: tl.constexpr, MODE: tl.constexpr):
    """dq (and dq_global) over scheduled kv iterations ``[it_lo, it_hi)``; ``MODE``/``GLOBAL`` as in
    :func:`fwd._fwd_inner`."""
    for it in range(it_lo, it_hi):
        start_n = _sched_block(it, start, ga0, gal, gb0, gbl) * BLOCK_N
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * s_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * s_vt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, need_g = _row_scores(q, qg, kt, kg_base, s_kgt, offs_n, offs_d, d_ok, pos, lo_r, hlo_r, hhi_r,
                                p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, start_n, n_global, n_local,
                                (it < um_lo) | (it >= um_hi), BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, GLOBAL,
                                MODE)
        p = tl.math.exp2(s * sm_scale_log2 - lse[:, None])
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        if GLOBAL:
            if need_g != 0:
                kgt = tl.load(kg_base + offs_n[None, :].to(tl.int64) * s_kgt + offs_d[:, None],
                              mask=(offs_n[None, :] < n_global) & d_ok[:, None], other=0.0)
                is_g = ((pos[:, None] - offs_n[None, :]) >= n_local) & (offs_n[None, :] < n_global)
                dsg = tl.where(is_g, ds, 0.0)
                ds = ds - dsg
                dqg += tl.dot(dsg.to(kgt.dtype), tl.trans(kgt))
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq, dqg


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local"])
def _bwd_dq_kernel(
    Q, K, V, QG, KG, DO, LSE, DELTA, DQ, DQG, MQ,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_gb, s_gh, s_gt, s_kgb, s_kgh, s_kgt, s_db, s_dh, s_dt, s_mb,
    Hq, GROUP, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    USE_GLOBAL: tl.constexpr, FAST_PATH: tl.constexpr, MERGED: tl.constexpr,
):
    """dq (and dq_global), same layout as q; DQ/DQG are contiguous [B, Hq, Tq, D]."""
    b, h, hk, start_m, offs_m, row_ok, last, p0, p1, pos = _q_block(Tq, Hq, GROUP, q_offset, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    mbase = b * s_mb
    lo_r, hlo_r, hhi_r = _qmeta(MQ, mbase, tl.minimum(offs_m, Tq - 1), Tq, HAS_DOCS, HAS_PREFIX)
    lo0, hlo0, hhi0 = _qmeta(MQ, mbase, start_m, Tq, HAS_DOCS, HAS_PREFIX)
    lo1, hlo1, hhi1 = _qmeta(MQ, mbase, last, Tq, HAS_DOCS, HAS_PREFIX)

    qd_msk = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_d[None, :],
                mask=qd_msk, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None].to(tl.int64) * s_dt + offs_d[None, :],
                 mask=qd_msk, other=0.0)
    row = (b * Hq + h) * Tq + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    if USE_GLOBAL:
        qg = tl.load(QG + b * s_gb + h * s_gh + offs_m[:, None].to(tl.int64) * s_gt + offs_d[None, :],
                     mask=qd_msk, other=0.0)
    else:
        qg = q
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    kg_base = KG + b * s_kgb + hk * s_kgh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if USE_GLOBAL:
        dqg = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:
        dqg = tl.zeros([1, 1], dtype=tl.float32)  # placeholder: no registers for an unused accumulator

    start, end, ga0, gal, gb0, gbl = _kv_schedule(
        p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, n_global, n_local,
        BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    n_iter, n_head, n_tail = _split_q_block(p0, p1, lo1, start, end, ga0, gal, gb0, gbl, n_local,
                                            BLOCK_N, HAS_WINDOW, HAS_DOCS, FAST_PATH)
    # the forward's three loops: only the head loop carries the q_global branch and the mask arithmetic
    # of the sink/window/document edges; the middle loop has none (stays software-pipelined)
    if MERGED:  # as in the forward: one pipelined loop after the q_global head loop
        first = 0
        if USE_GLOBAL:
            dq, dqg = _dq_inner(
                dq, dqg, q, qg, do, lse, delta, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok,
                pos, lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local,
                sm_scale_log2, start, ga0, gal, gb0, gbl, 0, n_head, 0, 0,
                BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, True, 0)
            first = n_head
        dq, dqg = _dq_inner(
            dq, dqg, q, qg, do, lse, delta, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok,
            pos, lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local,
            sm_scale_log2, start, ga0, gal, gb0, gbl, first, n_iter, n_head, n_tail,
            BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, False, 2)
    else:
        bounds = (0, n_head, n_tail, n_iter)
        for seg in tl.static_range(3):
            dq, dqg = _dq_inner(
                dq, dqg, q, qg, do, lse, delta, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok,
                pos, lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local,
                sm_scale_log2, start, ga0, gal, gb0, gbl, bounds[seg], bounds[seg + 1], 0, 0,
                BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, USE_GLOBAL and seg == 0, 1 if seg == 1 else 0)

    tl.store(DQ + (b * Hq + h) * Tq * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_msk)
    if USE_GLOBAL:
        tl.store(DQG + (b * Hq + h) * Tq * HEAD_DIM + offs_m[:, None].to(tl.int64) * HEAD_DIM
                 + offs_d[None, :], (dqg * sm_scale).to(DQG.dtype.element_ty), mask=qd_msk)


@triton.jit
def _dkdv_inner(dk, dv, dkg, k, v, kg, q_b, do_b, qg_b, LSE, DELTA, row_b, MQ, mbase,
                s_qh, s_dh, s_gh, s_qt, s_dt, s_gt, h0, offs_n, offs_m0, offs_d, d_ok, j0, j1, Tq,
                q_offset, n_global, n_local, sm_scale_log2, m_lo, m_hi, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_PREFIX: tl.constexpr, GLOBAL: tl.constexpr, MODE: tl.constexpr):
    """dk, dv (and dk_global) of one kv block over query blocks ``[m_lo, m_hi)`` of each of the ``GROUP``
    query heads ``h0 + g`` that share it.

    One flat loop over (head, query block): a nested head loop around the pipelined block loop made the
    compiler spill hundreds of bytes per thread under GQA (``benchmarks/kernel_regs.py``).
    ``MODE`` 0: elementwise mask on every block; 1: query blocks known to see the whole kv block (only a
    run-time check for shared-prefix holes). ``GLOBAL``: sink pairs outside the window use q_global/k_global.
    """
    n_m = m_hi - m_lo
    # the divisor must never be 0: the software pipeliner computes addresses of iterations it will not run,
    # and an integer division by zero there is undefined behaviour (it faulted on an H200)
    n_div = tl.maximum(n_m, 1)
    # without GQA no division at all (the general form costs 32 B more stack per thread, kernel_regs.py)
    if GROUP == 1:
        it_lo, it_hi = m_lo, m_hi
    else:
        it_lo, it_hi = 0, GROUP * n_m
    for it in range(it_lo, it_hi):
        if GROUP == 1:
            g = 0
            mb = it
        else:
            g = it // n_div
            mb = m_lo + it - g * n_div
        h = (h0 + g).to(tl.int64)
        q_base = q_b + h * s_qh
        do_base = do_b + h * s_dh
        qg_base = qg_b + h * s_gh
        row_base = (row_b + h) * Tq
        start_m = mb * BLOCK_M
        offs_m = start_m + offs_m0
        row_ok = offs_m < Tq
        pos = q_offset + offs_m
        qd_msk = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * s_qt + offs_d[None, :], mask=qd_msk, other=0.0)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * s_dt + offs_d[None, :], mask=qd_msk, other=0.0)
        # padded rows get lse = +inf, hence p = 0; so do fully masked rows (lse = -inf)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q)) * sm_scale_log2  # [BLOCK_N, BLOCK_M]
        if GLOBAL:
            p1 = q_offset + tl.minimum(start_m + BLOCK_M, Tq) - 1
            need_g = ((j0 < n_global) & ((p1 - j0) >= n_local)).to(tl.int32)
            if need_g != 0:
                qg = tl.load(qg_base + offs_m[:, None].to(tl.int64) * s_gt + offs_d[None, :], mask=qd_msk,
                             other=0.0)
                sgt = tl.dot(kg, tl.trans(qg)) * sm_scale_log2
                is_g = ((pos[None, :] - offs_n[:, None]) >= n_local) & (offs_n[:, None] < n_global)
                st = tl.where(is_g, sgt, st)
        if MODE == 0:
            rows_c = tl.minimum(offs_m, Tq - 1)
            lo_r, hlo_r, hhi_r = _qmeta(MQ, mbase, rows_c, Tq, HAS_DOCS, HAS_PREFIX)
            vis = _visible(pos[None, :], offs_n[:, None], lo_r[None, :], hlo_r[None, :], hhi_r[None, :],
                           n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
            st = tl.where(vis, st, float("-inf"))
        elif HAS_PREFIX:
            last = tl.minimum(start_m + BLOCK_M, Tq) - 1
            lo0, hlo0, hhi0 = _qmeta(MQ, mbase, start_m, Tq, HAS_DOCS, HAS_PREFIX)
            lo1, hlo1, hhi1 = _qmeta(MQ, mbase, last, Tq, HAS_DOCS, HAS_PREFIX)
            full = _block_full(q_offset + start_m, q_offset + last, j0, j1, lo0, lo1, hlo0, hhi0, hlo1, hhi1,
                               n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
            if full == 0:
                rows_c = tl.minimum(offs_m, Tq - 1)
                lo_r, hlo_r, hhi_r = _qmeta(MQ, mbase, rows_c, Tq, HAS_DOCS, HAS_PREFIX)
                vis = _visible(pos[None, :], offs_n[:, None], lo_r[None, :], hlo_r[None, :], hhi_r[None, :],
                               n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
                st = tl.where(vis, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        if GLOBAL:
            if need_g != 0:
                qg = tl.load(qg_base + offs_m[:, None].to(tl.int64) * s_gt + offs_d[None, :], mask=qd_msk,
                             other=0.0)
                is_g = ((pos[None, :] - offs_n[:, None]) >= n_local) & (offs_n[:, None] < n_global)
                dsgt = tl.where(is_g, dst, 0.0)
                dst = dst - dsgt
                dkg += tl.dot(dsgt.to(qg.dtype), qg)
        dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv, dkg


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local", "BLK_OFF", "M_CHUNK", "T_OUT",
                              "s_oc", "s_ogc"])
def _bwd_dkdv_kernel(
    Q, K, V, QG, KG, DO, LSE, DELTA, DK, DV, DKG, MQ, MK,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_gb, s_gh, s_gt, s_kgb, s_kgh, s_kgt, s_db, s_dh, s_dt, s_mb, s_mkb,
    Hq, Hkv, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2, sm_scale,
    BLK_OFF, M_CHUNK, T_OUT, s_oc, s_ogc,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    USE_GLOBAL: tl.constexpr, FAST_PATH: tl.constexpr, CHUNKED: tl.constexpr, SPLIT_HEADS: tl.constexpr,
):
    """dk, dv (and dk_global) per kv block, looping over the query heads of the GQA group (``GROUP`` is a
    compile-time constant: one compile per GQA ratio, and no head loop at all without GQA).

    Program ``(i, bh, c)`` handles kv block ``BLK_OFF + i`` and, of the query blocks that see it, those in
    ``[c * M_CHUNK, (c + 1) * M_CHUNK)``; it writes to ``DK/DV + c * s_oc`` (``DKG + c * s_ogc``), laid out
    ``[B, Hkv, T_OUT, D]``. One chunk (``c = 0``, ``M_CHUNK`` huge) is the plain case; several chunks give partial
    sums that the host adds up (the sink blocks, which every query sees). ``CHUNKED`` is False for the plain
    case: the chunk arithmetic then compiles away (it cost ~60 B more spills per thread).

    ``SPLIT_HEADS`` (GQA): ``c`` selects the program's ``GROUP`` query heads out of the kv head's ``Hq // Hkv``
    instead of a query chunk; the partial sums per head subset are again added up on the host."""
    pid_n = tl.program_id(0) + BLK_OFF
    bh = tl.program_id(1)
    chunk = tl.program_id(2)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    n_ok = offs_n < Tk
    d_ok = offs_d < HEAD_DIM
    kd_msk = n_ok[:, None] & d_ok[None, :]
    j0 = start_n
    j1 = start_n + BLOCK_N - 1
    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None].to(tl.int64) * s_kt + offs_d[None, :],
                mask=kd_msk, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
                mask=kd_msk, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if USE_GLOBAL:
        kg = tl.load(KG + b * s_kgb + hk * s_kgh + offs_n[:, None].to(tl.int64) * s_kgt + offs_d[None, :],
                     mask=(offs_n[:, None] < n_global) & d_ok[None, :], other=0.0)
        dkg = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        kg = k
        dkg = tl.zeros([1, 1], dtype=tl.float32)  # placeholder: no registers for an unused accumulator

    ds0, ds1, de, m_start, m_end = _kv_block_rows(MK, b * s_mkb, j0, j1, Tq, Tk, q_offset, n_global, n_local,
                                                  BLOCK_M, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    mid_lo, mid_hi = _split_kv_block(j0, j1, ds0, ds1, de, m_start, m_end, q_offset, n_global, n_local,
                                     BLOCK_M, HAS_WINDOW, HAS_DOCS, FAST_PATH)
    # distance limit: sink kv blocks run one masked loop with the q_global/k_global variant
    m_glob = m_start
    if USE_GLOBAL:
        is_sink_blk = j0 < n_global
        m_glob = _sel(is_sink_blk, m_end, m_start)
        mid_lo = _sel(is_sink_blk, m_end, mid_lo)
        mid_hi = _sel(is_sink_blk, m_end, mid_hi)
    mbase = b * s_mb
    q_b = Q + b * s_qb
    do_b = DO + b * s_db
    qg_b = QG + b * s_gb
    row_b = b * Hq
    if SPLIT_HEADS:
        h0 = hk * (Hq // Hkv) + chunk * GROUP
    else:
        h0 = hk * GROUP
    # sink blocks with q_global (one masked loop), then diagonal blocks (masked), blocks that see the whole kv
    # block (unmasked), window edge / document end (masked)
    if CHUNKED:
        # this program's chunk of query blocks (clamping keeps the bounds ordered)
        c_lo = chunk * M_CHUNK
        c_hi = c_lo + M_CHUNK
        bounds = (tl.minimum(tl.maximum(m_start, c_lo), c_hi), tl.minimum(tl.maximum(m_glob, c_lo), c_hi),
                  tl.minimum(tl.maximum(mid_lo, c_lo), c_hi), tl.minimum(tl.maximum(mid_hi, c_lo), c_hi),
                  tl.minimum(tl.maximum(m_end, c_lo), c_hi))
    else:
        bounds = (m_start, m_glob, mid_lo, mid_hi, m_end)
    for seg in tl.static_range(0 if USE_GLOBAL else 1, 4):
        dk, dv, dkg = _dkdv_inner(
            dk, dv, dkg, k, v, kg, q_b, do_b, qg_b, LSE, DELTA, row_b, MQ, mbase, s_qh, s_dh, s_gh,
            s_qt, s_dt, s_gt, h0, offs_n, offs_m0, offs_d, d_ok, j0, j1, Tq, q_offset, n_global, n_local,
            sm_scale_log2, bounds[seg], bounds[seg + 1], GROUP, BLOCK_M, BLOCK_N, HAS_WINDOW, HAS_DOCS,
            HAS_PREFIX, seg == 0, 1 if seg == 2 else 0)

    if CHUNKED or SPLIT_HEADS:
        c64 = chunk.to(tl.int64)
        out_base = (c64 * s_oc + (b * Hkv + hk) * T_OUT * HEAD_DIM + offs_n[:, None].to(tl.int64) * HEAD_DIM
                    + offs_d[None, :])
    else:
        c64 = 0
        out_base = (b * Hkv + hk) * Tk * HEAD_DIM + offs_n[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_base, (dk * sm_scale).to(DK.dtype.element_ty), mask=kd_msk)
    tl.store(DV + out_base, dv.to(DV.dtype.element_ty), mask=kd_msk)
    if USE_GLOBAL:
        g_base = (c64 * s_ogc + (b * Hkv + hk) * n_global * HEAD_DIM + offs_n[:, None].to(tl.int64) * HEAD_DIM
                  + offs_d[None, :])
        tl.store(DKG + g_base, (dkg * sm_scale).to(DKG.dtype.element_ty),
                 mask=(offs_n[:, None] < n_global) & d_ok[None, :])
