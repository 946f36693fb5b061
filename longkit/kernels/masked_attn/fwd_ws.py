"""Causal and Λ forward kernels for Hopper: TMA loads and warp specialisation (plain causal, GQA, sinks + window).

Same math and outputs as the pointer forward (:func:`fwd._fwd_kernel`) restricted to the causal and Λ masks
(``q_offset`` included): no documents, shared prefix or q_global. Why a second kernel: an ``ncu`` profile of the
hd 128 × 4k causal forward (H200, ``docs/kernel_notes.md``) put 23% of the pointer kernel's warp time outside its
unmasked kv loop (loading q, filling the software pipeline, the diagonal block, the epilogue), at one CTA per SM with
nothing to overlap it, and 16 ``cp.async`` plus their address arithmetic inside every iteration. Here every load is a
TMA descriptor load (made in the kernel) and ``tl.range(..., warp_specialize=True)`` hands them to a producer warp,
so the two consumer warpgroups only multiply and exponentiate, as cuDNN's kernel does.

Triton 3.6's Hopper warp specialisation needs every load in a descriptor and a single loop body without
data-dependent branches, so the causal mask is one compare and select per score on every block.

Three programs: :func:`_fwd_ws_kernel` (one program per query block), :func:`_fwd_ws_paired_kernel` (persistent,
over query-block pairs of equal work) and :func:`_fwd_ws_window_kernel` (the Λ mask). ``plan.py`` decides when they
run, ``launch_hopper.py`` launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tma_ws import flat_rows_desc


@triton.jit
def _ws_update(acc, l_i, m_i, s, v_desc, v_row, sm_scale_log2):
    """One online-softmax step of the specialised loops: masked raw scores ``s`` (log2 scaling inside the
    exponentials), then the value block at row ``v_row`` (loaded after the exponentials, the order these kernels
    were timed in)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * sm_scale_log2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = v_desc.load([v_row, 0])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, lim, sm_scale_log2, j_lo, j_hi,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    """Online softmax over kv blocks ``[j_lo, j_hi)``, keeping only keys ``<= lim`` (per row)."""
    for j in tl.range(j_lo, j_hi, warp_specialize=WS):
        start_n = j * BLOCK_N
        k = k_desc.load([kv_row0 + start_n, 0])
        s = tl.dot(q, k.T)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] <= lim[:, None], s, float("-inf"))
        acc, l_i, m_i = _ws_update(acc, l_i, m_i, s, v_desc, kv_row0 + start_n, sm_scale_log2)
    return acc, l_i, m_i


@triton.jit
def _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM: tl.constexpr):
    """Normalise and store a query block's rows ``offs_m`` of head ``bh`` (contiguous ``Out``, natural-log ``LSE``,
    -inf where a row sees no key). A pointer store: Triton 3.6's warp-specialisation pass fails to compile the kernel
    with a descriptor store."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < Tq
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             INNER_WS: tl.constexpr):
    """Query block ``pid_m`` of flattened query head ``bh`` (= b * Hq + h): load q, run the kv loop, store."""
    kv_row0 = ((bh // Hq) * Hkv + (bh % Hq) // GROUP) * Tk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # a row sees keys 0..min(its position, Tk - 1); the mask drops the rows read past Tk (next head's, or zeros)
    lim = tl.minimum(q_offset + offs_m, Tk - 1)
    q = q_desc.load([bh * Tq + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_blk = tl.cdiv(tl.maximum(tl.minimum(Tk, q_offset + start_m + BLOCK_M), 0), BLOCK_N)
    # one loop, the mask on every block: Triton 3.6 specialises only a kernel whose every descriptor load sits in
    # one loop without data-dependent branches (an unmasked loop plus a masked one fails to compile)
    acc, l_i, m_i = _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, lim, sm_scale_log2, 0, n_blk,
                              HEAD_DIM, BLOCK_N, INNER_WS)
    _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])
def _fwd_ws_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    """Program ``(i, b * Hq + h)``: query block ``n_blocks - 1 - i`` (heavy blocks first) of query head ``h``.
    ``Out`` is contiguous ``[B, Hq, Tq, HEAD_DIM]``; ``LSE`` ``[B, Hq, Tq]`` (natural log, -inf for rows that see
    no key)."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    # 2-D descriptors over the flattened rows (tma_ws.py says why); rows read past a head's end are masked
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
             GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, WS)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])
def _fwd_ws_paired_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    """The same tiles, persistent: program ``p`` of ``P`` walks items ``p, p + P, ...``, item ``i`` of head ``bh``
    being the query-block pair ``(n - 1 - i, i)``. A pair costs ``n + 1`` kv blocks (plus twice the offset's) whatever
    ``i``, so every program gets the same work to within one pair, and one program's specialised loop spans all its
    tiles: the producer loads the next tile's q and k/v while the consumers finish the current one's epilogue. With
    an odd ``n`` the middle block is its own pair and is computed twice (the same values stored twice)."""
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    n_m = tl.cdiv(Tq, BLOCK_M)
    per_head = (n_m + 1) // 2
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for t in tl.range(0, 2 * tl.cdiv(B * Hq * per_head - pid, n_prog), warp_specialize=WS):
        item = pid + (t // 2) * n_prog
        bh = item // per_head
        i = item - bh * per_head
        pid_m = tl.where(t % 2 == 0, n_m - 1 - i, i)
        _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
                 GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, False)


@triton.jit
def _interval(lo, hi):
    """Per-row key interval ``lo .. hi`` as ``(lo, span)`` for :func:`_ws_window_inner`; an empty one (``hi < lo``)
    as a start no key reaches."""
    dead = hi < lo
    return tl.where(dead, 1 << 30, lo), tl.where(dead, 0, hi - lo)


@triton.jit
def _ws_window_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, sm_scale_log2, j_lo, j_hi, lo_w, span_w, lo_s,
                     span_s, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     WS: tl.constexpr):
    """Online softmax over the window's kv blocks ``[j_lo, j_hi)``, keys ``lo_w .. lo_w + span_w`` per row, preceded
    (``HAS_SINKS``) by kv block 0 with keys ``lo_s .. lo_s + span_s`` (the sinks outside each row's window). One
    subtraction and one unsigned compare per score: Triton 3.6 specialises one loop with no branch, so the mask runs
    on every block, and a tile of sinks before the loop fails in its pass."""
    for it in tl.range(j_lo - HAS_SINKS, j_hi, warp_specialize=WS):
        sink = it < j_lo
        start_n = tl.where(sink, 0, it * BLOCK_N)
        lo = tl.where(sink, lo_s, lo_w)
        span = tl.where(sink, span_s, span_w)
        k = k_desc.load([kv_row0 + start_n, 0])
        s = tl.dot(q, k.T)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        vis = (tl.cast(offs_n[None, :] - lo[:, None], tl.uint32, bitcast=True)
               <= tl.cast(span[:, None], tl.uint32, bitcast=True))
        s = tl.where(vis, s, float("-inf"))
        acc, l_i, m_i = _ws_update(acc, l_i, m_i, s, v_desc, kv_row0 + start_n, sm_scale_log2)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local"])
def _fwd_ws_window_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SINKS: tl.constexpr, WS: tl.constexpr,
):
    """The Λ mask (``n_global`` sinks, a window of ``n_local`` keys), program ``(i, b * Hq + h)`` as in
    :func:`_fwd_ws_kernel`. Applying the whole mask, three compares, on every score made a specialised Λ forward
    slower than the pointer kernel; here each row's visible keys in a block are one interval: the window's
    ``pos - n_local + 1 .. pos`` in the window's blocks, and in a leading pass over block 0 the sinks outside the
    window, ``0 .. min(n_global - 1, pos - n_local)``."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    kv_row0 = ((bh // Hq) * Hkv + (bh % Hq) // GROUP) * Tk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos = q_offset + offs_m
    # keys past Tk are never visible (a flattened descriptor reads the next head's rows there)
    lim = tl.minimum(pos, Tk - 1)
    lo_w, span_w = _interval(pos - n_local + 1, lim)
    lo_s, span_s = _interval(pos * 0, tl.minimum(tl.minimum(pos - n_local, n_global - 1), lim))
    q = q_desc.load([bh * Tq + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    j_lo = tl.maximum(q_offset + start_m - n_local + 1, 0) // BLOCK_N
    j_hi = tl.cdiv(tl.maximum(tl.minimum(Tk, q_offset + start_m + BLOCK_M), 0), BLOCK_N)
    acc, l_i, m_i = _ws_window_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, sm_scale_log2, j_lo, j_hi,
                                     lo_w, span_w, lo_s, span_s, HAS_SINKS, HEAD_DIM, BLOCK_N, WS)
    _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM)
