"""What the warp-specialised TMA kernels (``fwd_ws.py``, ``dq_ws.py``, ``dkdv_tma._bwd_dkdv_ws_kernel``) share: their
2-D descriptors over flattened rows and per-row tables, the query-block prologue and mask of the query-block kernels,
the allocator that in-kernel descriptors need, and the rule their switches follow.

Why 2-D descriptors made in the kernel: Triton 3.6's Hopper warp-specialisation pass hung or miscomputed on an H200
with 4-D ``[B, H, T, D]`` descriptors and with host-made ones (``docs/kernel_notes.md``). Rows past a head's end are
then the next head's (or zero padding past the tensor's end); the kernels mask such keys and do not store such rows.

Per-row values (dq's lse and delta) come from ``[rows, Tq]`` tables read as ``[1, BLOCK_M]`` blocks. Under warp
specialisation a query-block kernel that reads them needs ``BLOCK_M <= 64``: the pass splits a 128-row
program's loads between its two consumer warpgroups (64 rows each) by shrinking each copy's box along the first
dimension, which a ``[1, 128]`` block does not have; it then issued two copies with the full 512-byte box into
256-byte buffers (TTGIR), and the kernel crashed or hung on the H200. Other forms failed to compile in the pass:
``[2, 64]`` blocks reshaped to ``[128]``, ``[128, 4..64]`` blocks reduced to a column, and pointer loads. The
documents / shared-prefix masks' per-row tables failed the same way in the forward and dq (crash at 128 rows, compile
failure at 64), so the query-block kernels take the causal and Λ masks only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flash import _interpreting, _kv_schedule, _sched_block


@triton.jit
def flat_rows_desc(X, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor over the ``n_rows`` rows of a contiguous ``[..., HEAD_DIM]`` tensor, ``BLOCK`` rows per load."""
    return tl.make_tensor_descriptor(X, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def row_table_load(X, n_rows, row_stride, Tq, row, start_m, BLOCK_M: tl.constexpr):
    """Entries ``start_m .. start_m + BLOCK_M - 1`` of row ``row`` of a ``[n_rows, Tq]`` table (row stride
    ``row_stride``, :func:`rows_2d`) as a ``[BLOCK_M]`` vector; entries past Tq read 0."""
    desc = tl.make_tensor_descriptor(X, shape=[n_rows, Tq], strides=[row_stride, 1], block_shape=[1, BLOCK_M])
    return desc.load([row, start_m]).reshape(BLOCK_M)


@triton.jit
def ws_kv_schedule(start_m, offs_m, Tq, Tk, q_offset, n_global, n_local, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """A query-block program's kv blocks, for a specialised loop over them (causal, or the Λ mask).

    Returns ``pos`` (row positions), ``lim`` (last visible key per row: causal, and rows read past Tk are never
    visible) and :func:`flash._kv_schedule`'s run (``start``, gap ``ga0, gal``) with its length ``n_iter``: with a
    window, the sink blocks and the window's blocks, the gap between them skipped. Documents and shared prefixes
    need per-row tables, which Triton 3.6's pass cannot specialise (module docstring)."""
    pos = q_offset + offs_m
    lim = tl.minimum(pos, Tk - 1)
    if HAS_WINDOW:
        last = tl.minimum(start_m + BLOCK_M, Tq) - 1
        zero = start_m * 0
        start, end, ga0, gal, _, _ = _kv_schedule(q_offset + start_m, q_offset + last, zero, zero, zero, zero, zero,
                                                  zero, n_global, n_local, BLOCK_N, HAS_WINDOW, False, False)
        n_iter = end - start - gal
    else:
        start = 0
        ga0 = 0
        gal = 0
        n_iter = tl.cdiv(tl.maximum(tl.minimum(Tk, q_offset + start_m + BLOCK_M), 0), BLOCK_N)
    return pos, lim, start, ga0, gal, n_iter


@triton.jit
def ws_block_start(it, start, ga0, gal, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """First key of scheduled kv iteration ``it`` (with a window: past the gap; causal: no gap)."""
    if HAS_WINDOW:
        return _sched_block(it, start, ga0, gal, 2147483647, 0) * BLOCK_N
    return it * BLOCK_N


@triton.jit
def ws_mask_scores(s, offs_n, pos, lim, n_global, n_local, HAS_WINDOW: tl.constexpr):
    """Scores ``s`` [BLOCK_M, BLOCK_N] with invisible pairs at -inf: keys past ``lim`` (causal; keys read past Tk
    are the next head's rows from a flattened descriptor, or zeros), and with a window the keys neither in it nor
    sinks."""
    vis = offs_n[None, :] <= lim[:, None]
    if HAS_WINDOW:
        vis = vis & (((pos[:, None] - offs_n[None, :]) < n_local) | (offs_n[None, :] < n_global))
    return tl.where(vis, s, float("-inf"))


def rows_2d(t: torch.Tensor, rows: int, cols: int, fill: float | int = 0) -> torch.Tensor:
    """``t`` as a ``[rows, cols]`` tensor whose row stride is a multiple of 16 bytes (TMA), copied only when
    ``cols`` needs padding."""
    per16 = 16 // t.element_size()
    pad = -cols % per16
    t2 = t.reshape(rows, cols)
    if pad == 0:
        return t2
    out = torch.full((rows, cols + pad), fill, dtype=t.dtype, device=t.device)
    out[:, :cols] = t2
    return out[:, :cols]


def lse_base2(lse: torch.Tensor) -> torch.Tensor:
    """The forward's log-sum-exp in base 2 as the backward kernels read it, -inf (rows that see no key) as +inf
    (so that p = 0)."""
    return torch.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


def ws_mask_problem(flags: dict[str, bool]) -> str | None:
    """Why the warp-specialised query-block kernels (forward, dq) cannot take this mask, or None."""
    if flags["USE_GLOBAL"] or flags["HAS_DOCS"] or flags["HAS_PREFIX"]:
        return ("the mask has documents, a shared prefix or the distance limit (q_global); the warp-specialised "
                "forward and dq take causal and sink-window masks")
    return None


def check_ws_tiles(cfg: dict[str, int], source: str) -> dict[str, int]:
    """``cfg`` unless a warp-specialised query-block kernel (4 warps) that reads per-row tables would get
    ``BLOCK_M`` above 64, which crashed or hung on the H200 (module docstring)."""
    if cfg["num_warps"] == 4 and cfg["BLOCK_M"] > 64:
        raise ValueError(f"{source}: a {cfg['BLOCK_M']}-row query tile on 4 warps reads its per-row tables with a "
                         "box Triton 3.6's warp specialisation splits wrongly (crashes or hangs on Hopper); use "
                         "BLOCK_M <= 64, or 8 warps (the kernel then runs unspecialised)")
    return cfg


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
