"""Device helpers shared by the pointer kernels (``fwd.py``, ``bwd.py``) and the TMA dk/dv (``dkdv_tma.py``).

The visibility rule and the block schedule, the two pieces every kernel needs to skip what the mask hides without
materialising it:

* **Visibility** (:func:`_visible`, :func:`_block_full`, :func:`_mask_scores`): key ``j`` is visible to the query at
  position ``p`` when ``j <= p``, both lie in one document (``j >= doc start``), ``j`` is a sink of the document or
  within ``n_local`` of ``p`` (window), and ``j`` is outside the shared-prefix hole ``[hidden start, hidden end)`` of
  a later-branch query (``[s_1, s_b)`` for a query in branch ``b``). The per-token values come from the tables of
  ``tables.py`` (:func:`_qmeta`).
* **Schedule** (:func:`_kv_schedule` and the splits): per query block only the kv blocks that can be visible,
  ``[doc_start(p0), p1]`` minus up to two gaps (the window gap between the sink blocks and the local band, and the
  shared-prefix gap ``[s_1, s_b)`` for query blocks inside one later branch ``b``). Blocks proven fully visible
  skip the elementwise mask (the fast path); only partially visible blocks evaluate the rule.
  :func:`_kv_block_rows` / :func:`_split_kv_block` are the transposed view for the kv-block-parallel dk/dv.

Scalars are selected branch-free (:func:`_sel`) so that the same code runs compiled and in Triton's interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# log2(e): the kernels exponentiate with exp2, so the host folds it into the softmax scale (and the kernels spell it
# out as this literal where they turn a natural-log lse into base 2)
LOG2E = 1.4426950408889634


@triton.jit
def _qmeta(MQ, base, idx, Tq, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Per-query (doc start, hidden start, hidden end) for row index ``idx`` (scalar or vector)."""
    if HAS_DOCS:
        lo = tl.load(MQ + base + idx)
    else:
        lo = idx * 0
    if HAS_PREFIX:
        hlo = tl.load(MQ + base + Tq + idx)
        hhi = tl.load(MQ + base + 2 * Tq + idx)
    else:
        hlo = idx * 0
        hhi = idx * 0
    return lo, hlo, hhi


@triton.jit
def _visible(pos, offs_n, lo, hlo, hhi, n_global, n_local,
             HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """Elementwise visibility; ``pos``/``lo``/``hlo``/``hhi`` and ``offs_n`` broadcast to a tile."""
    vis = offs_n <= pos
    if HAS_DOCS:
        vis = vis & (offs_n >= lo)
    if HAS_WINDOW:
        vis = vis & (((pos - offs_n) < n_local) | (offs_n < lo + n_global))
    if HAS_PREFIX:
        vis = vis & ((offs_n < hlo) | (offs_n >= hhi))
    return vis


@triton.jit
def _block_full(p0, p1, j0, j1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, n_global, n_local,
                HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """1 if every (query in [p0, p1], key in [j0, j1]) pair is visible, else 0 (int32 scalar)."""
    full = (j1 <= p0).to(tl.int32)
    if HAS_DOCS:
        full = full & (j0 >= lo1).to(tl.int32)
    if HAS_WINDOW:
        full = full & (((p1 - j0) < n_local) | (j1 < lo0 + n_global)).to(tl.int32)
    if HAS_PREFIX:
        same = (hlo0 == hlo1) & (hhi0 == hhi1) & (lo0 == lo1)
        full = full & (same & ((j1 < hlo0) | (j0 >= hhi0))).to(tl.int32)
    return full


@triton.jit
def _sel(c, a, b):
    """Scalar select ``a if c else b`` (branch-free, interpreter-safe: no 1-element tensors)."""
    return b + c.to(tl.int32) * (a - b)


@triton.jit
def _kv_schedule(p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, n_global, n_local,
                 BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                 HAS_PREFIX: tl.constexpr):
    """kv blocks for queries [p0, p1]: ``[start, end)`` minus sorted disjoint gaps A and B."""
    start = lo0 // BLOCK_N
    end = (p1 + BLOCK_N) // BLOCK_N
    ga0 = end
    ga1 = end
    gb0 = end
    gb1 = end
    if HAS_WINDOW:
        a0 = tl.maximum((lo1 + n_global + BLOCK_N - 1) // BLOCK_N, start)
        a1 = tl.minimum(tl.maximum(p0 - n_local + 1, 0) // BLOCK_N, end)
        ga0 = _sel(a1 > a0, a0, end)
        ga1 = _sel(a1 > a0, a1, end)
    if HAS_PREFIX:
        same = (hlo0 == hlo1) & (hhi0 == hhi1) & (hhi0 > hlo0)
        b0 = tl.maximum((hlo0 + BLOCK_N - 1) // BLOCK_N, start)
        b1 = tl.minimum(hhi0 // BLOCK_N, end)
        ok = same & (b1 > b0)
        gb0 = _sel(ok, b0, end)
        gb1 = _sel(ok, b1, end)
        # merge overlapping gaps into A, then sort so that A comes first
        both = (ga1 > ga0) & (gb1 > gb0)
        overlap = both & (ga0 <= gb1) & (gb0 <= ga1)
        m0 = tl.minimum(ga0, gb0)
        m1 = tl.maximum(ga1, gb1)
        ga0 = _sel(overlap, m0, ga0)
        ga1 = _sel(overlap, m1, ga1)
        gb0 = _sel(overlap, end, gb0)
        gb1 = _sel(overlap, end, gb1)
        swap = gb0 < ga0
        t0 = _sel(swap, gb0, ga0)
        t1 = _sel(swap, gb1, ga1)
        gb0 = _sel(swap, ga0, gb0)
        gb1 = _sel(swap, ga1, gb1)
        ga0 = t0
        ga1 = t1
    return start, end, ga0, ga1 - ga0, gb0, gb1 - gb0


@triton.jit
def _iters_before(x, start, end, ga0, gal, gb0, gbl):
    """Number of scheduled kv blocks (``[start, end)`` minus the two gaps) below block ``x``."""
    xc = tl.minimum(tl.maximum(x, start), end)
    n = xc - start
    n -= tl.maximum(tl.minimum(xc, ga0 + gal) - ga0, 0)
    n -= tl.maximum(tl.minimum(xc, gb0 + gbl) - gb0, 0)
    return n


@triton.jit
def _sched_block(it, start, ga0, gal, gb0, gbl):
    """kv block index of scheduled iteration ``it`` (skips the two gaps)."""
    blk = start + it
    blk = _sel(blk >= ga0, blk + gal, blk)
    return _sel(blk >= gb0, blk + gbl, blk)


@triton.jit
def _split_q_block(p0, p1, lo1, start, end, ga0, gal, gb0, gbl, n_local,
                   BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                   FAST_PATH: tl.constexpr):
    """Split a query block's schedule into ``[0, n_head)`` partially visible head blocks (sinks, window
    edge, document start), ``[n_head, n_tail)`` fully visible blocks and ``[n_tail, n_iter)`` diagonal blocks."""
    n_iter = end - start - gal - gbl
    head_blk = start * 0
    if HAS_WINDOW:
        head_blk = tl.maximum(head_blk, _sel(p1 >= n_local, (p1 - n_local) // BLOCK_N + 1, 0))
    if HAS_DOCS:
        head_blk = tl.maximum(head_blk, (lo1 + BLOCK_N - 1) // BLOCK_N)
    n_head = _iters_before(head_blk, start, end, ga0, gal, gb0, gbl)
    n_tail = tl.maximum(n_head, _iters_before((p0 + 1) // BLOCK_N, start, end, ga0, gal, gb0, gbl))
    if not FAST_PATH:
        n_head = n_iter
        n_tail = n_iter
    return n_iter, n_head, n_tail


@triton.jit
def _split_kv_block(j0, j1, ds0, ds1, de, m_start, m_end, q_offset, n_global, n_local,
                    BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                    FAST_PATH: tl.constexpr):
    """For kv block ``[j0, j1]``: query blocks ``[mid_lo, mid_hi)`` of ``[m_start, m_end)`` that see every key
    of it (no elementwise mask needed, except shared-prefix holes checked at run time); the rest are
    partially visible: the diagonal before, the window edge / document end after."""
    # causal: first query of the block at or past the last key
    mid_lo = tl.maximum(m_start, (tl.maximum(j1 - q_offset, 0) + BLOCK_M - 1) // BLOCK_M)
    mid_hi = m_end
    if HAS_WINDOW:
        # keys that are all sinks of their document are seen by every later query of it; others only while
        # the block's last query is within n_local of the first key
        all_sink = j1 < ds0 + n_global
        if HAS_DOCS:
            all_sink = all_sink & (ds0 == ds1)
        lim = tl.maximum(n_local + j0 - q_offset, 0) // BLOCK_M
        mid_hi = _sel(all_sink, mid_hi, tl.minimum(mid_hi, lim))
    if HAS_DOCS:
        # a kv block spanning documents is never fully visible; otherwise queries must end before the doc end
        doc_hi = tl.maximum(de - q_offset, 0) // BLOCK_M
        mid_hi = _sel(ds0 == ds1, tl.minimum(mid_hi, doc_hi), mid_lo)
    if not FAST_PATH:
        mid_hi = mid_lo
    mid_lo = tl.minimum(mid_lo, m_end)
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), m_end)
    return mid_lo, mid_hi


@triton.jit
def _mask_scores(s, pos, offs_n, lo_r, hlo_r, hhi_r, n_global, n_local,
                 HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """``s`` with the pairs the mask hides set to -inf (rows at positions ``pos``, keys ``offs_n``)."""
    vis = _visible(pos[:, None], offs_n[None, :], lo_r[:, None], hlo_r[:, None], hhi_r[:, None],
                   n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _row_scores(q, qg, kt, kg_base, s_kgt, offs_n, offs_d, d_ok, pos, lo_r, hlo_r, hhi_r,
                p0, p1, lo0, lo1, hlo0, hhi0, hlo1, hhi1, start_n, n_global, n_local, masked,
                BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                HAS_PREFIX: tl.constexpr, GLOBAL: tl.constexpr, MODE: tl.constexpr):
    """Unscaled scores ``q . k`` of a query-row tile against kv tile ``kt`` ([D, BLOCK_N]), masked to -inf
    where invisible (``MODE`` as in :func:`fwd._fwd_inner`; MODE 2 masks when the run-time flag ``masked`` is
    set), and ``need_g`` (1 when ``GLOBAL`` replaced sink pairs outside the window by ``q_global . k_global``)."""
    s = tl.dot(q, kt)
    need_g = 0
    if GLOBAL:
        need_g = ((start_n < n_global) & ((p1 - start_n) >= n_local)).to(tl.int32)
        if need_g != 0:
            kgt = tl.load(kg_base + offs_n[None, :].to(tl.int64) * s_kgt + offs_d[:, None],
                          mask=(offs_n[None, :] < n_global) & d_ok[:, None], other=0.0)
            sg = tl.dot(qg, kgt)
            is_g = ((pos[:, None] - offs_n[None, :]) >= n_local) & (offs_n[None, :] < n_global)
            s = tl.where(is_g, sg, s)
    if MODE == 0:
        s = _mask_scores(s, pos, offs_n, lo_r, hlo_r, hhi_r, n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
    elif MODE == 2 or HAS_PREFIX:
        need = masked if MODE == 2 else False
        if HAS_PREFIX:  # a block inside the schedule's visible run may still hold a shared-prefix hole
            full = _block_full(p0, p1, start_n, start_n + BLOCK_N - 1, lo0, lo1, hlo0, hhi0, hlo1, hhi1,
                               n_global, n_local, HAS_WINDOW, HAS_DOCS, HAS_PREFIX)
            need = need | (full == 0)
        if need:
            s = _mask_scores(s, pos, offs_n, lo_r, hlo_r, hhi_r, n_global, n_local, HAS_WINDOW, HAS_DOCS,
                             HAS_PREFIX)
    return s, need_g


@triton.jit
def _q_block(Tq, Hq, GROUP, q_offset, BLOCK_M: tl.constexpr):
    """This program's query block: batch, query head, kv head, first row, rows, row mask, last row, the
    first and last rows' positions, and every row's position. Heavy (late) query blocks run first."""
    pid_m = (Tq + BLOCK_M - 1) // BLOCK_M - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    last = tl.minimum(start_m + BLOCK_M, Tq) - 1
    return (b, h.to(tl.int64), hk, start_m, offs_m, offs_m < Tq, last, q_offset + start_m, q_offset + last,
            q_offset + offs_m)


@triton.jit
def _kv_block_rows(MK, mkbase, j0, j1, Tq, Tk, q_offset, n_global, n_local, BLOCK_M: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """For kv block ``[j0, j1]``: its first / last key's document start ``ds0`` / ``ds1``, the document end
    ``de``, and the query blocks ``[m_start, m_end)`` that can see any of its keys."""
    j1c = tl.minimum(j1, Tk - 1)
    if HAS_DOCS:
        ds0 = tl.load(MK + mkbase + j0)
        ds1 = tl.load(MK + mkbase + j1c)
        p_hi = tl.load(MK + mkbase + Tk + j1c)
    else:
        ds0 = 0
        ds1 = 0
        p_hi = Tk
    de = p_hi
    if HAS_WINDOW:
        has_sink = (j0 - ds0 < n_global) | ((ds1 > j0) & (n_global > 0))
        p_hi = _sel(has_sink, p_hi, tl.minimum(p_hi, j1 + n_local))
    if HAS_PREFIX:
        kcs = tl.load(MK + mkbase + 2 * Tk + j0)
        krs = tl.load(MK + mkbase + 3 * Tk + j0)
        inside = (ds0 == ds1) & (j0 >= kcs) & (j1c < krs)
        p_hi = _sel(inside, tl.minimum(p_hi, krs), p_hi)
    row_lo = tl.maximum(j0 - q_offset, 0)
    row_hi = tl.minimum(p_hi - q_offset, Tq)
    m_start = row_lo // BLOCK_M
    m_end = tl.maximum((row_hi + BLOCK_M - 1) // BLOCK_M, m_start)
    return ds0, ds1, de, m_start, m_end
