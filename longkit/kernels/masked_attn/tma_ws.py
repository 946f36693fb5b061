"""What the warp-specialised TMA kernels (``fwd_ws.py``, ``dkdv_tma._bwd_dkdv_ws_kernel``) share: their 2-D
descriptors over flattened rows (device side) and the allocator that descriptors made in a kernel need (host side).

Why 2-D descriptors made in the kernel: Triton 3.6's Hopper warp-specialisation pass hung or miscomputed on an H200
with 4-D ``[B, H, T, D]`` descriptors and with host-made ones (``docs/kernel_notes.md``). Rows past a head's end are
then the next head's (or zero padding past the tensor's end); the kernels mask such keys and do not store such rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["flat_rows_desc", "ensure_allocator"]


@triton.jit
def flat_rows_desc(X, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor over the ``n_rows`` rows of a contiguous ``[..., HEAD_DIM]`` tensor, ``BLOCK`` rows per load."""
    return tl.make_tensor_descriptor(X, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Descriptors made in a kernel need global scratch from Triton's allocator; install a torch one unless the
    caller has set their own."""
    try:
        from triton.runtime import _allocation
        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except (ImportError, AttributeError):  # another Triton layout: ours is a correct allocator either way
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)
