"""The memory attention of one query chunk on CPU through torch's fused CPU flash kernel.

Same rule and arguments as :func:`.naive.naive_memory_attention` (the reference this is tested against), computed
as three softmax groups merged by their log-sum-exps, each group by the fused kernel LM-Infinite's chunked path
uses (:func:`longkit.kernels.lambda_attn.naive._band_attention`): the keys at their true distance (sinks inside the
window and the window, post-RoPE ``q · k``), the sinks beyond the window (``R(limit - p) q · R(-s) k``) and the
retrieved memory (``R(distance - p) q · k``). No ``[Tq, Tk]`` fp32 score matrix is formed, which makes the CPU path
several times faster than the reference at a few thousand keys per chunk.
"""

from __future__ import annotations

import math

import torch

from ..lambda_attn.naive import _band_attention
from ..rope.naive import naive_rope_rotate

__all__ = ["fused_cpu_memory_attention"]


def fused_cpu_memory_attention(
    q: torch.Tensor, q_pos: torch.Tensor, *, k_win: torch.Tensor, v_win: torch.Tensor, win_pos: torch.Tensor,
    k_sink: torch.Tensor, v_sink: torch.Tensor, sink_pos: torch.Tensor, k_mem: torch.Tensor | None,
    v_mem: torch.Tensor | None, mem_valid: torch.Tensor | None, n_global: int, n_local: int, limit: int,
    distance: int, inv_freq: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """See :func:`longkit.kernels.block_memory.naive_memory_attention` (same arguments, same result)."""
    b, hq, tq, d = q.shape
    hkv = k_win.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    p = q_pos[:, None, :, None]  # [B, 1, Tq, 1]
    groups = []
    # true distances: sinks inside the window, then the window
    s_sink = sink_pos[:, None, None, :]
    seen_sink = (s_sink >= 0) & (s_sink <= p)
    near_sink = seen_sink & (p - s_sink < n_local)
    s = win_pos[:, None, None, :]
    local = (s >= n_global) & (s <= p) & (p - s < n_local)
    groups.append(_band_attention(q, torch.cat([k_sink, k_win], 2), torch.cat([v_sink, v_win], 2),
                                  torch.cat([near_sink, local], -1), scale))
    far_sink = seen_sink & (p - s_sink >= n_local)
    if k_sink.shape[2] and bool(far_sink.any()):
        q_lim = naive_rope_rotate(q, limit - q_pos, inv_freq)
        k_lim = naive_rope_rotate(k_sink, -sink_pos.clamp(min=0), inv_freq)
        groups.append(_band_attention(q_lim, k_lim, v_sink, far_sink, scale))
    if k_mem is not None and k_mem.shape[2]:
        seen = (q_pos >= 0)[:, None, :, None].expand(b, hq, tq, k_mem.shape[2])
        if mem_valid is not None:
            seen = seen & mem_valid.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]
        q_mem = naive_rope_rotate(q, distance - q_pos, inv_freq)
        groups.append(_band_attention(q_mem, k_mem, v_mem, seen, scale))
    lse = torch.stack([g[1] for g in groups])  # [n, B, Hq, Tq]
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).nan_to_num(0.0)  # a query that sees nothing: all weights 0
    out = sum(w[..., None] * g[0] for w, g in zip(weights, groups))
    return out.to(q.dtype)
