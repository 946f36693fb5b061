"""FlashAttention-2 style masked attention in Triton (forward, deterministic backward).

Three tiers (see STYLE.md): ``_*_kernel`` Triton programs -> host launchers
:func:`flash_masked_attention_fwd` / :func:`flash_masked_attention_bwd` -> the custom op and public
function in :mod:`longkit.kernels.masked_attn.interface`.

Design notes
------------
* One program per ``(query block, batch * query head)``; GQA by index (kv head ``h // group``), K/V are
  never repeated. Offsets in int64; lengths, offsets and window sizes are not specialised
  (``do_not_specialize``) so a new length never recompiles.
* The mask is never materialised. Per query block a **block schedule** visits only kv blocks that can
  be visible: ``[doc_start(p0), p1]`` minus up to two gaps (the window gap between the sink blocks and
  the local band, and the shared-prefix gap ``[chosen_start, rejected_start)`` for rejected-branch
  query blocks). Blocks proven fully visible skip the elementwise mask (fast path); only partially
  visible blocks evaluate the visibility rule.
* Documents and shared-prefix segments are turned into small per-token int32 tables on the host
  (``[B or 1, 3, Tq]`` for queries: doc start, hidden start, hidden end; ``[B or 1, 4, Tk]`` for keys:
  doc start, doc end, chosen start, rejected start), read inside the kernels.
* ``lse`` is returned in natural-log units of the *scaled* scores: ``lse = log sum_j exp(scale q.k_j)``.
* Scores use ``exp2`` with ``log2(e)`` folded into the scale; accumulation in fp32.
* A Λ mask whose windows all reach key 0 is causal and runs the causal kernels (:func:`_window_covers_all`). On
  Hopper at head dim 128 the causal and Λ forwards run the warp-specialised TMA kernels of ``fwd_ws.py`` (causal
  persistent over query-block pairs up to 4k), and dk/dv those of ``dkdv_tma.py``.
* Backward: ``delta = rowsum(dO * O) - dlse`` (preprocess), then a kv-block-parallel kernel for
  ``dk, dv`` (and ``dk_global``) that loops over the query heads of its group, and a
  query-block-parallel kernel for ``dq`` (and ``dq_global``). No atomics: deterministic.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from longkit.kernels.masks import tensor_version

__all__ = ["flash_masked_attention_fwd", "flash_masked_attention_bwd", "build_mask_tables", "mask_tables"]

_LOG2E = 1.4426950408889634


def _fix_interpreter_index() -> None:
    """Work around Triton's CPU interpreter with numpy >= 2.3 (interpreter mode only).

    The interpreter stores scalars as 1-element arrays and converts loop bounds with
    ``int(array)``, which numpy >= 2.3 refuses ("only 0-dimensional arrays can be converted"), so any
    ``for`` loop with a run-time bound fails under ``TRITON_INTERPRET=1``. We wrap the interpreter's
    tensor patching to convert through ``.reshape(-1)[0]``. Compiled (GPU) kernels are unaffected.
    """
    import numpy as np

    try:
        int(np.array([1]))
        return  # this numpy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter as _interp

    orig = _interp._patch_lang_tensor
    if getattr(orig, "_longkit_fixed", False):
        return

    def patched(tensor, scope):  # noqa: ANN001, ANN202 - mirrors the private signature
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._longkit_fixed = True  # type: ignore[attr-defined]
    _interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_index()


# ----------------------------------------------------------------------------- device helpers
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
    where invisible (``MODE`` as in :func:`_fwd_inner`; MODE 2 masks when the run-time flag ``masked`` is
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


# ----------------------------------------------------------------------------- forward
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


# ----------------------------------------------------------------------------- backward
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
    :func:`_fwd_inner`."""
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


# ----------------------------------------------------------------------------- host side
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parse_cfg(text: str) -> dict[str, int]:
    """``"BM,BN,warps,stages"`` (the tuning overrides' format)."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"bad kernel config {text!r}: expected 'BM,BN,warps,stages', e.g. '64,128,8,3'")
    bm, bn, w, st = (int(x) for x in parts)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


def _fwd_config(head_dim: int, flags: dict[str, bool]) -> dict[str, int]:
    """Forward tiles. Chosen by ``benchmarks/attention.py --sweep`` on an H200 (T=16k, bf16); see
    BENCHMARKS.md. ``LONGKIT_ATTN_FWD_CONFIG="BM,BN,warps,stages"`` overrides (tuning only)."""
    env = os.environ.get("LONGKIT_ATTN_FWD_CONFIG")
    if env:  # before the interpreter's default, as in _bwd_config: tests use it to force narrow tiles
        return _parse_cfg(env)
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    plain = not (flags["HAS_WINDOW"] or flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"])
    if head_dim <= 64:
        # masked kinds: one warpgroup per 128-row tile is 1.14-1.18x faster than two (masked edges, short kv
        # runs); plain causal keeps two (attention_sweep_h200_hd64_4warps.json)
        return _parse_cfg("128,64,8,4" if plain else "128,64,4,3")
    if head_dim <= 128:
        # wide kv tiles pay on long unmasked runs (causal); masked edges and the q_global tile prefer 64
        return _parse_cfg("128,128,8,3" if plain else "128,64,8,3")
    return _parse_cfg("64,32,4,2")


def _bwd_config(head_dim: int, flags: dict[str, bool]) -> tuple[dict[str, int], dict[str, int]]:
    """(dk/dv config, dq config); ``LONGKIT_ATTN_BWD_CONFIG="BM,BN,warps,stages;BM,BN,warps,stages"``
    overrides (tuning only)."""
    env = os.environ.get("LONGKIT_ATTN_BWD_CONFIG")
    if env:
        a, b = env.split(";")
        return _parse_cfg(a), _parse_cfg(b)
    if _interpreting():
        c = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        return c, c
    plain = not (flags["HAS_WINDOW"] or flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"])
    if head_dim <= 64:
        # the q_global variant (sink kv blocks only) spills 832 B per thread at 4 warps, none at 8
        kv = "32,128,8,3" if flags["USE_GLOBAL"] else "32,128,4,3"
        # dq: one warpgroup; 64-row tiles on masked kinds (backward 2-6% faster than 128x128x8 warps, same sweep)
        return _parse_cfg(kv), _parse_cfg("128,64,4,3" if plain else "64,64,4,3")
    if head_dim <= 128:
        # dk/dv holds two 128x128 fp32 accumulators plus K and V: the q_global (sink kv blocks only) / prefix
        # variants need a narrower query tile or one pipeline stage fewer
        kv = "32,128,8,2" if flags["USE_GLOBAL"] else "64,128,8,2" if flags["HAS_PREFIX"] else "64,128,8,3"
        return _parse_cfg(kv), _parse_cfg("128,64,8,3")
    c = _parse_cfg("32,32,4,1")
    return c, c


_TABLE_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_TABLE_CACHE_SIZE = 8


def mask_tables(
    batch: int, tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
    segments: torch.Tensor | None, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_mask_tables`, memoised on the very ``cu_seqlens`` / ``segments`` tensor objects (weak
    references, so a freed tensor whose memory is reused never hits) and their in-place modification counters.
    Every layer of a model, forward and backward, passes the same mask tensors: the tables (about ten small
    kernels) are then built once. At most ``_TABLE_CACHE_SIZE`` entries; tables of the oldest are dropped."""
    if cu_seqlens is None and segments is None:
        return build_mask_tables(batch, tq, tk, q_offset, cu_seqlens, segments, device)
    versions = (tensor_version(cu_seqlens), tensor_version(segments))
    key = (batch, tq, tk, q_offset, str(device), id(cu_seqlens), id(segments))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and None not in versions:
        refs, cached_versions, tables = hit
        same = all((r is None and t is None) or (r is not None and r() is t)
                   for r, t in zip(refs, (cu_seqlens, segments)))
        if same and cached_versions == versions:
            _TABLE_CACHE.move_to_end(key)
            return tables
    tables = build_mask_tables(batch, tq, tk, q_offset, cu_seqlens, segments, device)
    if None not in versions:
        refs = tuple(weakref.ref(t) if t is not None else None for t in (cu_seqlens, segments))
        _TABLE_CACHE[key] = (refs, versions, tables)
        _TABLE_CACHE.move_to_end(key)
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return tables


def build_mask_tables(
    batch: int, tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
    segments: torch.Tensor | None, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int32 tables read by the kernels (no host sync).

    Returns:
        ``meta_q [Bm, 3, Tq]`` (doc start, hidden start, hidden end per query) and ``meta_k [Bm, 4, Tk]``
        (doc start, doc end, chosen start, rejected start per key); ``Bm`` is ``B`` for per-row shared
        prefix segments and 1 otherwise. Dummy 1-element tensors when neither documents nor segments.
    """
    if cu_seqlens is None and segments is None:
        z = torch.zeros(1, dtype=torch.int32, device=device)
        return z, z
    t = torch.arange(tk, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.bucketize(t, cu[1:], right=True).clamp_max(cu.numel() - 2)
        dstart, dend = cu[doc], cu[doc + 1]
    else:
        doc = None
        dstart, dend = torch.zeros_like(t), torch.full_like(t, tk)
    if segments is not None:
        seg = segments.to(device=device, dtype=torch.long)
        if doc is not None:
            cs, rs = (seg[doc, 0] + dstart)[None], (seg[doc, 1] + dstart)[None]
        else:
            cs = seg[:, 0:1].expand(batch, tk)
            rs = seg[:, 1:2].expand(batch, tk)
    else:
        cs = rs = torch.zeros_like(t)[None]
    bm = cs.shape[0]
    meta_k = torch.stack([dstart[None].expand(bm, tk), dend[None].expand(bm, tk), cs, rs], dim=1)
    p = torch.arange(tq, device=device) + q_offset
    hidden = p[None] >= rs[:, p]
    meta_q = torch.stack([
        dstart[p][None].expand(bm, tq),
        torch.where(hidden, cs[:, p], 0),
        torch.where(hidden, rs[:, p], 0),
    ], dim=1)
    return meta_q.to(torch.int32).contiguous(), meta_k.to(torch.int32).contiguous()


def _flags(n_local: int, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
           q_global: torch.Tensor | None) -> dict[str, bool]:
    return {"HAS_WINDOW": n_local > 0, "HAS_DOCS": cu_seqlens is not None,
            "HAS_PREFIX": segments is not None, "USE_GLOBAL": q_global is not None}


def _window_covers_all(q_offset: int, Tq: int, n_local: int) -> bool:
    """Whether every query's window reaches back to key 0 (``q_offset + Tq <= n_local``). The Λ mask is then plain
    causal: the sinks lie inside every window, and the distance limit's global branch scores no pair. The
    launchers then run the causal kernels (their tiles and, on Hopper, the specialised forward): LM-Infinite on
    inputs shorter than its window pays no more than causal attention."""
    return 0 < n_local and q_offset + Tq <= n_local


def _fast_path() -> bool:
    return os.environ.get("LONGKIT_ATTN_FAST_PATH", "1") != "0"


def _merged_loops(kernel: str, head_dim: int, flags: dict[str, bool]) -> bool:
    """Whether ``kernel`` ("fwd" / "dq") walks its kv blocks in one loop (masked blocks by a run-time branch)
    rather than three (masked head, unmasked middle, masked diagonal). Chosen per case from one H200 sweep at
    4k and 16k (``attention_sweep_h200_merged_*.json``): one loop wins where kv runs are short or registers
    tight (documents, shared prefix, most of hd 64: 1.01-1.19x) and loses on long causal runs at hd 128
    (0.93-0.99x). ``LONGKIT_ATTN_MERGED_LOOPS`` ("fwd,dq", "none", ...) overrides (tuning only)."""
    env = os.environ.get("LONGKIT_ATTN_MERGED_LOOPS")
    if env is not None:
        return kernel in env.split(",")
    if flags["HAS_DOCS"] or flags["HAS_PREFIX"]:
        return True
    if kernel == "fwd":
        # hd 64 forward: every kind but q_global (0.87x); hd 128: only q_global (1.03x)
        return (head_dim <= 64) != flags["USE_GLOBAL"]
    return head_dim <= 64 and not (flags["HAS_WINDOW"] or flags["USE_GLOBAL"])


# name -> compiled kernel of the latest launch (register and spill counts for benchmarks/attention.py --sweep)
LAST_LAUNCH: dict[str, object] = {}


def launch_stats() -> dict[str, dict[str, int]]:
    """Registers per thread and spilled bytes of the kernels launched last (empty under the interpreter)."""
    return {name: {"regs": getattr(k, "n_regs", -1), "spills": getattr(k, "n_spills", -1)}
            for name, k in LAST_LAUNCH.items() if k is not None}


def _last_dim_contig(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else (t if t.stride(-1) == 1 else t.contiguous()) for t in ts]


def _add_partials(part: torch.Tensor, out: torch.Tensor, rows: slice) -> None:
    """``out[:, :, rows] = part[:, :, :, rows].sum(0)``: fp32 partial sums ``[n, B, H, T, D]`` of programs that
    split one output tile, added in a fixed order (deterministic) and cast to ``out``'s dtype. (A fused Triton
    sum timed the same on an H200, `attention_sweep_h200_gqa_split_heads2.json`.)"""
    out[:, :, rows] = part[:, :, :, rows].sum(0)


# GQA dk/dv partial sums: at most this many bytes of fp32 scratch (2 x B x Hq x Tk x D x 4 when fully split)
GQA_SPLIT_BUDGET = 2 << 30


def _gqa_heads_per_program(group: int, full_split_bytes: int, head_dim: int) -> int:
    """Query heads per dk/dv program under GQA. For head dims <= 64: 1 (each program one query head, fp32
    partials added up on the host) unless the scratch would exceed ``GQA_SPLIT_BUDGET``; then the smallest
    divisor of ``group`` that fits, up to ``group`` itself (no split, no scratch). Larger head dims: the whole
    group (an H200 run measured the split 1.04-1.11x faster at hd 64, within noise at hd 128, where its 2 GiB of
    scratch would be wasted). ``LONGKIT_ATTN_GQA_SPLIT`` overrides with a divisor of ``group`` (tests, tuning)."""
    env = os.environ.get("LONGKIT_ATTN_GQA_SPLIT")
    if env:
        if not env.isdigit() or int(env) < 1 or group % int(env):
            raise ValueError(f"LONGKIT_ATTN_GQA_SPLIT must be a divisor of the GQA group size {group}, got {env!r}")
        return int(env)
    if head_dim > 64:
        return group
    for d in range(1, group + 1):
        if group % d == 0 and (d == group or full_split_bytes <= d * GQA_SPLIT_BUDGET):
            return d
    return group


def _sink_chunk(n_m: int, programs: int, device: torch.device) -> int:
    """Query blocks per program for the sink kv blocks: enough programs to fill the GPU about twice, at least
    16 query blocks each (a chunk's partial sums cost one [BLOCK_N, D] fp32 write per accumulator).
    ``LONGKIT_ATTN_SINK_CHUNK`` overrides (tests use it to force several chunks)."""
    env = os.environ.get("LONGKIT_ATTN_SINK_CHUNK")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"LONGKIT_ATTN_SINK_CHUNK must be a positive integer, got {env!r}")
        return int(env)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    n_chunks = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(n_m, 16)))
    return triton.cdiv(n_m, n_chunks)


def _sink_dkdv(dkdv_args: tuple, dk: torch.Tensor, dv: torch.Tensor, dkg: torch.Tensor, meta_q: torch.Tensor,
               meta_k: torch.Tensor, scalars: tuple, consts: dict, flags: dict[str, bool], cfg: dict[str, int],
               n_sink_blk: int) -> object:
    """dk, dv, dk_global of the sink kv blocks (distance limit): fp32 partial sums per query chunk, added up
    here in a fixed order (deterministic), written into ``dk``/``dv``'s first rows and ``dkg``."""
    B, Hkv, Tk, D = dk.shape
    Tq = dkdv_args[0].shape[2]
    n_m = triton.cdiv(Tq, cfg["BLOCK_M"])
    m_chunk = _sink_chunk(n_m, n_sink_blk * B * Hkv, dk.device)
    n_chunks = triton.cdiv(n_m, m_chunk)
    t_out = n_sink_blk * cfg["BLOCK_N"]
    n_global = dkg.shape[2]
    part = torch.empty(2, n_chunks, B, Hkv, t_out, D, dtype=torch.float32, device=dk.device)
    part_g = torch.empty(n_chunks, B, Hkv, n_global, D, dtype=torch.float32, device=dk.device)
    launched = _bwd_dkdv_kernel[(n_sink_blk, B * Hkv, n_chunks)](
        *dkdv_args, part[0], part[1], part_g, meta_q, meta_k, *scalars, 0, m_chunk, t_out,
        part.stride(1), part_g.stride(0), **flags, **consts, **cfg, CHUNKED=True, SPLIT_HEADS=False,
    )
    rows = slice(0, min(t_out, Tk))
    _add_partials(part[0], dk, rows)
    _add_partials(part[1], dv, rows)
    dkg.copy_(part_g.sum(0))
    return launched


def _tma_dkdv_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                   flags: dict[str, bool], sink_block_n: int | None) -> dict[str, int] | None:
    """Tiles of the TMA dk/dv kernel (``dkdv_tma.py``) if it runs for these inputs, else None (the pointer
    kernel runs). With the distance limit its kv tile must match the sink launch's (``sink_block_n``)."""
    try:
        from .dkdv_tma import tma_dkdv_config, tma_dkdv_enabled  # imports this module's jit helpers
    except ImportError as e:  # an older Triton without host tensor descriptors: the pointer kernel runs
        if os.environ.get("LONGKIT_ATTN_TMA_DKDV") == "1":
            raise RuntimeError(f"LONGKIT_ATTN_TMA_DKDV=1 needs triton.tools.tensor_descriptor ({e})") from e
        return None
    if not tma_dkdv_enabled(q, k, v, grad_out):
        return None
    cfg = tma_dkdv_config(q.shape[-1], flags)
    if sink_block_n is not None and cfg["BLOCK_N"] != sink_block_n:
        return None
    return cfg


_MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's 2nd and 3rd dimensions


def check_grid(batch: int, heads: int) -> None:
    """The kernels put batch x query heads on the grid's second axis: refuse more than CUDA allows, clearly."""
    if batch * heads > _MAX_GRID_YZ:
        raise ValueError(f"batch x query heads = {batch} x {heads} = {batch * heads} exceeds {_MAX_GRID_YZ}, the most "
                         "the Triton masked-attention kernels launch; split the batch into chunks of at most "
                         f"{_MAX_GRID_YZ // heads} rows")


def flash_masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_global: torch.Tensor | None,
    k_global: torch.Tensor | None, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
    q_offset: int, n_global: int, n_local: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``n_local <= 0`` means no window. Returns ``(out, lse)``.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; q_global ``[B, Hq, Tq, D]`` and k_global
            ``[B, Hkv, n_global, D]`` or None. Inputs are trusted (validated by the public function).

    Returns:
        ``out [B, Hq, Tq, D]`` (q.dtype, contiguous) and ``lse [B, Hq, Tq]`` (fp32, natural log).
    """
    q, k, v, q_global, k_global = _last_dim_contig(q, k, v, q_global, k_global)
    B, Hq, Tq, D = q.shape
    check_grid(B, Hq)
    if _window_covers_all(q_offset, Tq, n_local):
        q_global = k_global = None
        n_global = n_local = 0
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if Tq == 0:
        return out, lse
    meta_q, _ = mask_tables(B, Tq, Tk, q_offset, cu_seqlens, segments, q.device)
    s_mb = meta_q.stride(0) if meta_q.dim() == 3 and meta_q.shape[0] > 1 else 0
    qg = q_global if q_global is not None else q
    kg = k_global if k_global is not None else k
    flags = _flags(n_local, cu_seqlens, segments, q_global)
    from .fwd_ws import launch_ws_fwd, ws_fwd_enabled  # imports this module's helpers

    if ws_fwd_enabled(q, k, v, flags, n_global):  # Hopper, causal or Λ: TMA loads and a producer warp (fwd_ws.py)
        LAST_LAUNCH["fwd"] = launch_ws_fwd(q, k, v, out, lse, q_offset, scale * _LOG2E, n_global, n_local)
        return out, lse
    cfg = _fwd_config(D, flags)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    LAST_LAUNCH["fwd"] = _fwd_kernel[grid](
        q, k, v, qg, kg, out, lse, meta_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2), out.stride(0), out.stride(1), out.stride(2), s_mb,
        Hq, Hq // Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * _LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        FAST_PATH=_fast_path(), MERGED=_merged_loops("fwd", D, flags), **flags, **cfg,
    )
    return out, lse


def flash_masked_attention_bwd(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_global: torch.Tensor | None,
    k_global: torch.Tensor | None, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
    q_offset: int, n_global: int, n_local: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Deterministic backward. Returns ``(dq, dk, dv, dq_global, dk_global)`` (the last two None
    without the distance limit); gradients in the input dtypes, contiguous."""
    if _window_covers_all(q_offset, q.shape[2], n_local):  # causal, as in the forward
        dq, dk, dv, _, _ = flash_masked_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, None, None, cu_seqlens,
                                                      segments, q_offset, 0, 0, scale)
        if q_global is None:
            return dq, dk, dv, None, None
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q_global, k_global)]
        return dq, dk, dv, *zeros
    q, k, v, q_global, k_global, grad_out = _last_dim_contig(q, k, v, q_global, k_global, grad_out)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, Tk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, Hkv, Tk, D, dtype=v.dtype, device=q.device)
    dqg = torch.empty_like(dq) if q_global is not None else None
    dkg = torch.zeros(k_global.shape, dtype=k_global.dtype, device=q.device) if k_global is not None else None
    if Tq == 0:
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, dqg, dkg
    meta_q, meta_k = mask_tables(B, Tq, Tk, q_offset, cu_seqlens, segments, q.device)
    s_mb = meta_q.stride(0) if meta_q.dim() == 3 and meta_q.shape[0] > 1 else 0
    s_mkb = meta_k.stride(0) if meta_k.dim() == 3 and meta_k.shape[0] > 1 else 0
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    pre_bm = 64
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre_bm), B * Hq)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), Hq, Tq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_bm,
        HAS_DLSE=grad_lse is not None,
    )
    qg = q_global if q_global is not None else q
    kg = k_global if k_global is not None else k
    flags = _flags(n_local, cu_seqlens, segments, q_global)
    cfg_kv, cfg_q = _bwd_config(D, flags)
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    dkdv_args = (q, k, v, qg, kg, grad_out, lse, delta)
    scalars = (*common_strides, s_mb, s_mkb, Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0),
               scale * _LOG2E, scale)
    consts = {"GROUP": Hq // Hkv, "HEAD_DIM": D, "BLOCK_D": block_d, "FAST_PATH": _fast_path()}
    n_kv_blk = triton.cdiv(Tk, cfg_kv["BLOCK_N"])
    for name in ("bwd_dkdv", "bwd_dkdv_sink"):
        LAST_LAUNCH.pop(name, None)
    # With the distance limit only the sink kv blocks need the q_global/k_global variant, which holds a third
    # accumulator (narrower tiles, spills). The other kv blocks run the plain sink-window kernel; the sink
    # blocks, which every query sees, get their own launch split over query chunks (else B*Hkv programs would
    # each walk all of Tq alone at the end of the backward).
    n_sink_blk = min(triton.cdiv(n_global, cfg_kv["BLOCK_N"]), n_kv_blk) if q_global is not None else 0
    tma_cfg = _tma_dkdv_plan(q, k, v, grad_out, flags, cfg_kv["BLOCK_N"] if n_sink_blk else None)
    if n_kv_blk > n_sink_blk and tma_cfg is not None:
        # Hopper: every load through a TMA descriptor, one loop with the elementwise mask (dkdv_tma.py)
        from .dkdv_tma import launch_tma_dkdv

        LAST_LAUNCH["bwd_dkdv"] = launch_tma_dkdv(q, k, v, grad_out, lse, delta, dk, dv, meta_q, meta_k, s_mkb,
                                                 q_offset, n_global, n_local, scale, flags, n_sink_blk, tma_cfg)
    elif n_kv_blk > n_sink_blk:
        cfg_main = _bwd_config(D, {**flags, "USE_GLOBAL": False})[0] if n_sink_blk else cfg_kv
        if cfg_main["BLOCK_N"] != cfg_kv["BLOCK_N"]:
            raise ValueError(f"dk/dv tiles {cfg_main} and {cfg_kv} (distance limit) need the same BLOCK_N")
        per_prog = _gqa_heads_per_program(Hq // Hkv, B * Hq * Tk * D * 8, D)
        if per_prog == Hq // Hkv:
            LAST_LAUNCH["bwd_dkdv"] = _bwd_dkdv_kernel[(n_kv_blk - n_sink_blk, B * Hkv, 1)](
                *dkdv_args, dk, dv, dk, meta_q, meta_k, *scalars, n_sink_blk, 0, Tk, 0, 0,
                **{**flags, "USE_GLOBAL": False}, **consts, **cfg_main, CHUNKED=False, SPLIT_HEADS=False,
            )
        else:
            # GQA: one program per (kv block, subset of the group's query heads), fp32 partials summed here.
            # A kv-block program that walks all GROUP heads runs GROUP x longer, and the last heads' heaviest
            # programs then finish long after the rest (measured: GQA dk/dv 1.2x MHA's time at hd 64).
            n_split = (Hq // Hkv) // per_prog
            part = torch.empty(2, n_split, B, Hkv, Tk, D, dtype=torch.float32, device=dk.device)
            LAST_LAUNCH["bwd_dkdv"] = _bwd_dkdv_kernel[(n_kv_blk - n_sink_blk, B * Hkv, n_split)](
                *dkdv_args, part[0], part[1], dk, meta_q, meta_k, *scalars, n_sink_blk, 0, Tk, part.stride(1), 0,
                **{**flags, "USE_GLOBAL": False}, **{**consts, "GROUP": per_prog}, **cfg_main, CHUNKED=False,
                SPLIT_HEADS=True,
            )
            rows = slice(n_sink_blk * cfg_kv["BLOCK_N"], None)
            _add_partials(part[0], dk, rows)
            _add_partials(part[1], dv, rows)
    if n_sink_blk:
        LAST_LAUNCH["bwd_dkdv_sink"] = _sink_dkdv(dkdv_args, dk, dv, dkg, meta_q, meta_k, scalars, consts, flags,
                                                  cfg_kv, n_sink_blk)
    LAST_LAUNCH["bwd_dq"] = _bwd_dq_kernel[(triton.cdiv(Tq, cfg_q["BLOCK_M"]), B * Hq)](
        q, k, v, qg, kg, grad_out, lse, delta, dq, dqg if dqg is not None else dq, meta_q,
        *common_strides, s_mb,
        Hq, Hq // Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * _LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=block_d, FAST_PATH=_fast_path(), MERGED=_merged_loops("dq", D, flags),
        **flags, **cfg_q,
    )
    return dq, dk, dv, dqg, dkg


def default_scale(head_dim: int) -> float:
    """``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)
