"""Forward on Hopper with TMA loads and warp specialisation, for the causal (GQA, ``q_offset``) and Λ masks.

Same math and outputs as :func:`flash._fwd_kernel` restricted to those masks: no documents, shared prefix or
q_global (``tma_ws.py`` says why). Why a second kernel: an ``ncu`` profile of the hd 128 × 4k causal
forward (H200, ``docs/kernel_notes.md``) put 23% of the pointer kernel's warp time outside its unmasked kv loop
(loading q, filling the software pipeline, the diagonal block, the epilogue), at one CTA per SM with nothing to
overlap it, and 16 ``cp.async`` plus their address arithmetic inside every iteration. Here every load is a TMA
descriptor load (made in the kernel) and ``tl.range(..., warp_specialize=True)`` hands them to a producer warp,
so the two consumer warpgroups only multiply and exponentiate, as cuDNN's kernel does.

Triton 3.6's Hopper warp specialisation needs every load in a descriptor and a single loop body without
data-dependent branches, so the mask is one compare and select per score on every block; with a window the loop
walks the pointer kernel's block schedule (sink blocks, then the window's), skipping the blocks between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import _interpreting
from .tma_ws import (
    ensure_allocator,
    flat_rows_desc,
    ws_block_start,
    ws_kv_schedule,
    ws_mask_problem,
    ws_mask_scores,
    ws_switch,
)


@triton.jit
def _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, pos, lim, n_global, n_local, sm_scale_log2, start, ga0, gal,
              n_iter, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, WS: tl.constexpr):
    """Online softmax over the ``n_iter`` scheduled kv blocks (``tma_ws.ws_kv_schedule``)."""
    for it in tl.range(0, n_iter, warp_specialize=WS):
        start_n = ws_block_start(it, start, ga0, gal, BLOCK_N, HAS_WINDOW)
        k = k_desc.load([kv_row0 + start_n, 0])
        s = ws_mask_scores(tl.dot(q, k.T), start_n + tl.arange(0, BLOCK_N), pos, lim, n_global, n_local, HAS_WINDOW)
        m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s * sm_scale_log2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([kv_row0 + start_n, 0])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset", "n_global", "n_local"])
def _fwd_ws_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, n_global, n_local, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, WS: tl.constexpr,
):
    """Program ``(i, b * Hq + h)``: query block ``n_blocks - 1 - i`` (heavy blocks first) of query head ``h``.
    ``Out`` is contiguous ``[B, Hq, Tq, HEAD_DIM]``; ``LSE`` ``[B, Hq, Tq]`` (natural log, -inf for rows that see
    no key). ``HAS_WINDOW``: the Λ mask (``n_global`` sinks, ``n_local`` window), else causal."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    # 2-D descriptors over the flattened rows (tma_ws.py says why); rows read past a head's end are masked
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    kv_row0 = (b * Hkv + hk) * Tk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([bh * Tq + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pos, lim, start, ga0, gal, n_iter = ws_kv_schedule(start_m, offs_m, Tq, Tk, q_offset, n_global, n_local,
                                                       BLOCK_M, BLOCK_N, HAS_WINDOW)
    # one loop, the mask on every block: Triton 3.6 specialises only a kernel whose every descriptor load sits in
    # one loop without data-dependent branches (an unmasked loop plus a masked one fails to compile)
    acc, l_i, m_i = _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, pos, lim, n_global, n_local, sm_scale_log2,
                              start, ga0, gal, n_iter, HEAD_DIM, BLOCK_N, HAS_WINDOW, WS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    # a pointer store: Triton 3.6's warp-specialisation pass fails to compile this kernel with a descriptor store
    row_ok = offs_m < Tq
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


def ws_fwd_config() -> dict[str, int]:
    """Tiles: 128×128 on 4 warps (two consumer warpgroups and the producer the pass adds), 2 stages. Fixed on
    purpose: on the H200 (Triton 3.6) the 3-stage and 64-wide kv-tile variants compiled, ran, and returned NaN
    (``attention_sweep_h200_ws_{4096,16384}.json``), so no override is offered."""
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


def ws_fwd_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised forward runs: causal / GQA and Λ masks (no documents, shared prefix or distance
    limit), contiguous aligned inputs, head dims 16-128 (powers of two); by default on Hopper at head dim 128 for
    causal / GQA (at 64 it was 1.15-1.29x slower than the pointer kernel in the same H200 sweep).
    ``LONGKIT_ATTN_WS_FWD``: see :func:`tma_ws.ws_switch`."""
    return ws_switch("LONGKIT_ATTN_WS_FWD", ws_mask_problem(flags), (q, k, v), "q/k/v", "the pointer kernel",
                     q.shape[-1] == 128 and not flags["HAS_WINDOW"])


def launch_ws_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  q_offset: int, n_global: int, n_local: int, scale_log2: float, flags: dict[str, bool]) -> object:
    """Forward into contiguous ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``; ``n_local <= 0`` means no window."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = ws_fwd_config()
    if q.is_cuda:
        ensure_allocator()
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    return _fwd_ws_kernel[grid](
        q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, n_global, max(n_local, 0), scale_log2,
        GROUP=Hq // Hkv, HEAD_DIM=D, HAS_WINDOW=flags["HAS_WINDOW"], WS=not _interpreting(), **cfg,
    )
