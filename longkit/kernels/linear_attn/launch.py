"""Host side of the chunked linear-attention kernels: the gate table, the tiles, the grids and the launches.

Inputs ``q, k, v`` (and ``do``) are read through their batch, head and time strides, so transformers' ``[B, T, H,
D]`` tensors passed as ``.transpose(1, 2)`` views are not copied; only a non-unit last-dim stride forces a copy.
Outputs and gradients are contiguous ``[B, H, T, D]``. The forward keeps nothing but its inputs: the backward
recomputes the per-chunk states (``[B*H, NT, Dk, Dv]`` fp32, ``T / chunk_size`` of them) instead of storing them.
"""

from __future__ import annotations

import torch
import triton

from longkit.kernels import envs

from ..masked_attn._interpreter import fix_interpreter_index
from .bwd import _chunk_dh_kernel, _chunk_dqkg_kernel, _chunk_dv_kernel
from .fwd import _chunk_o_fwd_kernel, _chunk_state_fwd_kernel

__all__ = ["chunk_linear_attn_fwd", "chunk_linear_attn_bwd", "chunk_gates"]

if envs.triton_interpreting():
    fix_interpreter_index()  # the chunk and tile loops have run-time bounds under the interpreter's numpy

_Tensor = torch.Tensor


def _unit_last(x: _Tensor) -> _Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: _Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _tiles(Dk: int, Dv: int) -> tuple[int, int]:
    # tl.dot needs every dim >= 16; 64 keeps a [64, 64] fp32 state tile per program in registers
    return min(64, max(16, triton.next_power_of_2(Dk))), min(64, max(16, triton.next_power_of_2(Dv)))


def chunk_gates(g: _Tensor, chunk_size: int) -> _Tensor:
    """Chunk-local cumulative log gates ``[B*H, NT*chunk_size]`` fp32, zero-padded to whole chunks.

    A padded gate of 0 is "no decay", so each chunk's last entry is its total log decay, also for a partial chunk.
    """
    B, H, T = g.shape
    NT = triton.cdiv(T, chunk_size)
    gp = torch.nn.functional.pad(g.float().reshape(B * H, T), (0, NT * chunk_size - T))
    return gp.reshape(B * H, NT, chunk_size).cumsum(-1).reshape(B * H, NT * chunk_size).contiguous()


def _dot_flags(x: _Tensor) -> tuple[bool, bool]:
    """``(IEEE, UPCAST)`` for the kernels' ``_mm``: exact fp32 dots for fp32 inputs; bf16 dots widened to fp32
    under the CPU interpreter only (its ``dot`` misreads bf16)."""
    return x.dtype == torch.float32, envs.triton_interpreting() and x.dtype == torch.bfloat16


def _states(k: _Tensor, v: _Tensor, gc: _Tensor, h0: _Tensor | None, want_ht: bool,
            BT: int) -> tuple[_Tensor, _Tensor | None]:
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    NT = triton.cdiv(T, BT)
    BK, BV = _tiles(Dk, Dv)
    ieee, upcast = _dot_flags(k)
    h = torch.empty(B * H, NT, Dk, Dv, dtype=torch.float32, device=k.device)
    ht = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device) if want_ht else None
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), B * H)
    _chunk_state_fwd_kernel[grid](
        k, v, gc, h, h0, ht, *_strides(k), *_strides(v), T, NT,
        H=H, K=Dk, V=Dv, BT=BT, BK=BK, BV=BV, USE_H0=h0 is not None, STORE_HT=want_ht,
        IEEE=ieee, UPCAST=upcast,
    )
    return h, ht


def chunk_linear_attn_fwd(q: _Tensor, k: _Tensor, v: _Tensor, g: _Tensor, h0: _Tensor | None, scale: float,
                          output_final_state: bool, chunk_size: int) -> tuple[_Tensor, _Tensor | None]:
    """Forward: ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32 or None)``.

    ``g`` is ``[B, H, T]`` per-token log gates, ``h0`` a contiguous fp32 ``[B, H, Dk, Dv]`` or ``None``.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    ieee, upcast = _dot_flags(q)
    gc = chunk_gates(g, BT)
    h, ht = _states(k, v, gc, h0, output_final_state, BT)
    o = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    BK, BV = _tiles(Dk, Dv)
    grid = (triton.cdiv(Dv, BV), NT, B * H)
    _chunk_o_fwd_kernel[grid](
        q, k, v, gc, h, o, *_strides(q), *_strides(k), *_strides(v), scale, T, NT,
        H=H, K=Dk, V=Dv, BT=BT, BK=BK, BV=BV, IEEE=ieee, UPCAST=upcast,
    )
    return o, ht


def chunk_linear_attn_bwd(q: _Tensor, k: _Tensor, v: _Tensor, g: _Tensor, h0: _Tensor | None, do: _Tensor,
                          dht: _Tensor | None, scale: float,
                          chunk_size: int) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor | None]:
    """Backward: ``(dq, dk, dv, dg [B, H, T] fp32, dh0 [B, H, Dk, Dv] fp32 or None)``.

    ``dht`` is the final state's gradient (``None``: zero). ``dh0`` is computed when ``h0`` was given.
    """
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do.to(q.dtype))
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    BK, BV = _tiles(Dk, Dv)
    NK = triton.cdiv(Dk, BK)
    ieee, upcast = _dot_flags(q)
    gc = chunk_gates(g, BT)
    h, _ = _states(k, v, gc, h0, False, BT)

    dh = torch.empty(B * H, NT, Dk, Dv, dtype=torch.float32, device=q.device)
    dh0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device) if h0 is not None else None
    dht = dht.float().contiguous() if dht is not None else None
    _chunk_dh_kernel[(NK, triton.cdiv(Dv, BV), B * H)](
        q, do, gc, dh, dht, dh0, *_strides(q), *_strides(do), scale, T, NT,
        H=H, K=Dk, V=Dv, BT=BT, BK=BK, BV=BV, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
        IEEE=ieee, UPCAST=upcast,
    )

    dv = torch.empty(B, H, T, Dv, dtype=v.dtype, device=v.device)
    _chunk_dv_kernel[(triton.cdiv(Dv, BV), NT, B * H)](
        q, k, do, gc, dh, dv, *_strides(q), *_strides(k), *_strides(do), scale, T, NT,
        H=H, K=Dk, V=Dv, BT=BT, BK=BK, BV=BV, IEEE=ieee, UPCAST=upcast,
    )

    dq = torch.empty(B, H, T, Dk, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, T, Dk, dtype=k.dtype, device=k.device)
    dgc = torch.empty(NK, B * H, NT * BT, dtype=torch.float32, device=q.device)
    _chunk_dqkg_kernel[(NK, NT, B * H)](
        q, k, v, gc, h, do, dh, dq, dk, dgc,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), scale, T, NT, B * H,
        H=H, K=Dk, V=Dv, BT=BT, BK=BK, BV=BV, IEEE=ieee, UPCAST=upcast,
    )
    # dG (gradient of the chunk-local cumulative gate) -> dg: g_t enters G_s for every s >= t of its chunk
    dG = dgc.sum(0).reshape(B * H, NT, BT)
    dg = dG.flip(-1).cumsum(-1).flip(-1).reshape(B * H, NT * BT)[:, :T].reshape(B, H, T)
    return dq, dk, dv, dg, dh0
