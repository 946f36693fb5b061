"""The RoPE re-rotation kernel (``@triton.jit`` only; the launch is in ``launch.py``).

One program per (block of ``BLOCK_T`` tokens, batch row × group of ``HEADS`` heads). The program loads its tokens'
deltas once, computes ``cos``/``sin`` of ``delta · inv_freq`` once in fp32 (a ``[BLOCK_T, HALF_PAD]`` tile) and
reuses them for every head of its group: the op is memory-bound, and the transcendental work per byte drops by the
group size. Each head's two halves of a pair are loaded, rotated in fp32 and stored back in place in the keys'
dtype. Tokens with ``delta == 0`` are masked out of the loads and stores (predicated off, so their bytes are
neither read nor written), and a block whose deltas are all zero does nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_rerotate_kernel"]

# 2π split for Cody-Waite range reduction: TWO_PI_A and TWO_PI_B have 8 significant bits, so k·A and k·B are exact
# in fp32 for |k| < 2^16 (angles up to ~4e5 rad) with or without FMA contraction; TWO_PI_C carries the rest.
TWO_PI_A = tl.constexpr(6.28125)
TWO_PI_B = tl.constexpr(0.00193023681640625)
TWO_PI_C = tl.constexpr(5.070363386039389e-06)
INV_TWO_PI = tl.constexpr(0.15915493667125702)


@triton.jit
def _cos_sin(ang):
    """``cos, sin`` of an fp32 angle of any size. The angle is reduced to about ``[-π, π]`` first, so the result is
    accurate whether ``tl.cos``/``tl.sin`` lower to a precise routine or a hardware approximation (which is only
    accurate near zero); the fp32 angle itself is the reference's, ``fp32(delta) · inv_freq``."""
    k = tl.floor(ang * INV_TWO_PI + 0.5)
    r = ang - k * TWO_PI_A
    r = r - k * TWO_PI_B
    r = r - k * TWO_PI_C
    return tl.cos(r), tl.sin(r)


@triton.jit
def _store(ptr, val, mask, RNE_BF16: tl.constexpr):
    """Store fp32 ``val`` in ``ptr``'s dtype. ``RNE_BF16`` (set only under the interpreter, for bf16 keys) rounds to
    nearest-even by hand: Triton's CPU interpreter casts fp32 to bf16 by truncation, the GPU (and PyTorch) round to
    nearest-even, and the CPU test tier should test the GPU's rounding. Finite values only (the test inputs)."""
    if RNE_BF16:
        bits = val.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        val = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rerotate_kernel(
    k_ptr, delta_ptr, inv_freq_ptr, shift,
    H, T, stride_kb, stride_kh, stride_kt, stride_db, stride_dt,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HEADS: tl.constexpr,
    HAS_DELTA: tl.constexpr, INTERLEAVED: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """Rotate ``keys[b, h, t]`` by ``delta[b, t]`` (``HAS_DELTA``) or by the scalar ``shift`` (every token), in place.

    ``HALF = D / 2`` pairs, padded to the power of two ``HALF_PAD`` with masked lanes (D = 80, 96, ...).
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_groups = tl.cdiv(H, HEADS)
    b = (pid_bh // n_groups).to(tl.int64)  # 64-bit offsets: a whole cache can exceed 2^31 elements
    h0 = (pid_bh % n_groups) * HEADS

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    if HAS_DELTA:
        d = tl.load(delta_ptr + b * stride_db + t.to(tl.int64) * stride_dt, mask=t_ok, other=0)
        live = t_ok & (d != 0)
        ang_t = d.to(tl.float32)
    else:
        live = t_ok
        ang_t = tl.zeros([BLOCK_T], dtype=tl.float32) + shift  # the host never launches shift == 0
    if tl.max(live.to(tl.int32), axis=0) > 0:
        i = tl.arange(0, HALF_PAD)
        i_ok = i < HALF
        f = tl.load(inv_freq_ptr + i, mask=i_ok, other=0.0)
        cos, sin = _cos_sin(ang_t[:, None] * f[None, :])
        if INTERLEAVED:
            col1 = 2 * i
            col2 = 2 * i + 1
        else:
            col1 = i
            col2 = i + HALF
        m = live[:, None] & i_ok[None, :]
        rows = k_ptr + b * stride_kb + t.to(tl.int64)[:, None] * stride_kt
        for j in range(HEADS):
            h = h0 + j
            mh = m & (h < H)
            p = rows + h.to(tl.int64) * stride_kh
            x1 = tl.load(p + col1[None, :], mask=mh, other=0.0).to(tl.float32)
            x2 = tl.load(p + col2[None, :], mask=mh, other=0.0).to(tl.float32)
            _store(p + col1[None, :], x1 * cos - x2 * sin, mh, RNE_BF16)
            _store(p + col2[None, :], x2 * cos + x1 * sin, mh, RNE_BF16)
