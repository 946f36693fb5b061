"""The pointer forward kernel: every mask kind, on any GPU Triton supports (and in its interpreter).

* One program per ``(query block, batch * query head)``, heavy (late) query blocks first; GQA by index (kv head
  ``h // GROUP``), K/V are never repeated. Offsets in int64; lengths, offsets and window sizes are not specialised
  (``do_not_specialize``) so a new length never recompiles.
* The kv blocks come from the block schedule of ``_jit.py``: masked head blocks (sinks, window edge, document start),
  fully visible middle blocks without the elementwise mask, masked diagonal blocks; walked in three loops or, where
  kv runs are short, in one (``MERGED``, the masked blocks by a uniform branch).
* Scores use ``exp2`` with ``log2(e)`` folded into the scale; accumulation in fp32. ``lse`` is returned in
  natural-log units of the *scaled* scores: ``lse = log sum_j exp(scale q.k_j)``.
* With the distance limit (``USE_GLOBAL``) sink pairs outside the window score ``q_global . k_global`` instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _kv_schedule, _q_block, _qmeta, _row_scores, _sched_block, _split_q_block


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qg, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok, pos,
               lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local,
               sm_scale_log2, start, ga0, gal, gb0, gbl, it_lo, it_hi, um_lo, um_hi,
               BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
               HAS_PREFIX: tl.constexpr, GLOBAL: tl.constexpr, MODE: tl.constexpr):
    """Online-softmax over scheduled kv iterations ``[it_lo, it_hi)``.

    ``MODE`` 0: apply the elementwise mask on every block; 1: blocks known fully visible (no mask, except a
    run-time check for shared-prefix holes); 2: one loop for both, the mask applied (a uniform branch) on
    iterations outside ``[um_lo, um_hi)``. ``GLOBAL``: score sink pairs outside the window with q_global.
    """
    for it in range(it_lo, it_hi):
        start_n = _sched_block(it, start, ga0, gal, gb0, gbl) * BLOCK_N
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * s_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # raw scores; the scale is applied once, inside exp2's argument (one FMA per score), m_i is scaled
        s, need_g = _row_scores(q, qg, kt, kg_base, s_kgt, offs_n, offs_d, d_ok, pos, lo_r, hlo_r, hhi_r,
                                p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, start_n, n_global, n_local,
                                (it < um_lo) | (it >= um_hi), BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, GLOBAL,
                                MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)  # scale > 0, so max commutes with it
        if MODE != 1 or HAS_PREFIX:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s * sm_scale_log2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local"])
def _fwd_kernel(
    Q, K, V, QG, KG, Out, LSE, MQ,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_gb, s_gh, s_gt, s_kgb, s_kgh, s_kgt, s_ob, s_oh, s_ot, s_mb,
    Hq, GROUP, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    USE_GLOBAL: tl.constexpr, FAST_PATH: tl.constexpr, MERGED: tl.constexpr,
):
    b, h, hk, start_m, offs_m, row_ok, last, p0, p1, pos = _q_block(Tq, Hq, GROUP, q_offset, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    mbase = b * s_mb
    lo_r, hlo_r, hhi_r = _qmeta(MQ, mbase, tl.minimum(offs_m, Tq - 1), Tq, HAS_DOCS, HAS_PREFIX)
    lo0, hlo0, hhi0 = _qmeta(MQ, mbase, start_m, Tq, HAS_DOCS, HAS_PREFIX)
    lo1, hlo1, hhi1 = _qmeta(MQ, mbase, last, Tq, HAS_DOCS, HAS_PREFIX)

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if USE_GLOBAL:
        qg = tl.load(QG + b * s_gb + h * s_gh + offs_m[:, None].to(tl.int64) * s_gt + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        qg = q
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    kg_base = KG + b * s_kgb + hk * s_kgh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    start, end, ga0, gal, gb0, gbl = _kv_schedule(
        p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, n_global, n_local,
        BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    n_iter, n_head, n_tail = _split_q_block(p0, p1, lo1, start, end, ga0, gal, gb0, gbl, n_local,
                                            BLOCK_N, HAS_WINDOW, HAS_DOCS, FAST_PATH)
    if MERGED:
        # one software-pipelined loop, masked head/diagonal blocks by a uniform branch: each loop pays its own
        # pipeline fill, which short kv runs (4k causal, documents) cannot hide; the q_global head loop stays apart
        first = 0
        if USE_GLOBAL:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, qg, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok, pos,
                lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local, sm_scale_log2,
                start, ga0, gal, gb0, gbl, 0, n_head, 0, 0, BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, True, 0)
            first = n_head
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, qg, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok, pos,
            lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local, sm_scale_log2,
            start, ga0, gal, gb0, gbl, first, n_iter, n_head, n_tail,
            BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, False, 2)
    else:
        # three loops: masked head blocks (with the q_global variant), unmasked middle, masked diagonal
        bounds = (0, n_head, n_tail, n_iter)
        for seg in tl.static_range(3):
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, qg, k_base, v_base, kg_base, s_kt, s_vt, s_kgt, offs_n0, offs_d, d_ok, pos,
                lo_r, hlo_r, hhi_r, p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, Tk, n_global, n_local, sm_scale_log2,
                start, ga0, gal, gb0, gbl, bounds[seg], bounds[seg + 1], 0, 0,
                BLOCK_N, HAS_WINDOW, HAS_DOCS, HAS_PREFIX, USE_GLOBAL and seg == 0, 1 if seg == 1 else 0)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=row_ok)
