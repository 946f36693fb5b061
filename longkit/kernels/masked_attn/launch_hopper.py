"""Host side of the Hopper kernels: launches of ``fwd_ws.py`` and ``dkdv_tma.py`` with their tiles, grids,
descriptors and row tables.

:func:`launch_ws_fwd` runs the warp-specialised forward (per tile, persistent over query-block pairs, or the Λ
kernel); :func:`launch_tma_dkdv` the TMA dk/dv (warp-specialised or plain). ``launch.py`` calls them where ``plan.py``
says they run. The plain TMA dk/dv takes host tensor descriptors, which older Tritons lack:
``HOST_DESCRIPTORS_ERROR`` then holds the import error and the pointer dk/dv runs instead.
"""

from __future__ import annotations

import functools

import torch
import triton

from longkit.kernels import envs

from ._jit import LOG2E
from .configs import ws_dkdv_config, ws_fwd_config
from .dkdv_tma import _bwd_dkdv_tma_kernel, _bwd_dkdv_ws_kernel
from .fwd_ws import _fwd_ws_kernel, _fwd_ws_paired_kernel, _fwd_ws_window_kernel
from .plan import ws_dkdv_enabled, ws_fwd_paired
from .tma_ws import ensure_allocator

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError as e:  # an older Triton
    HOST_DESCRIPTORS_ERROR: ImportError | None = e
else:
    HOST_DESCRIPTORS_ERROR = None

__all__ = ["launch_ws_fwd", "launch_tma_dkdv", "HOST_DESCRIPTORS_ERROR"]


@functools.cache
def _n_programs(device_index: int) -> int:
    """One persistent program per SM (a 128x128 specialised tile fills an SM's shared memory)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_ws_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  q_offset: int, scale_log2: float, n_global: int = 0, n_local: int = 0) -> object:
    """Causal forward (``n_local <= 0``) or Λ forward into contiguous ``out [B, Hq, Tq, D]`` and
    ``lse [B, Hq, Tq]``; returns the launched kernel."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = ws_fwd_config()
    if q.is_cuda:
        ensure_allocator()
    n_m = triton.cdiv(Tq, cfg["BLOCK_M"])
    if n_local > 0:
        return _fwd_ws_window_kernel[(n_m, B * Hq)](
            q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, n_global, n_local, scale_log2,
            GROUP=Hq // Hkv, HEAD_DIM=D, HAS_SINKS=n_global > 0, WS=not envs.triton_interpreting(), **cfg,
        )
    if ws_fwd_paired(Tq, cfg["BLOCK_M"]):
        # under the interpreter 3 programs, so that the tests walk several pairs per program
        n_prog = _n_programs(q.device.index or 0) if q.is_cuda else 3
        return _fwd_ws_paired_kernel[(min(n_prog, B * Hq * ((n_m + 1) // 2)),)](
            q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, scale_log2,
            GROUP=Hq // Hkv, HEAD_DIM=D, WS=not envs.triton_interpreting(), **cfg,
        )
    return _fwd_ws_kernel[(n_m, B * Hq)](
        q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, scale_log2,
        GROUP=Hq // Hkv, HEAD_DIM=D, WS=not envs.triton_interpreting(), **cfg,
    )


def _rows_2d(t: torch.Tensor, rows: int, cols: int, fill: float | int = 0) -> torch.Tensor:
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


def _desc_2d(t: torch.Tensor, block_cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_cols])


def launch_tma_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                    delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, meta_q: torch.Tensor,
                    meta_k: torch.Tensor, s_mkb: int, q_offset: int, n_global: int, n_local: int,
                    scale: float, flags: dict[str, bool], blk_off: int, cfg: dict[str, int]) -> object:
    """dk, dv of kv blocks ``blk_off..`` into contiguous ``dk``/``dv`` (``[B, Hkv, Tk, D]``); returns the launched
    kernel. ``lse``: the forward's (natural log, ``[B, Hq, Tq]``); ``delta`` ``[B, Hq, Tq]`` contiguous; ``meta_q``
    as from :func:`tables.mask_tables`; ``cfg`` the TMA dk/dv's tiles (``configs.tma_dkdv_config``)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # lse in base 2, -inf (rows that see no key) as +inf so that p = 0; row tables with 16-byte aligned rows
    lse_r = _rows_2d(torch.where(lse == float("-inf"), float("inf"), lse * LOG2E), B * Hq, Tq)
    delta_r = _rows_2d(delta, B * Hq, Tq)
    has_mq = flags["HAS_DOCS"] or flags["HAS_PREFIX"]
    mq_r = _rows_2d(meta_q, meta_q.shape[0] * 3, Tq) if has_mq else lse_r  # placeholder, never read
    mq_rows_per_b = 3 if has_mq and meta_q.shape[0] > 1 else 0
    grid = (triton.cdiv(Tk, bn) - blk_off, B * Hkv)
    mask_consts = {"HAS_WINDOW": flags["HAS_WINDOW"], "HAS_DOCS": flags["HAS_DOCS"], "HAS_PREFIX": flags["HAS_PREFIX"]}
    if ws_dkdv_enabled(q, k, v, grad_out, flags):
        if q.is_cuda:
            ensure_allocator()
        return _bwd_dkdv_ws_kernel[grid](
            q, k, v, grad_out, lse_r, delta_r, mq_r, dk, dv, meta_k, lse_r.stride(0), mq_r.stride(0), mq_r.shape[0],
            mq_rows_per_b, s_mkb, B, Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * LOG2E, scale,
            blk_off, GROUP=Hq // Hkv, HEAD_DIM=D, **mask_consts, **ws_dkdv_config(D, cfg),
        )
    block_d = max(16, triton.next_power_of_2(D))
    qd = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, bm, block_d])
    dod = TensorDescriptor(grad_out, list(grad_out.shape), list(grad_out.stride()), [1, 1, bm, block_d])
    kd = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, block_d])
    vd = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, block_d])
    lse_d, delta_d, mq_d = (_desc_2d(t, bm) for t in (lse_r, delta_r, mq_r))
    return _bwd_dkdv_tma_kernel[grid](
        qd, kd, vd, dod, lse_d, delta_d, mq_d, dk, dv, meta_k, mq_rows_per_b, s_mkb,
        Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * LOG2E, scale, blk_off,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, **mask_consts, **cfg,
    )
