"""Reference masked attention: plain PyTorch, fp32 math, dense mask. The test oracle and the CPU path."""

from __future__ import annotations

import math

import torch

from longkit.kernels.masks import AttentionMask

__all__ = ["naive_masked_attention"]


def naive_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask,
    scale: float | None = None,
    q_global: torch.Tensor | None = None,
    k_global: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention computed densely in fp32 (differentiable by autograd).

    Args:
        q: queries ``[B, Hq, Tq, D]``; query ``i`` sits at position ``mask.q_offset + i``.
        k: keys ``[B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        v: values ``[B, Hkv, Tk, D]``.
        mask: the visibility rule (:class:`~longkit.kernels.masks.AttentionMask`).
        scale: softmax scale, default ``1 / sqrt(D)``.
        q_global: optional ``[B, Hq, Tq, D]``; with ``k_global`` scores the global-branch pairs outside
            the window (``mask.global_branch``) as ``q_global[i] · k_global[j]``.
        k_global: optional ``[B, Hkv, n_global, D]``.

    Returns:
        ``(out, lse)``: ``out [B, Hq, Tq, D]`` in ``q.dtype`` and the natural-log log-sum-exp of the
        scaled scores ``lse [B, Hq, Tq]`` in fp32. Rows without a visible key give ``out = 0`` and
        ``lse = -inf``. fp64 inputs are computed (and lse returned) in fp64.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)  # fp32 math (fp64 when given fp64)
    visible = mask.dense(B, Tq, Tk, device=q.device)  # [B, 1, Tq, Tk]

    kf = k.to(cdt).repeat_interleave(group, dim=1)  # [B, Hq, Tk, D] (reference only: materialised)
    vf = v.to(cdt).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(cdt), kf) * scale
    if q_global is not None or k_global is not None:
        if q_global is None or k_global is None:
            raise ValueError("q_global and k_global must be given together")
        if mask.cu_seqlens is not None:
            raise NotImplementedError("q_global/k_global (distance limit) with documents is not supported")
        n_global = min(k_global.shape[2], Tk)  # k_global has n_global rows even while fewer keys exist
        glob = mask.global_branch(B, Tq, Tk, device=q.device)[..., :n_global]  # [B, 1, Tq, n_global]
        kg = k_global[:, :, :n_global].to(cdt).repeat_interleave(group, dim=1)
        scores_g = torch.einsum("bhid,bhjd->bhij", q_global.to(cdt), kg) * scale
        head = torch.where(glob, scores_g, scores[..., :n_global])
        scores = torch.cat([head, scores[..., n_global:]], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, Tq]; -inf for rows with no visible key
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhij,bhjd->bhid", probs, vf)
    return out.to(q.dtype), lse
