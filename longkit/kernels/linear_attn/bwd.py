"""Backward ``@triton.jit`` kernels of chunked linear attention with per-token scalar log gates.

Same notation as ``fwd.py``; ``h_c`` is the state entering chunk ``c`` (recomputed by the forward state kernel) and
``dh_c`` the gradient of the state *leaving* chunk ``c`` (the loss's gradient through every later chunk and the
final state). With ``A_ij = scale (q_i . k_j) exp(G_i - G_j)`` for ``j <= i`` and ``dA_ij = do_i . v_j``:

* ``_chunk_dh_kernel``: reverse recurrence ``dh_{c-1} = exp(G_last) dh_c + scale (Q * exp(G))^T dO``, starting from
  the final state's gradient; what is left after chunk 0 is the initial state's gradient.
* ``_chunk_dv_kernel``: ``dv_j = exp(G_last - G_j) k_j dh_c + sum_i A_ij do_i``.
* ``_chunk_dqkg_kernel``: ``dq_i = scale (exp(G_i) do_i h_c^T + sum_{j<=i} exp(G_i - G_j) dA_ij k_j)``,
  ``dk_j = exp(G_last - G_j) v_j dh_c^T + scale sum_{i>=j} exp(G_i - G_j) dA_ij q_i``, and the gradient of the
  chunk-local cumulative gate
  ``dG_i = q_i . dq_i - k_i . dk_i``, plus, on the chunk's last row, ``exp(G_last) <h_c, dh_c> + sum_j k_j .
  dk_state_j`` (the total decay's own terms). The host sums the Dk tiles' partial ``dG`` and turns it into the
  per-token ``dg`` with a reverse cumulative sum inside each chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _mm

__all__ = ["_chunk_dh_kernel", "_chunk_dv_kernel", "_chunk_dqkg_kernel"]


@triton.jit(do_not_specialize=["T", "NT"])
def _chunk_dh_kernel(
    q, do, gc, dh, dht, dh0,
    s_qb, s_qh, s_qt, s_ob, s_oh, s_ot,
    scale, T, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    q_base = q + i_b * s_qb + i_h * s_qh
    do_base = do + i_b * s_ob + i_h * s_oh
    g_base = gc + i_bh * NT * BT
    dh_base = dh + i_bh * NT * K * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht = tl.make_block_ptr(dht + i_bh * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_dh += tl.load(p_dht, boundary_check=(0, 1)).to(tl.float32)
    o_t = tl.arange(0, BT)
    for i in range(NT):
        i_t = NT - 1 - i
        p_dh = tl.make_block_ptr(dh_base + i_t * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh, b_dh, boundary_check=(0, 1))
        p_q = tl.make_block_ptr(q_base, (K, T), (1, s_qt), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_do = tl.make_block_ptr(do_base, (T, V), (s_ot, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_do = tl.load(p_do, boundary_check=(0, 1))
        b_g = tl.load(g_base + i_t * BT + o_t)
        b_glast = tl.load(g_base + i_t * BT + BT - 1)
        b_qd = (b_q * (tl.exp(b_g) * scale)[None, :]).to(b_do.dtype)
        b_dh = b_dh * tl.exp(b_glast) + _mm(b_qd, b_do, IEEE, UPCAST)
    if STORE_DH0:
        p_dh0 = tl.make_block_ptr(dh0 + i_bh * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        tl.store(p_dh0, b_dh, boundary_check=(0, 1))


@triton.jit(do_not_specialize=["T", "NT"])
def _chunk_dv_kernel(
    q, k, do, gc, dh, dv,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_ob, s_oh, s_ot,
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
    dh_base = dh + (i_bh * NT + i_t) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)  # b_a[j, i] = k_j . q_i
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k_base, (T, K), (s_kt, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
        p_q = tl.make_block_ptr(q_base, (K, T), (1, s_qt), (i_k * BK, i_t * BT), (BK, BT), (0, 1))
        p_dh = tl.make_block_ptr(dh_base, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_dh = tl.load(p_dh, boundary_check=(0, 1)).to(b_k.dtype)
        b_a += _mm(b_k, b_q, IEEE, UPCAST)
        b_dv += _mm(b_k, b_dh, IEEE, UPCAST)
    o_t = tl.arange(0, BT)
    b_g = tl.load(gc + i_bh * NT * BT + i_t * BT + o_t)
    b_glast = tl.load(gc + i_bh * NT * BT + i_t * BT + BT - 1)
    b_dv = b_dv * tl.exp(b_glast - b_g)[:, None]
    visible = o_t[:, None] <= o_t[None, :]  # key j (row) is seen by query i (column) when j <= i
    b_a = b_a * tl.exp(tl.where(visible, b_g[None, :] - b_g[:, None], float("-inf"))) * scale
    p_do = tl.make_block_ptr(do + i_b * s_ob + i_h * s_oh, (T, V), (s_ot, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    b_do = tl.load(p_do, boundary_check=(0, 1))
    b_dv += _mm(b_a.to(b_do.dtype), b_do, IEEE, UPCAST)
    p_dv = tl.make_block_ptr(dv + i_bh * T * V, (T, V), (V, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), boundary_check=(0, 1))


@triton.jit(do_not_specialize=["T", "NT"])
def _chunk_dqkg_kernel(
    q, k, v, gc, h, do, dh, dq, dk, dg,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    scale, T, NT, BH,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    v_base = v + i_b * s_vb + i_h * s_vh
    do_base = do + i_b * s_ob + i_h * s_oh
    h_base = h + (i_bh * NT + i_t) * K * V
    dh_base = dh + (i_bh * NT + i_t) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # b_ds[i, j] = do_i . v_j
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # <h_c, dh_c> over this Dk tile, per key dim
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v_base, (T, V), (s_vt, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        p_vt = tl.make_block_ptr(v_base, (V, T), (1, s_vt), (i_v * BV, i_t * BT), (BV, BT), (0, 1))
        p_do = tl.make_block_ptr(do_base, (T, V), (s_ot, 1), (i_t * BT, i_v * BV), (BT, BV), (1, 0))
        # h_c and dh_c transposed: [BV, BK] tiles of the row-major [K, V] matrices
        p_h = tl.make_block_ptr(h_base, (V, K), (1, V), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
        p_dh = tl.make_block_ptr(dh_base, (V, K), (1, V), (i_v * BV, i_k * BK), (BV, BK), (0, 1))
        b_v = tl.load(p_v, boundary_check=(0, 1))
        b_vt = tl.load(p_vt, boundary_check=(0, 1))
        b_do = tl.load(p_do, boundary_check=(0, 1))
        b_h = tl.load(p_h, boundary_check=(0, 1))
        b_dh = tl.load(p_dh, boundary_check=(0, 1))
        b_hdh += tl.sum(b_h * b_dh, 0)
        b_ds += _mm(b_do, b_vt, IEEE, UPCAST)
        b_dq += _mm(b_do, b_h.to(b_do.dtype), IEEE, UPCAST)
        b_dk += _mm(b_v, b_dh.to(b_v.dtype), IEEE, UPCAST)
    o_t = tl.arange(0, BT)
    b_g = tl.load(gc + i_bh * NT * BT + i_t * BT + o_t)
    b_glast = tl.load(gc + i_bh * NT * BT + i_t * BT + BT - 1)
    p_q = tl.make_block_ptr(q + i_b * s_qb + i_h * s_qh, (T, K), (s_qt, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_k = tl.make_block_ptr(k + i_b * s_kb + i_h * s_kh, (T, K), (s_kt, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    b_q = tl.load(p_q, boundary_check=(0, 1))
    b_k = tl.load(p_k, boundary_check=(0, 1))
    b_dq = b_dq * (tl.exp(b_g) * scale)[:, None]
    b_dk = b_dk * tl.exp(b_glast - b_g)[:, None]
    # the total decay G_last scales h_c and every decayed key of the state update
    b_dglast = tl.sum(b_hdh, 0) * tl.exp(b_glast) + tl.sum(tl.sum(b_dk * b_k.to(tl.float32), 1), 0)
    causal = o_t[:, None] >= o_t[None, :]
    b_ds = b_ds * tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf"))) * scale
    b_dq += _mm(b_ds.to(b_k.dtype), b_k, IEEE, UPCAST)
    b_dk += _mm(tl.trans(b_ds).to(b_q.dtype), b_q, IEEE, UPCAST)
    b_dg = tl.sum(b_dq * b_q.to(tl.float32), 1) - tl.sum(b_dk * b_k.to(tl.float32), 1)
    b_dg = tl.where(o_t == BT - 1, b_dg + b_dglast, b_dg)
    p_dq = tl.make_block_ptr(dq + i_bh * T * K, (T, K), (K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    p_dk = tl.make_block_ptr(dk + i_bh * T * K, (T, K), (K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0))
    tl.store(p_dq, b_dq.to(dq.dtype.element_ty), boundary_check=(0, 1))
    tl.store(p_dk, b_dk.to(dk.dtype.element_ty), boundary_check=(0, 1))
    tl.store(dg + (i_k * BH + i_bh) * NT * BT + i_t * BT + o_t, b_dg)
