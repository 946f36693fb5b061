"""Plain-PyTorch Λ attention with the distance limit, on explicit positions.

Rule, per batch row, query at position ``p`` and key at position ``s`` (``s < 0`` = padding, never seen):

* local branch, ``0 <= p - s < n_local``: score ``q_p · k_s`` (both post-RoPE, so relative distance
  ``p - s`` as in pretraining);
* global branch, ``s < n_global`` and ``p - s >= n_local``: score ``q'_p · k'_s`` with
  ``q'_p = R(limit - p) q_p`` and ``k'_s = R(-s) k_s``, i.e. the pair seen at distance ``limit``;
* everything else is masked. One softmax over both branches (equivalently, a log-sum-exp merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..rope.naive import naive_rope_rotate

__all__ = ["LambdaPositions", "chunked_lambda_attention", "dense_lambda_attention"]


@dataclass
class LambdaPositions:
    """Absolute positions of queries ``[B, Tq]`` and keys ``[B, Tk]`` (``-1`` marks padding keys).

    Key positions must be non-decreasing along each row apart from padding (true for HF caches,
    left padding, and the bounded LM-Infinite cache), which lets the chunked path slice a band.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: LambdaPositions) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    if pos.q_pos.shape != (b, tq) or pos.k_pos.shape != (b, tk):
        raise ValueError(f"positions must be q_pos [B={b}, Tq={tq}] and k_pos [B={b}, Tk={tk}], got "
                         f"{tuple(pos.q_pos.shape)} and {tuple(pos.k_pos.shape)}")


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, Tq, Tk]`` fp32 dot products with GQA by broadcasting (no repeated K copy)."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, tq, d)
    return torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)).view(b, hq, tq, k.shape[2])


def _weighted(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, hq, tq, tk = p.shape
    hkv = v.shape[1]
    out = torch.matmul(p.view(b, hkv, hq // hkv, tq, tk), v.float()[:, :, None])
    return out.view(b, hq, tq, v.shape[-1])


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a key band: ``(out fp32 [B,Hq,Tq,D], lse fp32 [B,Hq,Tq])``.

    On CPU, torch's fused flash kernel (which also returns the log-sum-exp) does the work in the input
    dtype with fp32 accumulation; elsewhere the scores are formed in fp32. Rows with no visible key give
    ``out = 0`` and ``lse = -inf``.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and k.shape[2] > 0:
        g = q.shape[1] // k.shape[1]
        kr = k.repeat_interleave(g, dim=1) if g > 1 else k
        vr = v.repeat_interleave(g, dim=1) if g > 1 else v
        bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
        out, lse = _CPU_FLASH(q, kr, vr, 0.0, False, attn_mask=bias, scale=scale)
        empty = ~visible.any(-1)  # [B, 1, Tq]
        if bool(empty.any()):
            out = out.masked_fill(empty[..., None], 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
        return out.float(), lse
    sc = torch.where(visible, _scores(q, k) * scale, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    return _weighted(torch.softmax(sc, dim=-1).nan_to_num(0.0), v), lse


def dense_lambda_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: LambdaPositions, *, n_global: int, n_local: int,
    limit: int, inv_freq: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """O(Tq·Tk)-memory statement of the rule (tests only). Returns ``[B, Hq, Tq, D]`` in ``q.dtype``."""
    _check(q, k, v, pos)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = pos.q_pos[:, None, :, None]
    s = pos.k_pos[:, None, None, :]
    valid = (s >= 0) & (s <= p)
    local = valid & (p - s < n_local)
    glob = valid & ~local & (s < n_global)
    q_stat = naive_rope_rotate(q, limit - pos.q_pos, inv_freq)
    k_stat = naive_rope_rotate(k, -pos.k_pos.clamp(min=0), inv_freq)
    sc = torch.where(local, _scores(q, k), torch.where(glob, _scores(q_stat, k_stat), float("-inf"))) * scale
    probs = torch.softmax(sc, dim=-1).nan_to_num(0.0)
    return _weighted(probs, v).to(q.dtype)


def chunked_lambda_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: LambdaPositions, *, n_global: int, n_local: int,
    limit: int, inv_freq: torch.Tensor, scale: float | None = None, chunk: int = 1024,
) -> torch.Tensor:
    """Λ attention in O(chunk · (chunk + n_local + n_global)) memory per step.

    Queries are processed in chunks; each chunk sees a band of keys (its local window, sliced by
    position) plus the few global-branch keys, scored jointly in one softmax.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries. k, v: ``[B, Hkv, Tk, D]`` post-RoPE keys and values.
        pos: query and key positions (see :class:`LambdaPositions`).
        n_global, n_local, limit: LM-Infinite parameters (sink size, window, distance limit).
        inv_freq: ``[D/2]`` RoPE inverse frequencies used to re-rotate the global branch.
        scale: softmax scale, default ``D**-0.5``. chunk: queries per step.

    Returns:
        ``[B, Hq, Tq, D]`` in ``q.dtype``; queries with no visible key (padding) get zeros.
    """
    _check(q, k, v, pos)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, hq, tq, d = q.shape
    k_pos = pos.k_pos
    big = torch.iinfo(torch.int64).max
    # Padding keys (-1) sorted as +inf for the band search; real key positions are non-decreasing.
    k_sorted = torch.where(k_pos >= 0, k_pos, torch.full_like(k_pos, big))
    # Global-branch candidates: columns holding a real key with position < n_global (a prefix of columns
    # once left padding is included), re-rotated to position 0 once for all chunks.
    is_glob = (k_pos >= 0) & (k_pos < n_global)
    n_gcols = int(is_glob.nonzero()[:, 1].max().item()) + 1 if bool(is_glob.any()) else 0
    if n_gcols:
        kg = naive_rope_rotate(k[:, :, :n_gcols], -k_pos[:, :n_gcols].clamp(min=0), inv_freq)
        vg, gpos = v[:, :, :n_gcols], k_pos[:, :n_gcols]
    out = torch.empty_like(q)
    for c0 in range(0, tq, chunk):
        c1 = min(c0 + chunk, tq)
        qc, qp = q[:, :, c0:c1], pos.q_pos[:, c0:c1]
        # Key columns whose positions fall in [min(qp) - n_local + 1, max(qp)] for any row.
        lo_pos = (qp.min(dim=1).values - n_local + 1)[:, None]
        hi_pos = qp.max(dim=1).values[:, None]
        lo = int(torch.searchsorted(k_sorted, lo_pos, right=False).min().item())
        hi = int(torch.searchsorted(k_sorted, hi_pos, right=True).max().item())
        hi = max(hi, lo)
        sb = k_pos[:, lo:hi]
        p = qp[:, None, :, None]
        s = sb[:, None, None, :]
        local = (s >= 0) & (s <= p) & (p - s < n_local)
        o_loc, lse_loc = _band_attention(qc, k[:, :, lo:hi], v[:, :, lo:hi], local, scale)
        if n_gcols:
            sg = gpos[:, None, None, :]
            glob = (sg >= 0) & (sg < n_global) & (p - sg >= n_local)
            if bool(glob.any()):
                q_stat = naive_rope_rotate(qc, limit - qp, inv_freq)
                scg = torch.where(glob, _scores(q_stat, kg) * scale, float("-inf"))
                lse_g = torch.logsumexp(scg, dim=-1)
                o_g = _weighted(torch.softmax(scg, dim=-1).nan_to_num(0.0), vg)
                # Merge the two softmaxes by their log-sum-exps (one softmax over both branches).
                lse = torch.logaddexp(lse_loc, lse_g)
                w_loc = torch.exp(lse_loc - lse).nan_to_num(0.0)[..., None]
                w_g = torch.exp(lse_g - lse).nan_to_num(0.0)[..., None]
                o_loc = o_loc * w_loc + o_g * w_g
        out[:, :, c0:c1] = o_loc.to(q.dtype)
    return out
