"""What the warp-specialised TMA kernels (``fwd_ws.py``, ``dkdv_tma._bwd_dkdv_ws_kernel``) share: their 2-D
descriptors over flattened rows, the allocator that in-kernel descriptors need, and the rule their switches follow.

Why 2-D descriptors made in the kernel: Triton 3.6's Hopper warp-specialisation pass hung or miscomputed on an H200
with 4-D ``[B, H, T, D]`` descriptors and with host-made ones (``docs/kernel_notes.md``). Rows past a head's end are
then the next head's (or zero padding past the tensor's end); the kernels mask such keys and do not store such rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flash import _interpreting


@triton.jit
def flat_rows_desc(X, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor over the ``n_rows`` rows of a contiguous ``[..., HEAD_DIM]`` tensor, ``BLOCK`` rows per load."""
    return tl.make_tensor_descriptor(X, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


def ws_switch(env_name: str, mask_problem: str | None, tensors: tuple[torch.Tensor, ...], names: str,
              fallback: str, default_on: bool) -> bool:
    """The rule both warp-specialised kernels' switches follow. ``env_name`` = ``0``: off; ``1``: on wherever the
    kernel can run (sm_90+ GPUs and the interpreter), else an error naming ``mask_problem`` or what is wrong with
    ``tensors`` (``names``); unset: ``default_on`` on a Hopper GPU, off under the interpreter (whose tests force it)."""
    env = os.environ.get(env_name)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{env_name} must be 0 or 1, got {env!r}")
    if env == "0":
        return False
    q = tensors[0]
    why = mask_problem
    if why is None and q.shape[-1] not in (16, 32, 64, 128):
        why = f"head dim {q.shape[-1]} is not one of 16, 32, 64, 128"
    elif why is None and not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors):
        why = f"{names} are not contiguous [B, H, T, D] tensors with 16-byte aligned bases"
    elif why is None and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        why = "the GPU has no TMA (needs sm_90 or newer)"
    if why is not None:
        if env == "1":
            raise ValueError(f"{env_name}=1 but {why}; unset it to use {fallback}")
        return False
    if env == "1":
        return True
    if _interpreting():
        return False
    return default_on and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9


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
