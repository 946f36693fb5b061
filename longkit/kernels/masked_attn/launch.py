"""Host launchers of the masked attention: pick the kernels and tiles, allocate the outputs, launch.

:func:`flash_masked_attention_fwd` / :func:`flash_masked_attention_bwd` are what the custom ops of ``interface.py``
call. Forward: the warp-specialised Hopper forward where ``plan.ws_fwd_enabled``, else the pointer forward
(``fwd.py``). Backward: ``delta`` (preprocess), dk/dv from the TMA kernels on Hopper (``plan.tma_dkdv_enabled``) or
the pointer kernel, with the distance limit's sink kv blocks in a launch of their own, then dq; every kernel writes
its own outputs (partial sums are added here in a fixed order), so the backward is deterministic. A Λ mask whose
windows all reach key 0 runs as causal (``plan.window_covers_all``).
"""

from __future__ import annotations

import torch
import triton

from longkit.kernels import envs

from ._interpreter import fix_interpreter_index
from ._jit import LOG2E
from .bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel
from .configs import bwd_config, fwd_config, tma_dkdv_config
from .fwd import _fwd_kernel
from .launch_hopper import HOST_DESCRIPTORS_ERROR, launch_tma_dkdv, launch_ws_fwd
from .plan import (
    gqa_heads_per_program,
    mask_flags,
    merged_loops,
    sink_chunk,
    tma_dkdv_enabled,
    window_covers_all,
    ws_fwd_enabled,
)
from .tables import mask_tables

__all__ = ["flash_masked_attention_fwd", "flash_masked_attention_bwd", "launch_stats", "check_grid", "LAST_LAUNCH"]

if envs.triton_interpreting():
    fix_interpreter_index()

# name -> compiled kernel of the latest launch (register and spill counts for benchmarks/attention.py --sweep)
LAST_LAUNCH: dict[str, object] = {}


def launch_stats() -> dict[str, dict[str, int]]:
    """Registers per thread and spilled bytes of the kernels launched last (empty under the interpreter)."""
    return {name: {"regs": getattr(k, "n_regs", -1), "spills": getattr(k, "n_spills", -1)}
            for name, k in LAST_LAUNCH.items() if k is not None}


def _last_dim_contig(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else (t if t.stride(-1) == 1 else t.contiguous()) for t in ts]


def _add_partials(part: torch.Tensor, out: torch.Tensor, rows: slice) -> None:
    """``out[:, :, rows] = part[:, :, :, rows].sum(0)``: fp32 partial sums ``[n, B, H, T, D]`` of programs that
    split one output tile, added in a fixed order (deterministic) and cast to ``out``'s dtype. (A fused Triton
    sum timed the same on an H200, `attention_sweep_h200_gqa_split_heads2.json`.)"""
    out[:, :, rows] = part[:, :, :, rows].sum(0)


def _sink_dkdv(dkdv_args: tuple, dk: torch.Tensor, dv: torch.Tensor, dkg: torch.Tensor, meta_q: torch.Tensor,
               meta_k: torch.Tensor, scalars: tuple, consts: dict, flags: dict[str, bool], cfg: dict[str, int],
               n_sink_blk: int) -> object:
    """dk, dv, dk_global of the sink kv blocks (distance limit): fp32 partial sums per query chunk, added up
    here in a fixed order (deterministic), written into ``dk``/``dv``'s first rows and ``dkg``."""
    B, Hkv, Tk, D = dk.shape
    Tq = dkdv_args[0].shape[2]
    n_m = triton.cdiv(Tq, cfg["BLOCK_M"])
    m_chunk = sink_chunk(n_m, n_sink_blk * B * Hkv, dk.device)
    n_chunks = triton.cdiv(n_m, m_chunk)
    t_out = n_sink_blk * cfg["BLOCK_N"]
    n_global = dkg.shape[2]
    part = torch.empty(2, n_chunks, B, Hkv, t_out, D, dtype=torch.float32, device=dk.device)
    part_g = torch.empty(n_chunks, B, Hkv, n_global, D, dtype=torch.float32, device=dk.device)
    launched = _bwd_dkdv_kernel[(n_sink_blk, B * Hkv, n_chunks)](
        *dkdv_args, part[0], part[1], part_g, meta_q, meta_k, *scalars, 0, m_chunk, t_out,
        part.stride(1), part_g.stride(0), **flags, **consts, **cfg, CHUNKED=True, SPLIT_HEADS=False,
    )
    rows = slice(0, min(t_out, Tk))
    _add_partials(part[0], dk, rows)
    _add_partials(part[1], dv, rows)
    dkg.copy_(part_g.sum(0))
    return launched


def _tma_dkdv_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                   flags: dict[str, bool], sink_block_n: int | None) -> dict[str, int] | None:
    """Tiles of the TMA dk/dv kernel (``dkdv_tma.py``) if it runs for these inputs, else None (the pointer
    kernel runs). With the distance limit its kv tile must match the sink launch's (``sink_block_n``)."""
    if HOST_DESCRIPTORS_ERROR is not None:  # an older Triton without host tensor descriptors: the pointer kernel runs
        if envs.attn_tma_dkdv():
            raise RuntimeError(f"LONGKIT_ATTN_TMA_DKDV=1 needs triton.tools.tensor_descriptor "
                               f"({HOST_DESCRIPTORS_ERROR})") from HOST_DESCRIPTORS_ERROR
        return None
    if not tma_dkdv_enabled(q, k, v, grad_out):
        return None
    cfg = tma_dkdv_config(q.shape[-1], flags)
    if sink_block_n is not None and cfg["BLOCK_N"] != sink_block_n:
        return None
    return cfg


_MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's 2nd and 3rd dimensions


def check_grid(batch: int, heads: int) -> None:
    """The kernels put batch x query heads on the grid's second axis: refuse more than CUDA allows, clearly."""
    if batch * heads > _MAX_GRID_YZ:
        raise ValueError(f"batch x query heads = {batch} x {heads} = {batch * heads} exceeds {_MAX_GRID_YZ}, the most "
                         "the Triton masked-attention kernels launch; split the batch into chunks of at most "
                         f"{_MAX_GRID_YZ // heads} rows")


def flash_masked_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_global: torch.Tensor | None,
    k_global: torch.Tensor | None, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
    q_offset: int, n_global: int, n_local: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``n_local <= 0`` means no window. Returns ``(out, lse)``.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]``; q_global ``[B, Hq, Tq, D]`` and k_global
            ``[B, Hkv, n_global, D]`` or None. Inputs are trusted (validated by the public function).

    Returns:
        ``out [B, Hq, Tq, D]`` (q.dtype, contiguous) and ``lse [B, Hq, Tq]`` (fp32, natural log).
    """
    q, k, v, q_global, k_global = _last_dim_contig(q, k, v, q_global, k_global)
    B, Hq, Tq, D = q.shape
    check_grid(B, Hq)
    if window_covers_all(q_offset, Tq, n_local):
        q_global = k_global = None
        n_global = n_local = 0
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    if Tq == 0:
        return out, lse
    meta_q, _ = mask_tables(B, Tq, Tk, q_offset, cu_seqlens, segments, q.device)
    s_mb = meta_q.stride(0) if meta_q.dim() == 3 and meta_q.shape[0] > 1 else 0
    qg = q_global if q_global is not None else q
    kg = k_global if k_global is not None else k
    flags = mask_flags(n_local, cu_seqlens, segments, q_global)
    if ws_fwd_enabled(q, k, v, flags, n_global):  # Hopper, causal or Λ: TMA loads and a producer warp (fwd_ws.py)
        LAST_LAUNCH["fwd"] = launch_ws_fwd(q, k, v, out, lse, q_offset, scale * LOG2E, n_global, n_local)
        return out, lse
    cfg = fwd_config(D, flags, q.element_size())
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    LAST_LAUNCH["fwd"] = _fwd_kernel[grid](
        q, k, v, qg, kg, out, lse, meta_q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2), out.stride(0), out.stride(1), out.stride(2), s_mb,
        Hq, Hq // Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        FAST_PATH=envs.attn_fast_path(), MERGED=merged_loops("fwd", D, flags), **flags, **cfg,
    )
    return out, lse


def flash_masked_attention_bwd(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, q_global: torch.Tensor | None,
    k_global: torch.Tensor | None, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
    q_offset: int, n_global: int, n_local: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Deterministic backward. Returns ``(dq, dk, dv, dq_global, dk_global)`` (the last two None
    without the distance limit); gradients in the input dtypes, contiguous."""
    if window_covers_all(q_offset, q.shape[2], n_local):  # causal, as in the forward
        dq, dk, dv, _, _ = flash_masked_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, None, None, cu_seqlens,
                                                      segments, q_offset, 0, 0, scale)
        if q_global is None:
            return dq, dk, dv, None, None
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q_global, k_global)]
        return dq, dk, dv, *zeros
    q, k, v, q_global, k_global, grad_out = _last_dim_contig(q, k, v, q_global, k_global, grad_out)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, Tk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, Hkv, Tk, D, dtype=v.dtype, device=q.device)
    dqg = torch.empty_like(dq) if q_global is not None else None
    dkg = torch.zeros(k_global.shape, dtype=k_global.dtype, device=q.device) if k_global is not None else None
    if Tq == 0:
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, dqg, dkg
    meta_q, meta_k = mask_tables(B, Tq, Tk, q_offset, cu_seqlens, segments, q.device)
    s_mb = meta_q.stride(0) if meta_q.dim() == 3 and meta_q.shape[0] > 1 else 0
    s_mkb = meta_k.stride(0) if meta_k.dim() == 3 and meta_k.shape[0] > 1 else 0
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    pre_bm = 64
    _bwd_preprocess_kernel[(triton.cdiv(Tq, pre_bm), B * Hq)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), Hq, Tq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_bm,
        HAS_DLSE=grad_lse is not None,
    )
    qg = q_global if q_global is not None else q
    kg = k_global if k_global is not None else k
    flags = mask_flags(n_local, cu_seqlens, segments, q_global)
    cfg_kv, cfg_q = bwd_config(D, flags, q.element_size())
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qg.stride(0), qg.stride(1), qg.stride(2),
        kg.stride(0), kg.stride(1), kg.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )
    dkdv_args = (q, k, v, qg, kg, grad_out, lse, delta)
    scalars = (*common_strides, s_mb, s_mkb, Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0),
               scale * LOG2E, scale)
    consts = {"GROUP": Hq // Hkv, "HEAD_DIM": D, "BLOCK_D": block_d, "FAST_PATH": envs.attn_fast_path()}
    n_kv_blk = triton.cdiv(Tk, cfg_kv["BLOCK_N"])
    for name in ("bwd_dkdv", "bwd_dkdv_sink"):
        LAST_LAUNCH.pop(name, None)
    # With the distance limit only the sink kv blocks need the q_global/k_global variant, which holds a third
    # accumulator (narrower tiles, spills). The other kv blocks run the plain sink-window kernel; the sink
    # blocks, which every query sees, get their own launch split over query chunks (else B*Hkv programs would
    # each walk all of Tq alone at the end of the backward).
    n_sink_blk = min(triton.cdiv(n_global, cfg_kv["BLOCK_N"]), n_kv_blk) if q_global is not None else 0
    tma_cfg = _tma_dkdv_tiles(q, k, v, grad_out, flags, cfg_kv["BLOCK_N"] if n_sink_blk else None)
    if n_kv_blk > n_sink_blk and tma_cfg is not None:
        # Hopper: every load through a TMA descriptor, one loop with the elementwise mask (dkdv_tma.py)
        LAST_LAUNCH["bwd_dkdv"] = launch_tma_dkdv(q, k, v, grad_out, lse, delta, dk, dv, meta_q, meta_k, s_mkb,
                                                 q_offset, n_global, n_local, scale, flags, n_sink_blk, tma_cfg)
    elif n_kv_blk > n_sink_blk:
        cfg_main = bwd_config(D, {**flags, "USE_GLOBAL": False}, q.element_size())[0] if n_sink_blk else cfg_kv
        if cfg_main["BLOCK_N"] != cfg_kv["BLOCK_N"]:
            raise ValueError(f"dk/dv tiles {cfg_main} and {cfg_kv} (distance limit) need the same BLOCK_N")
        per_prog = gqa_heads_per_program(Hq // Hkv, B * Hq * Tk * D * 8, D)
        if per_prog == Hq // Hkv:
            LAST_LAUNCH["bwd_dkdv"] = _bwd_dkdv_kernel[(n_kv_blk - n_sink_blk, B * Hkv, 1)](
                *dkdv_args, dk, dv, dk, meta_q, meta_k, *scalars, n_sink_blk, 0, Tk, 0, 0,
                **{**flags, "USE_GLOBAL": False}, **consts, **cfg_main, CHUNKED=False, SPLIT_HEADS=False,
            )
        else:
            # GQA: one program per (kv block, subset of the group's query heads), fp32 partials summed here.
            # A kv-block program that walks all GROUP heads runs GROUP x longer, and the last heads' heaviest
            # programs then finish long after the rest (measured: GQA dk/dv 1.2x MHA's time at hd 64).
            n_split = (Hq // Hkv) // per_prog
            part = torch.empty(2, n_split, B, Hkv, Tk, D, dtype=torch.float32, device=dk.device)
            LAST_LAUNCH["bwd_dkdv"] = _bwd_dkdv_kernel[(n_kv_blk - n_sink_blk, B * Hkv, n_split)](
                *dkdv_args, part[0], part[1], dk, meta_q, meta_k, *scalars, n_sink_blk, 0, Tk, part.stride(1), 0,
                **{**flags, "USE_GLOBAL": False}, **{**consts, "GROUP": per_prog}, **cfg_main, CHUNKED=False,
                SPLIT_HEADS=True,
            )
            rows = slice(n_sink_blk * cfg_kv["BLOCK_N"], None)
            _add_partials(part[0], dk, rows)
            _add_partials(part[1], dv, rows)
    if n_sink_blk:
        LAST_LAUNCH["bwd_dkdv_sink"] = _sink_dkdv(dkdv_args, dk, dv, dkg, meta_q, meta_k, scalars, consts, flags,
                                                  cfg_kv, n_sink_blk)
    LAST_LAUNCH["bwd_dq"] = _bwd_dq_kernel[(triton.cdiv(Tq, cfg_q["BLOCK_M"]), B * Hq)](
        q, k, v, qg, kg, grad_out, lse, delta, dq, dqg if dqg is not None else dq, meta_q,
        *common_strides, s_mb,
        Hq, Hq // Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=block_d, FAST_PATH=envs.attn_fast_path(), MERGED=merged_loops("dq", D, flags),
        **flags, **cfg_q,
    )
    return dq, dk, dv, dqg, dkg
