"""Fused decode attention over the packed cache: split-K partial softmax, then a combine kernel.

``_decode_split_kernel``: one program per (block of ``BLOCK_M`` query rows, batch row × KV head, context split).
Its rows are the ``G·Tq`` (query head of this KV head, query token) pairs, so the ``G`` query heads of a KV head
share every key and value tile it reads (GQA without repeating K/V). Per ``BLOCK_N`` tokens it loads the packed
key bytes, unpacks and dequantizes them in registers (``code·scale + zero`` in fp32, or ``centroid[code]·scale``
with the Gaussian codebook, then the query's dtype),
computes ``q·k`` with ``tl.dot`` (fp32 accumulation), adds the QJL estimate ``coef·||r||·<S q, ±1>``, masks
(``lengths``, causal), and runs the fp32 online softmax (``exp2``, ``log2(e)`` folded into the scale) against the
dequantized value tile. It writes its split's unnormalised-then-normalised output and log2-sum-exp in fp32.
``_combine_kernel``: one program per (row, head, query token) weights the splits by their log-sum-exps.
Nothing dequantized is written to global memory. Queries come rotated and in tile order (``_jit.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _mm, _tile_channels, _unpack_tile

__all__ = ["_decode_split_kernel", "_combine_kernel"]


@triton.jit
def _load_dequant(CODES, scb, sch, sct, SCALE, ZERO, LUT, ssb, ssh, sst, b, h, n, n_ok,
                  BITS: tl.constexpr, S: tl.constexpr, NS: tl.constexpr, NS_PAD: tl.constexpr,
                  NPLANES: tl.constexpr, GROUP: tl.constexpr, CHANNEL_AXIS: tl.constexpr, CODEBOOK: tl.constexpr,
                  RAW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantized fp32 tile ``[BLOCK_N, S·NS_PAD]`` (tile order) of tokens ``n``; zeros where masked."""
    W: tl.constexpr = S * NS_PAD
    chan, valid = _tile_channels(W, NS, NS_PAD)
    n64 = n.to(tl.int64)
    mask = n_ok[:, None] & valid[None, :]
    if RAW:
        x = tl.load(CODES + b * scb + h * sch + n64[:, None] * sct + chan[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
    else:
        codes = _unpack_tile(CODES + b * scb + h * sch, n64 * sct, n_ok, BITS, S, NS, NS_PAD, NPLANES, BLOCK_N)
        if CODEBOOK and BITS <= 3:  # centroid of the Gaussian codebook: a select chain over <= 8 scalars
            y = tl.zeros_like(codes).to(tl.float32) + tl.load(LUT)  # (ALU work instead of a gather per element)
            for i in tl.static_range(1, 1 << BITS):
                y = tl.where(codes == i, tl.load(LUT + i), y)
        elif CODEBOOK:  # 16 entries: one gather per element from a table that stays in L1
            y = tl.load(LUT + codes)
        else:
            y = codes.to(tl.float32)
        NGT: tl.constexpr = W // GROUP
        if (not CHANNEL_AXIS) and NS_PAD == NS and W % GROUP == 0 and (NGT & (NGT - 1)) == 0:
            # Tile order is channel order here, so a group is a run of GROUP columns: load the [BLOCK_N, NGT]
            # scales (and zeros) once and broadcast them, instead of one gathered load per element.
            goff = b * ssb + h * ssh + n64[:, None] * sst + tl.arange(0, NGT)[None, :]
            sc = tl.load(SCALE + goff, mask=n_ok[:, None], other=0.0).to(tl.float32)
            y3 = tl.reshape(y, (BLOCK_N, NGT, GROUP)) * sc[:, :, None]
            if not CODEBOOK:
                ze = tl.load(ZERO + goff, mask=n_ok[:, None], other=0.0).to(tl.float32)
                y3 = y3 + ze[:, :, None]
            x = tl.reshape(y3, (BLOCK_N, W))
        else:
            if CHANNEL_AXIS:
                soff = b * ssb + h * ssh + (n64 // GROUP)[:, None] * sst + chan[None, :]
            else:
                soff = b * ssb + h * ssh + n64[:, None] * sst + (chan // GROUP)[None, :]
            sc = tl.load(SCALE + soff, mask=mask, other=0.0).to(tl.float32)
            x = y * sc
            if not CODEBOOK:
                x = x + tl.load(ZERO + soff, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _decode_split_kernel(
    Q, sqb, sqh, sqt,  # rotated queries [B, Hq, Tq, KW] (tile order), compute dtype
    QS, ssb_, ssh_, sst_,  # QJL query sketches [B, Hq, Tq, 8·MS_PAD] (tile order), compute dtype
    KC, skb, skh, skt,
    KS, KZ, KLUT, sksb, sksh, skst,
    KQ, skqb, skqh, skqt,
    RN, srb, srh, srt,
    VC, svb, svh, svt,
    VS, VZ, VLUT, svsb, svsh, svst,
    LENS,
    OP, sob, soh, sot, sos,  # partial outputs [B, Hq, Tq, SPLITS, D] fp32 (stored-channel order)
    LP, slb, slh, slt,  # partial log2-sum-exp [B, Hq, Tq, SPLITS] fp32
    Hkv, Tq, T, split_len, qk_scale, qjl_coef,
    G: tl.constexpr,
    K_BITS: tl.constexpr, K_S: tl.constexpr, K_NS: tl.constexpr, K_NS_PAD: tl.constexpr, K_PLANES: tl.constexpr,
    K_GROUP: tl.constexpr, K_CHANNEL_AXIS: tl.constexpr, K_RAW: tl.constexpr,
    V_BITS: tl.constexpr, V_S: tl.constexpr, V_NS: tl.constexpr, V_NS_PAD: tl.constexpr, V_PLANES: tl.constexpr,
    V_GROUP: tl.constexpr, V_RAW: tl.constexpr,
    QJL: tl.constexpr, M: tl.constexpr, MS_PAD: tl.constexpr, CODEBOOK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    h = (pid_bh % Hkv).to(tl.int64)
    KW: tl.constexpr = K_S * K_NS_PAD
    VW: tl.constexpr = V_S * V_NS_PAD
    MW: tl.constexpr = 8 * MS_PAD
    DT = Q.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Tq
    g = rows // Tq
    tq = rows % Tq
    hq = (h * G + g).to(tl.int64)
    q_row = b * sqb + hq * sqh + tq.to(tl.int64) * sqt
    q = tl.load(Q + q_row[:, None] + tl.arange(0, KW)[None, :], mask=row_ok[:, None], other=0.0)
    if QJL:
        qs_row = b * ssb_ + hq * ssh_ + tq.to(tl.int64) * sst_
        qs = tl.load(QS + qs_row[:, None] + tl.arange(0, MW)[None, :], mask=row_ok[:, None], other=0.0)

    length = T
    if HAS_LENS:
        length = tl.minimum(tl.load(LENS + b).to(tl.int32), T)
    lo = pid_s * split_len
    hi = tl.minimum(lo + split_len, length)
    last = length - Tq + tq  # causal: last visible slot per row

    m_i = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, VW), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k = _load_dequant(KC, skb, skh, skt, KS, KZ, KLUT, sksb, sksh, skst, b, h, n, n_ok, K_BITS, K_S, K_NS,
                          K_NS_PAD, K_PLANES, K_GROUP, K_CHANNEL_AXIS, CODEBOOK, K_RAW, BLOCK_N)
        s = _mm(q, tl.trans(k), DT, PREC)
        if QJL:
            sg = _unpack_tile_signs(KQ, skqb, skqh, skqt, b, h, n, n_ok, M, MS_PAD, BLOCK_N)
            c = _mm(qs, tl.trans(sg), DT, PREC)
            rn = tl.load(RN + b * srb + h * srh + n.to(tl.int64) * srt, mask=n_ok, other=0.0).to(tl.float32)
            s += c * (qjl_coef * rn)[None, :]
        s = s * qk_scale
        vis = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            vis = vis & (n[None, :] <= last[:, None])
        s = tl.where(vis, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_dequant(VC, svb, svh, svt, VS, VZ, VLUT, svsb, svsh, svst, b, h, n, n_ok, V_BITS, V_S, V_NS,
                          V_NS_PAD, V_PLANES, V_GROUP, False, CODEBOOK, V_RAW, BLOCK_N)
        acc = acc * alpha[:, None] + _mm(p, v, DT, PREC)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), -float("inf"))
    vchan, vvalid = _tile_channels(VW, V_NS, V_NS_PAD)
    o_row = b * sob + hq * soh + tq.to(tl.int64) * sot + pid_s * sos
    tl.store(OP + o_row[:, None] + vchan[None, :], out, mask=row_ok[:, None] & vvalid[None, :])
    tl.store(LP + b * slb + hq * slh + tq.to(tl.int64) * slt + pid_s, lse2, mask=row_ok)


@triton.jit
def _unpack_tile_signs(KQ, sb, sh, st, b, h, n, n_ok, M: tl.constexpr, MS_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """QJL signs ``[BLOCK_N, 8·MS_PAD]`` as ±1.0 (tile order; 0 where masked)."""
    bits = _unpack_tile(KQ + b * sb + h * sh, n.to(tl.int64) * st, n_ok, 1, 8, M // 8, MS_PAD, 1, BLOCK_N)
    return tl.where(n_ok[:, None], bits.to(tl.float32) * 2.0 - 1.0, 0.0)


@triton.jit
def _combine_kernel(
    OP, sob, soh, sot, sos,
    LP, slb, slh, slt,
    OUT, so_b, so_h, so_t,  # out [B, Hq, Tq, D] fp32
    LSE, sl_b, sl_h, sl_t,  # lse [B, Hq, Tq] fp32 (natural log)
    Hq, Tq, SPLITS,
    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    tq = (pid % Tq).to(tl.int64)
    hq = ((pid // Tq) % Hq).to(tl.int64)
    b = (pid // (Tq * Hq)).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < SPLITS
    lse = tl.load(LP + b * slb + hq * slh + tq * slt + sp, mask=sp_ok, other=-float("inf"))
    mx = tl.max(lse, axis=0)
    mx_use = tl.where(mx == -float("inf"), 0.0, mx)
    w = tl.exp2(lse - mx_use)  # 0 for empty splits
    tot = tl.sum(w, axis=0)
    d = tl.arange(0, D_PAD)
    o = tl.load(OP + b * sob + hq * soh + tq * sot + sp[:, None] * sos + d[None, :],
                mask=sp_ok[:, None] & (d[None, :] < D) & (w[:, None] > 0), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(OUT + b * so_b + hq * so_h + tq * so_t + d, out, mask=d < D)
    ln2: tl.constexpr = 0.6931471805599453
    lse_out = (mx_use + tl.log2(tl.where(tot > 0, tot, 1.0))) * ln2
    tl.store(LSE + b * sl_b + hq * sl_h + tq * sl_t, tl.where(tot > 0, lse_out, -float("inf")))
