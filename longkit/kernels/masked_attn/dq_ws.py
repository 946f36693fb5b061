"""dq of the masked attention backward on Hopper, with TMA loads and warp specialisation.

Same math as :func:`flash._bwd_dq_kernel` (one program per query block and query head, deterministic) for the
causal (GQA, ``q_offset``) and Λ masks (``tma_ws.py`` says why not documents, shared prefix or q_global): k/v tiles
come from 2-D descriptors made in the kernel, and ``tl.range(..., warp_specialize=True)`` hands their loads to a
producer warp, as in the specialised forward (``fwd_ws.py``), whose block schedule and mask this kernel shares.
One loop applies the mask on every scheduled kv block: Triton 3.6 specialises only a single loop.

Why: the pointer dq kernel spends its issue slots on 16-byte ``cp.async`` loads and their address arithmetic inside
the loop (the forward's profile showed the same), and the TMA dk/dv, which removed those, ran 1.28-1.37x faster than
its pointer kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flash import _interpreting, _parse_cfg
from .tma_ws import (
    check_ws_tiles,
    ensure_allocator,
    flat_rows_desc,
    row_table_load,
    ws_block_start,
    ws_kv_schedule,
    ws_mask_problem,
    ws_mask_scores,
    ws_switch,
)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local"])
def _bwd_dq_ws_kernel(
    Q, K, V, DO, LSE2, DELTA2, DQ, s_l, B, Hq, Hkv, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, WS: tl.constexpr,
):
    """Program ``(i, b * Hq + h)``: dq of query block ``n_blocks - 1 - i`` of query head ``h`` into contiguous
    ``DQ [B, Hq, Tq, HEAD_DIM]``. ``LSE2`` / ``DELTA2``: ``[B * Hq, Tq]`` tables (row stride ``s_l``,
    ``tma_ws.rows_2d``) of the base-2 log-sum-exp (``tma_ws.lse_base2``) and delta. ``HAS_WINDOW``: the Λ
    mask, else causal."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    do_desc = flat_rows_desc(DO, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    kv_row0 = (b * Hkv + hk) * Tk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([bh * Tq + start_m, 0])
    do = do_desc.load([bh * Tq + start_m, 0])
    # rows past Tq read 0 from the tables: +inf makes their p = 0 (they are not stored either)
    lse = tl.where(offs_m < Tq, row_table_load(LSE2, B * Hq, s_l, Tq, bh, start_m, BLOCK_M), float("inf"))
    delta = row_table_load(DELTA2, B * Hq, s_l, Tq, bh, start_m, BLOCK_M)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pos, lim, start, ga0, gal, n_iter = ws_kv_schedule(start_m, offs_m, Tq, Tk, q_offset, n_global, n_local,
                                                       BLOCK_M, BLOCK_N, HAS_WINDOW)
    for it in tl.range(0, n_iter, warp_specialize=WS):
        start_n = ws_block_start(it, start, ga0, gal, BLOCK_N, HAS_WINDOW)
        k = k_desc.load([kv_row0 + start_n, 0])
        v = v_desc.load([kv_row0 + start_n, 0])
        s = ws_mask_scores(tl.dot(q, k.T), start_n + tl.arange(0, BLOCK_N), pos, lim, n_global, n_local, HAS_WINDOW)
        p = tl.math.exp2(s * sm_scale_log2 - lse[:, None])
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    # a pointer store, as in the forward (a descriptor store fails to compile under the pass)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(DQ + (bh.to(tl.int64) * Tq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m < Tq)[:, None])


def ws_dq_config() -> dict[str, int]:
    """Tiles: 64 query rows (the per-row lse / delta tables need ``BLOCK_M <= 64`` under the pass, ``tma_ws.py``),
    64-key kv tiles, 4 warps (the pass adds the producer warp), 2 stages.
    ``LONGKIT_ATTN_WS_DQ_CONFIG="BM,BN,warps,stages"`` overrides (tuning); more warps leave it unspecialised."""
    env = os.environ.get("LONGKIT_ATTN_WS_DQ_CONFIG")
    if env:
        return check_ws_tiles(_parse_cfg(env), "LONGKIT_ATTN_WS_DQ_CONFIG")
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def ws_dq_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                  flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised dq runs instead of the pointer kernel: causal / GQA and Λ masks, contiguous
    aligned inputs, head dims 16-128. Off by default until measured. ``LONGKIT_ATTN_WS_DQ``: see
    :func:`tma_ws.ws_switch`."""
    return ws_switch("LONGKIT_ATTN_WS_DQ", ws_mask_problem(flags), (q, k, v, grad_out), "q/k/v/grad_out",
                     "the pointer dq kernel", False)


def launch_ws_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, lse_r: torch.Tensor,
                 delta_r: torch.Tensor, dq: torch.Tensor, q_offset: int, n_global: int, n_local: int, scale: float,
                 flags: dict[str, bool]) -> object:
    """dq into contiguous ``dq [B, Hq, Tq, D]``; ``lse_r`` / ``delta_r`` as the kernel's ``LSE2`` / ``DELTA2``
    (same row stride)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = ws_dq_config()
    if q.is_cuda:
        ensure_allocator()
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    return _bwd_dq_ws_kernel[grid](
        q, k, v, grad_out, lse_r, delta_r, dq, lse_r.stride(0), B, Hq, Hkv, Tq, Tk, q_offset, n_global,
        max(n_local, 0), scale * 1.4426950408889634, scale,
        GROUP=Hq // Hkv, HEAD_DIM=D, HAS_WINDOW=flags["HAS_WINDOW"], WS=not _interpreting(), **cfg,
    )
