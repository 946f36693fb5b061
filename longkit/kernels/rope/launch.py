"""Host side of the RoPE re-rotation: tiles and grid (:func:`rerotate_config`), then the launch.

The kernel (``rerotate.py``) is memory-bound: each program moves ``BLOCK_T × D`` elements per head, and computes
``cos``/``sin`` once for the ``HEADS`` heads it walks. The default tile holds 2048 pairs (16 per thread on 4 warps);
heads per program start at all of them (least transcendental work) and are halved while the grid would leave
fewer than 4 programs per SM (short suffixes, batch 1), so short calls still spread over the GPU.
"""

from __future__ import annotations

import functools

import torch
import triton

from longkit.kernels import envs

from ..masked_attn._interpreter import fix_interpreter_index
from .rerotate import _rerotate_kernel

__all__ = ["rerotate_config", "launch_rerotate"]

if envs.triton_interpreting():
    fix_interpreter_index()  # the heads loop has a run-time bound under the interpreter's numpy

PAIRS_PER_TILE = 2048
PROGRAMS_PER_SM = 4


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small grid
    return torch.cuda.get_device_properties(device).multi_processor_count


def rerotate_config(B: int, H: int, T: int, D: int, device: torch.device) -> dict[str, int]:
    """``{"BLOCK_T", "HEADS", "num_warps"}`` for keys ``[B, H, T, D]`` (``LONGKIT_ROPE_CONFIG`` overrides)."""
    env = envs.rope_config()
    if env is not None:
        return env
    half_pad = triton.next_power_of_2(D // 2)
    block_t = max(1, min(PAIRS_PER_TILE // half_pad, triton.next_power_of_2(T)))
    heads, n_t = H, triton.cdiv(T, block_t)
    target = PROGRAMS_PER_SM * _sm_count(device)
    while heads > 1 and n_t * B * triton.cdiv(H, heads) < target:
        heads = triton.cdiv(heads, 2)
    # 256 pairs per warp at most: fewer warps on the tiny tiles of very short calls
    num_warps = max(1, min(4, block_t * half_pad // 256))
    return {"BLOCK_T": block_t, "HEADS": heads, "num_warps": num_warps}


def launch_rerotate(keys: torch.Tensor, delta: torch.Tensor | None, inv_freq: torch.Tensor, shift: int,
                    interleaved: bool) -> None:
    """Rotate ``keys [B, H, T, D]`` (last dim contiguous) in place by ``delta [B, T]``/``[T]``, or by ``shift``
    positions everywhere when ``delta`` is None. Inputs are checked by the caller (``interface.rerotate_``)."""
    B, H, T, D = keys.shape
    if keys.numel() == 0:
        return
    if delta is None and shift == 0:
        return
    cfg = rerotate_config(B, H, T, D, keys.device)
    inv_freq = inv_freq.to(torch.float32).contiguous()  # tiny; the reference also turns by fp32 angles
    if delta is None:
        d_arg, sdb, sdt = inv_freq, 0, 0  # unused pointer (HAS_DELTA=False)
    elif delta.dim() == 1:
        d_arg, sdb, sdt = delta, 0, delta.stride(0)  # one row for every batch row
    else:
        d_arg, sdb, sdt = delta, delta.stride(0), delta.stride(1)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), B * triton.cdiv(H, cfg["HEADS"]))
    _rerotate_kernel[grid](
        keys, d_arg, inv_freq, int(shift), H, T, keys.stride(0), keys.stride(1), keys.stride(2), sdb, sdt,
        HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2), BLOCK_T=cfg["BLOCK_T"], HEADS=cfg["HEADS"],
        HAS_DELTA=delta is not None, INTERLEAVED=bool(interleaved),
        RNE_BF16=keys.dtype == torch.bfloat16 and envs.triton_interpreting(), num_warps=cfg["num_warps"],
    )
