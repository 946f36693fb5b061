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

import os

import torch
import triton
import triton.language as tl

from .flash import _interpreting


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
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    # descriptors made here, not on the host, and 2-D over the flattened (batch, head, token) rows: on the H200 the
    # specialised loop hung with 4-D [B, H, T, D] descriptors (as the specialised dk/dv did with host-made ones,
    # docs/kernel_notes.md). Rows past a head's end belong to the next head (or are zero-padded past the tensor's
    # end): the causal mask drops such keys, and such query rows are not stored.
    q_desc = tl.make_tensor_descriptor(Q, shape=[B * Hq * Tq, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[B * Hkv * Tk, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[B * Hkv * Tk, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    kv_row0 = (b * Hkv + hk) * Tk
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
                              HEAD_DIM, BLOCK_N, WS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    # a pointer store: Triton 3.6's warp-specialisation pass fails to compile this kernel with a descriptor store
    row_ok = offs_m < Tq
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


def ws_fwd_config(head_dim: int) -> dict[str, int]:
    """Tiles: 128×128 on 4 warps (two consumer warpgroups and the producer the pass adds), 2 stages. Fixed on
    purpose: on the H200 (Triton 3.6) the 3-stage and 64-wide kv-tile variants compiled, ran, and returned NaN
    (``attention_sweep_h200_ws_{4096,16384}.json``), so no override is offered."""
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


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


def ws_fwd_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised causal forward runs: plain causal / GQA masks, contiguous aligned inputs, head
    dims 16-128 (powers of two); by default on Hopper at head dim 128 only (at 64 it was 1.15-1.29x slower than
    the pointer kernel in the same H200 sweep). ``LONGKIT_ATTN_WS_FWD``: see :func:`ws_switch`."""
    problem = "the mask is not plain causal (window, documents, shared prefix or q_global)" if any(flags.values()) \
        else None
    return ws_switch("LONGKIT_ATTN_WS_FWD", problem, (q, k, v), "q/k/v", "the pointer kernel", q.shape[-1] == 128)


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


def launch_ws_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  q_offset: int, scale_log2: float) -> object:
    """Causal forward into contiguous ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cfg = ws_fwd_config(D)
    if q.is_cuda:
        ensure_allocator()
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq)
    return _fwd_ws_kernel[grid](
        q, k, v, out, lse, B, Hq, Hkv, Tq, Tk, q_offset, scale_log2,
        GROUP=Hq // Hkv, HEAD_DIM=D, WS=not _interpreting(), **cfg,
    )
