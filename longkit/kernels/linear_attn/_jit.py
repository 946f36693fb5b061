"""Device helpers shared by the linear-attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_mm"]


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``IEEE``: fp32 operands stay fp32 (no tf32 rounding). ``UPCAST``: bf16
    operands are widened to fp32 first, only under Triton's CPU interpreter, whose ``dot`` reads bf16 (stored as
    uint16) as integers; the operands were already rounded to bf16, so the result is the same as a bf16 ``dot``."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
