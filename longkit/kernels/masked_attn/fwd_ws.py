"""Causal forward on Hopper with TMA loads and warp specialisation (plain causal and GQA masks only).

Same math and outputs as :func:`flash._fwd_kernel` restricted to the causal mask (``q_offset`` included): no
window, documents, shared prefix or q_global. Why a second kernel: an ``ncu`` profile of the hd 128 × 4k causal
forward (H200, ``docs/kernel_notes.md``) put 23% of the pointer kernel's warp time outside its unmasked kv loop
(loading q, filling the software pipeline, the diagonal block, the epilogue), at one CTA per SM with nothing to
overlap it, and 16 ``cp.async`` plus their address arithmetic inside every iteration. Here every load is a TMA
descriptor load (made in the kernel) and ``tl.range(..., warp_specialize=True)`` hands them to a producer warp,
so the two consumer warpgroups only multiply and exponentiate, as cuDNN's kernel does.

Triton 3.6's Hopper warp specialisation needs every load in a descriptor and a single loop body without
data-dependent branches, so the causal mask is one compare and select per score on every block.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .flash import _interpreting
from .tma_ws import ensure_allocator, flat_rows_desc, ws_switch


@triton.jit
def _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, lim, sm_scale_log2, j_lo, j_hi,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    """Online softmax over kv blocks ``[j_lo, j_hi)``, keeping only keys ``<= lim`` (per row)."""
    for j in tl.range(j_lo, j_hi, warp_specialize=WS):
        start_n = j * BLOCK_N
        k = k_desc.load([kv_row0 + start_n, 0])
        s = tl.dot(q, k.T)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] <= lim[:, None], s, float("-inf"))
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


@triton.jit
def _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM: tl.constexpr):
    """Normalise and store a query block's rows ``offs_m`` of head ``bh`` (contiguous ``Out``, natural-log ``LSE``,
    -inf where a row sees no key). A pointer store: Triton 3.6's warp-specialisation pass fails to compile the kernel
    with a descriptor store."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < Tq
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             INNER_WS: tl.constexpr):
    """Query block ``pid_m`` of flattened query head ``bh`` (= b * Hq + h): load q, run the kv loop, store."""
    kv_row0 = ((bh // Hq) * Hkv + (bh % Hq) // GROUP) * Tk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # a row sees keys 0..min(its position, Tk - 1); the mask drops the rows read past Tk (next head's, or zeros)
    lim = tl.minimum(q_offset + offs_m, Tk - 1)
    q = q_desc.load([bh * Tq + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_blk = tl.cdiv(tl.maximum(tl.minimum(Tk, q_offset + start_m + BLOCK_M), 0), BLOCK_N)
    # one loop, the mask on every block: Triton 3.6 specialises only a kernel whose every descriptor load sits in
    # one loop without data-dependent branches (an unmasked loop plus a masked one fails to compile)
    acc, l_i, m_i = _ws_inner(acc, l_i, m_i, q, k_desc, v_desc, kv_row0, lim, sm_scale_log2, 0, n_blk,
                              HEAD_DIM, BLOCK_N, INNER_WS)
    _ws_store(acc, l_i, m_i, Out, LSE, bh, offs_m, Tq, HEAD_DIM)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])
def _fwd_ws_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    """Program ``(i, b * Hq + h)``: query block ``n_blocks - 1 - i`` (heavy blocks first) of query head ``h``.
    ``Out`` is contiguous ``[B, Hq, Tq, HEAD_DIM]``; ``LSE`` ``[B, Hq, Tq]`` (natural log, -inf for rows that see
    no key)."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    # 2-D descriptors over the flattened rows (tma_ws.py says why); rows read past a head's end are masked
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
             GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, WS)


@triton.jit(do_not_specialize=["Tq", "Tk", "q_offset"])
def _fwd_ws_paired_kernel(
    Q, K, V, Out, LSE, B, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WS: tl.constexpr,
):
    """The same tiles, persistent: program ``p`` of ``P`` walks items ``p, p + P, ...``, item ``i`` of head ``bh``
    being the query-block pair ``(n - 1 - i, i)``. A pair costs ``n + 1`` kv blocks (plus twice the offset's) whatever
    ``i``, so every program gets the same work to within one pair, and one program's specialised loop spans all its
    tiles: the producer loads the next tile's q and k/v while the consumers finish the current one's epilogue. With
    an odd ``n`` the middle block is its own pair and is computed twice (the same values stored twice)."""
    q_desc = flat_rows_desc(Q, B * Hq * Tq, HEAD_DIM, BLOCK_M)
    k_desc = flat_rows_desc(K, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    v_desc = flat_rows_desc(V, B * Hkv * Tk, HEAD_DIM, BLOCK_N)
    n_m = tl.cdiv(Tq, BLOCK_M)
    per_head = (n_m + 1) // 2
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for t in tl.range(0, 2 * tl.cdiv(B * Hq * per_head - pid, n_prog), warp_specialize=WS):
        item = pid + (t // 2) * n_prog
        bh = item // per_head
        i = item - bh * per_head
        pid_m = tl.where(t % 2 == 0, n_m - 1 - i, i)
        _ws_tile(q_desc, k_desc, v_desc, Out, LSE, bh, pid_m, Hq, Hkv, Tq, Tk, q_offset, sm_scale_log2,
                 GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, False)


def ws_fwd_config() -> dict[str, int]:
    """Tiles: 128×128 on 4 warps (two consumer warpgroups and the producer the pass adds), 2 stages. Fixed on
    purpose: on the H200 (Triton 3.6) the 3-stage and 64-wide kv-tile variants compiled, ran, and returned NaN
    (``attention_sweep_h200_ws_{4096,16384}.json``), so no override is offered."""
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


def ws_fwd_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised causal forward runs: plain causal / GQA masks, contiguous aligned inputs, head
    dims 16-128 (powers of two); by default on Hopper at head dim 128 only (at 64 it was 1.15-1.29x slower than
    the pointer kernel in the same H200 sweep). ``LONGKIT_ATTN_WS_FWD``: see :func:`tma_ws.ws_switch`."""
    problem = "the mask is not plain causal (window, documents, shared prefix or q_global)" if any(flags.values()) \
        else None
    return ws_switch("LONGKIT_ATTN_WS_FWD", problem, (q, k, v), "q/k/v", "the pointer kernel", q.shape[-1] == 128)


# Longest query length at which the persistent pair schedule is the default. Same-run H200 sweep, hd 128, forward
# per tile / paired, mean of two rows each, causal and GQA 4:1 (attention_sweep_h200_paired_fwd_*.json): 2k 1.09-1.12x,
# 4k 1.01-1.03x, 8k 0.99-1.02x, 16k 0.96-1.00x. It pays where the per-tile prologue and epilogue weigh most.
PAIRED_MAX_TQ = 4096


def ws_fwd_paired(Tq: int, block_m: int) -> bool:
    """Whether the specialised forward runs persistent over query-block pairs (``_fwd_ws_paired_kernel``) instead of
    one program per tile. ``LONGKIT_ATTN_WS_FWD_PAIRED``: ``0`` never, ``1`` always (an odd number of query blocks
    then computes each head's middle block twice); unset: on a GPU when the number of query blocks is even and
    ``Tq <= PAIRED_MAX_TQ``, off under the interpreter. Either way the outputs are the same, bit for bit."""
    env = os.environ.get("LONGKIT_ATTN_WS_FWD_PAIRED")
    if env not in (None, "", "0", "1"):
        raise ValueError(f"LONGKIT_ATTN_WS_FWD_PAIRED must be 0 or 1, got {env!r}")
    if env:
        return env == "1"
    return not _interpreting() and triton.cdiv(Tq, block_m) % 2 == 0 and Tq <= PAIRED_MAX_TQ


@functools.cache
def _n_programs(device_index: int) -> int:
    """One persistent program per SM (a 128x128 specialised tile fills an SM's shared memory)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_ws_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  q_offset: int, scale_log2: float) -> object:
    """Causal forward into contiguous ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = ws_fwd_config()
    if q.is_cuda:
        ensure_allocator()
    n_m = triton.cdiv(Tq, cfg["BLOCK_M"])
    if ws_fwd_paired(Tq, cfg["BLOCK_M"]):
        # under the interpreter 3 programs, so that the tests walk several pairs per program
        n_prog = _n_programs(q.device.index or 0) if q.is_cuda else 3
        return _fwd_ws_paired_kernel[(min(n_prog, B * Hq * ((n_m + 1) // 2)),)](
            q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, scale_log2,
            GROUP=Hq // Hkv, HEAD_DIM=D, WS=not _interpreting(), **cfg,
        )
    return _fwd_ws_kernel[(n_m, B * Hq)](
        q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, scale_log2,
        GROUP=Hq // Hkv, HEAD_DIM=D, WS=not _interpreting(), **cfg,
    )
