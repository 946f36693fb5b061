"""Device helpers shared by the quantize and decode kernels: the *tile order* of packed channels and unpacking.

A packed field of ``n`` values of ``b`` bits is ``NPLANES`` byte planes of ``NS = n / S`` words (``spec.py``);
value ``p + s·NS`` sits in word ``p`` at bits ``[b·s, b·s + b)``. The kernels keep a row of such values as a tile
of width ``W = S · NS_PAD`` (``NS_PAD`` = ``NS`` rounded up to a power of two) in *tile order*: column
``c = s·NS_PAD + p`` holds channel ``s·NS + p`` (padding where ``p >= NS``). In that order packing and unpacking
are a reshape to ``[rows, S, NS_PAD]`` and shifts, with contiguous byte loads and stores; queries and rotations
are permuted into the same order (host side), so dot products need no gathers. Raw 16-bit fields use ``S = 1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_tile_channels", "_unpack_tile", "_pack_store", "_rne_bf16", "_mm"]


@triton.jit
def _tile_channels(W: tl.constexpr, NS: tl.constexpr, NS_PAD: tl.constexpr):
    """``(channel, valid)`` of each of the ``W`` tile columns."""
    c = tl.arange(0, W)
    p = c % NS_PAD
    return (c // NS_PAD) * NS + p, p < NS


@triton.jit
def _unpack_tile(ptr, row_off, row_mask, BITS: tl.constexpr, S: tl.constexpr, NS: tl.constexpr,
                 NS_PAD: tl.constexpr, NPLANES: tl.constexpr, ROWS: tl.constexpr):
    """Codes ``[ROWS, S·NS_PAD]`` (int32, tile order) of the packed rows at ``ptr + row_off`` (bytes)."""
    p = tl.arange(0, NS_PAD)
    m = row_mask[:, None] & (p[None, :] < NS)
    addr = ptr + row_off[:, None] + p[None, :]
    word = tl.load(addr, mask=m, other=0).to(tl.int32)
    for i in tl.static_range(1, NPLANES):
        word = word | (tl.load(addr + i * NS, mask=m, other=0).to(tl.int32) << (8 * i))
    shifts = tl.arange(0, S) * BITS
    codes = (word[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (ROWS, S * NS_PAD))


@triton.jit
def _pack_store(ptr, row_off, row_mask, codes, BITS: tl.constexpr, S: tl.constexpr, NS: tl.constexpr,
                NS_PAD: tl.constexpr, NPLANES: tl.constexpr, ROWS: tl.constexpr):
    """Pack ``codes [ROWS, S·NS_PAD]`` (int32, tile order) and store the byte planes at ``ptr + row_off``."""
    c3 = tl.reshape(codes, (ROWS, S, NS_PAD))
    shifts = tl.arange(0, S) * BITS
    word = tl.sum(c3 << shifts[None, :, None], axis=1)  # [ROWS, NS_PAD]; the fields do not overlap
    p = tl.arange(0, NS_PAD)
    m = row_mask[:, None] & (p[None, :] < NS)
    addr = ptr + row_off[:, None] + p[None, :]
    for i in tl.static_range(NPLANES):
        tl.store(addr + i * NS, ((word >> (8 * i)) & 0xFF).to(tl.uint8), mask=m)


@triton.jit
def _rne_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), kept in fp32. Used under Triton's CPU
    interpreter only, whose fp32 -> bf16 cast truncates and whose bf16 ``tl.dot`` is wrong: the CPU test tier then
    computes what the GPU computes (bf16 operands, fp32 products and sums). Finite values only."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation: ``PREC`` 0 = operands in ``DT`` (fp16/bf16 tensor cores), 1 = fp32 operands
    (IEEE, no TF32), 2 = bf16 operands emulated in fp32 (the interpreter, see :func:`_rne_bf16`)."""
    if PREC == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == 2:
        return tl.dot(_rne_bf16(a.to(tl.float32)), _rne_bf16(b.to(tl.float32)), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))
