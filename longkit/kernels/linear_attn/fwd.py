"""Forward ``@triton.jit`` kernels of chunked linear attention with per-token scalar log gates.

Notation (one batch row and head; chunk of ``BT`` tokens; ``G`` the chunk-local cumulative log gate, read from the
host-built ``gc`` table, which is zero-padded to whole chunks so ``G[BT - 1]`` is the chunk's total decay):

* ``_chunk_state_fwd_kernel``: the inter-chunk recurrence ``h_{c+1} = exp(G_last) h_c + (K * exp(G_last - G))^T V``,
  one program per (Dk tile, Dv tile, batch × head), looping over the chunks in order; it stores ``h_c``, the fp32
  state entering chunk ``c``, and optionally the final state.
* ``_chunk_o_fwd_kernel``: ``o = scale * (exp(G) * (Q h_c) + (tril(Q K^T) * exp(G_i - G_j)) V)``, one program per
  (Dv tile, chunk, batch × head), independent across chunks.

Matmul operands are in the inputs' dtype (fp32 accumulation), as flash-linear-attention does; fp32 inputs use
exact fp32 dots (``_jit._mm``), not tf32. Every exponent is ``<= 0``.
The batch × head offset is int64 (tile offsets inside one head stay int32, as block pointers require).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _mm

__all__ = ["_chunk_state_fwd_kernel", "_chunk_o_fwd_kernel"]


@triton.jit(do_not_specialize=["T", "NT"])
def _chunk_state_fwd_kernel(
    k, v, gc, h, h0, ht,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    k_base = k + i_b * s_kb + i_h * s_kh
    v_base = v + i_b * s_vb + i_h * s_vh
    g_base = gc + i_bh * NT * BT
    h_base = h + i_bh * NT * K * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0 = tl.make_block_ptr(h0 + i_bh * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_h += tl.load(p_h0, boundary_check=(0, 1)).to(tl.float32)
    o_t = tl.arange(0, BT)
    for i_t in range(NT):
        p_h = tl.make_block_ptr(h_base + i_t * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_h, b_h, boundary_check=(0, 1))
        p_k = tl.make_block_ptr(k_base, (K, T), (1, s_kt), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_v = tl.make_block_ptr(v_base, (T, V), (s_vt, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        b_v = tl.load(p_v, boundary_check=(0, 1))
        b_g = tl.load(g_base + i_t * BT + o_t)
        b_glast = tl.load(g_base + i_t * BT + BT - 1)
        b_kd = (b_k * tl.exp(b_glast - b_g)[None, :]).to(b_v.dtype)
        b_h = b_h * tl.exp(b_glast) + _mm(b_kd, b_v, IEEE, UPCAST)
    if STORE_HT:
        p_ht = tl.make_block_ptr(ht + i_bh * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_ht, b_h, boundary_check=(0, 1))


@triton.jit(do_not_specialize=["T", "NT"])
def _chunk_o_fwd_kernel(
    q, k, v, gc, h, o,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    q_base = q + i_b * s_qb + i_h * s_qh
    k_base = k + i_b * s_kb + i_h * s_kh
    v_base = v + i_b * s_vb + i_h * s_vh
    h_base = h + (i_bh * NT + i_t) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        p_q = tl.make_block_ptr(q_base, (T, K), (s_qt, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_k = tl.make_block_ptr(k_base, (K, T), (1, s_kt), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_h = tl.make_block_ptr(h_base, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        b_h = tl.load(p_h, boundary_check=(0, 1)).to(b_q.dtype)
        b_o += _mm(b_q, b_h, IEEE, UPCAST)
        b_s += _mm(b_q, b_k, IEEE, UPCAST)
    o_t = tl.arange(0, BT)
    b_g = tl.load(gc + i_bh * NT * BT + i_t * BT + o_t)
    b_o = b_o * tl.exp(b_g)[:, None]
    causal = o_t[:, None] >= o_t[None, :]
    # the exponent is masked before exp: above the diagonal G_i - G_j may be large and positive
    b_s = b_s * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    p_v = tl.make_block_ptr(v_base, (T, V), (s_vt, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_v = tl.load(p_v, boundary_check=(0, 1))
    b_o += _mm(b_s.to(b_v.dtype), b_v, IEEE, UPCAST)
    p_o = tl.make_block_ptr(o + i_bh * T * V, (T, V), (V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), boundary_check=(0, 1))
