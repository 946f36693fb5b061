"""Quantize-on-write kernel: (kept channels) -> rotation -> min/max groups or the Gaussian codebook -> packed codes
(+ QJL sketch).

One program per (block of ``BLOCK_T`` tokens, batch row × KV head) of one tensor (keys or values: the launcher
runs it once for each); it writes its tokens' fields of the records in place. fp32 math throughout. The rotation
is a dense ``[N, N]`` matrix product (``tl.dot`` in IEEE fp32) whose output columns come out in tile order
(``_jit.py``); the group minima and maxima are masked reductions per group; the rounding is the reference's
(``floor(div_rn(x - zero, scale) + 1/2)``, fp16 round-to-nearest of scale and zero), so without rotation the codes
are bit-identical to ``naive.py``. With the codebook the group RMS is a sum in another order than the reference's,
so a scale can round to the neighbouring fp16 value now and then (and codes near a boundary move by one).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._jit import _pack_store, _rne_bf16, _tile_channels

__all__ = ["_quantize_kernel"]

FP16_MAX = tl.constexpr(65504.0)
DOT_PREC = tl.constexpr("tf32x3")


@triton.jit
def _quantize_kernel(
    X, sxb, sxh, sxt, sxd,  # input [B, H, T, D]
    CH,  # kept channels [H, N] int64 (PRUNE)
    R,  # rotations [H, N, N] fp32, R[h] @ x (ROTATE)
    STARTS, start,  # per-row first slot [B] (START_TENSOR) or one int
    CODES, scb, sch, sct,  # packed codes (uint8 bytes) or raw 16-bit values
    SCALE, ZERO, ssb, ssh, sst,  # fp16: [B, H, T, NG] (token axis) or [B, H, rows, N] (channel axis), last stride 1
    SK,  # QJL matrix [M, N] fp32
    LUT, BND,  # Gaussian codebook centroids [2**BITS] and boundaries [2**BITS - 1], fp32 (CODEBOOK)
    QBITS, sqb, sqh, sqt,  # QJL sign bytes
    RNORM, srb, srh, srt,  # QJL residual norms (fp16)
    H, T, T_CAP,
    N: tl.constexpr, BITS: tl.constexpr, S: tl.constexpr, NS: tl.constexpr,
    NS_PAD: tl.constexpr, NPLANES: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr,
    M: tl.constexpr, MS_PAD: tl.constexpr,
    CHANNEL_AXIS: tl.constexpr, PRUNE: tl.constexpr, ROTATE: tl.constexpr, QJL: tl.constexpr,
    CODEBOOK: tl.constexpr, RAW: tl.constexpr, START_TENSOR: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    W: tl.constexpr = S * NS_PAD
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    if START_TENSOR:
        s0 = tl.load(STARTS + b).to(tl.int64)
    else:
        s0 = tl.full((), 0, tl.int64) + start  # (an int argument equal to 1 arrives as a constant)
    pos = s0 + t  # destination slots
    row_ok = (t < T) & (pos < T_CAP) & (pos >= 0)

    chan, valid = _tile_channels(W, NS, NS_PAD)  # stored channel of each tile column
    x_base = X + b * sxb + h * sxh + t.to(tl.int64)[:, None] * sxt
    if ROTATE:
        # x in stored-channel order (N a power of two), times R^T with its columns in tile order
        j = tl.arange(0, N)
        src = j.to(tl.int64)
        if PRUNE:
            src = tl.load(CH + h * N + j)
        x = tl.load(x_base + src[None, :] * sxd, mask=(t < T)[:, None], other=0.0).to(tl.float32)
        rt = tl.load(R + h * N * N + chan[None, :] * N + j[:, None], mask=valid[None, :], other=0.0)
        y = tl.dot(x, rt, input_precision=DOT_PREC)  # [BLOCK_T, W]
    else:
        src = chan.to(tl.int64)
        if PRUNE:
            src = tl.load(CH + h * N + chan, mask=valid, other=0)
        y = tl.load(x_base + src[None, :] * sxd, mask=(t < T)[:, None] & valid[None, :], other=0.0).to(tl.float32)

    code_row = CODES + b * scb + h * sch + pos * sct
    if RAW:
        if RNE_BF16:
            y = _rne_bf16(y)  # the interpreter's cast truncates; the GPU's rounds to nearest even
        tl.store(code_row[:, None] + chan[None, :], y.to(CODES.dtype.element_ty),
                 mask=row_ok[:, None] & valid[None, :])
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        if CHANNEL_AXIS:
            # KIVI: one scale per channel over this program's BLOCK_T == GROUP tokens (all valid: T % GROUP == 0)
            lo = tl.min(y, axis=0)
            hi = tl.max(y, axis=0)
            lo16 = tl.minimum(tl.maximum(lo, -FP16_MAX), FP16_MAX).to(tl.float16)
            sc16 = tl.minimum(tl.maximum(tl.div_rn(hi - lo16.to(tl.float32), LEVELS * 1.0), 0.0), FP16_MAX)
            sc16 = sc16.to(tl.float16)
            srow = (s0 + pid_t * BLOCK_T) // GROUP
            sptr = b * ssb + h * ssh + srow * sst + chan
            tl.store(SCALE + sptr, sc16, mask=valid)
            tl.store(ZERO + sptr, lo16, mask=valid)
            s_el = tl.broadcast_to(sc16.to(tl.float32)[None, :], (BLOCK_T, W))
            z_el = tl.broadcast_to(lo16.to(tl.float32)[None, :], (BLOCK_T, W))
        else:
            gid = tl.where(valid, chan // GROUP, -1)
            s_el = tl.zeros((BLOCK_T, W), dtype=tl.float32)
            z_el = tl.zeros((BLOCK_T, W), dtype=tl.float32)
            srow = SCALE + b * ssb + h * ssh + pos * sst
            zrow = ZERO + b * ssb + h * ssh + pos * sst
            for g in tl.static_range(NG):
                in_g = (gid == g)[None, :]
                if CODEBOOK:  # scale = the group's RMS (as naive.quantize_codebook: sum, / GROUP, sqrt, fp16)
                    ss = tl.sum(tl.where(in_g, y * y, 0.0), axis=1)
                    sc16 = tl.minimum(tl.sqrt_rn(tl.div_rn(ss, GROUP * 1.0)), FP16_MAX).to(tl.float16)
                    tl.store(srow + g, sc16, mask=row_ok)
                else:
                    lo = tl.min(tl.where(in_g, y, float("inf")), axis=1)
                    hi = tl.max(tl.where(in_g, y, -float("inf")), axis=1)
                    lo16 = tl.minimum(tl.maximum(lo, -FP16_MAX), FP16_MAX).to(tl.float16)
                    sc = tl.minimum(tl.maximum(tl.div_rn(hi - lo16.to(tl.float32), LEVELS * 1.0), 0.0), FP16_MAX)
                    sc16 = sc.to(tl.float16)
                    tl.store(srow + g, sc16, mask=row_ok)
                    tl.store(zrow + g, lo16, mask=row_ok)
                    z_el = tl.where(in_g, lo16.to(tl.float32)[:, None], z_el)
                s_el = tl.where(in_g, sc16.to(tl.float32)[:, None], s_el)
        pos_s = s_el > 0
        yq = tl.where(pos_s, tl.div_rn(y - z_el, tl.where(pos_s, s_el, 1.0)), 0.0)
        if CODEBOOK:  # the nearest centroid: how many boundaries lie below
            codes = tl.zeros((BLOCK_T, W), dtype=tl.int32)
            for i in tl.static_range(LEVELS):
                codes += (yq > tl.load(BND + i)).to(tl.int32)
        else:
            codes = tl.minimum(tl.maximum(tl.floor(yq + 0.5), 0.0), LEVELS * 1.0).to(tl.int32)
        codes = tl.where(valid[None, :], codes, 0)
        _pack_store(CODES + b * scb + h * sch, pos * sct, row_ok, codes, BITS, S, NS, NS_PAD, NPLANES, BLOCK_T)

        if QJL:
            if CODEBOOK:
                deq = tl.load(LUT + codes) * s_el
            else:
                deq = codes.to(tl.float32) * s_el + z_el
            r = tl.where(valid[None, :], y - deq, 0.0)
            rn = tl.sqrt(tl.sum(r * r, axis=1))
            tl.store(RNORM + b * srb + h * srh + pos * srt, tl.minimum(rn, FP16_MAX).to(tl.float16), mask=row_ok)
            # sign bit s of byte p is projection p + s·M/8: one [N, M/8] slice of S^T per bit (few registers)
            MS: tl.constexpr = M // 8
            p = tl.arange(0, MS_PAD)
            byte = tl.zeros((BLOCK_T, MS_PAD), dtype=tl.int32)
            for sbit in tl.static_range(8):
                st = tl.load(SK + (sbit * MS + p)[None, :] * N + chan[:, None],
                             mask=valid[:, None] & (p < MS)[None, :], other=0.0)
                proj = tl.dot(r, st, input_precision=DOT_PREC)  # [BLOCK_T, MS_PAD]
                byte = byte | ((proj >= 0).to(tl.int32) << sbit)
            qrow = QBITS + b * sqb + h * sqh + pos * sqt
            tl.store(qrow[:, None] + p[None, :], byte.to(tl.uint8), mask=row_ok[:, None] & (p < MS)[None, :])
