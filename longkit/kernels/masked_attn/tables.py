"""The per-token mask tables the kernels read: documents and shared-prefix segments, built on the host.

A documents or shared-prefix mask arrives as small tensors (``cu_seqlens``, per-document or per-row ``segments``);
the kernels read small per-token int32 tables instead: ``[B or 1, 3, Tq]`` for queries (doc start, hidden start,
hidden end: the span a rejected-branch query must not see) and ``[B or 1, 4, Tk]`` for keys (doc start, doc end,
chosen start, rejected start). Both are built with a few torch ops on the inputs' device (no host sync) and
memoised per mask tensor (:func:`mask_tables`): every layer of a model, forward and backward, passes the same mask
tensors.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from longkit.kernels.masks import tensor_version

__all__ = ["mask_tables", "build_mask_tables"]

# (shapes, device, ids of the mask tensors) -> (weak references to them, their versions, the tables)
_TABLE_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_TABLE_CACHE_SIZE = 8


def mask_tables(
    batch: int, tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
    segments: torch.Tensor | None, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`build_mask_tables`, memoised on the very ``cu_seqlens`` / ``segments`` tensor objects (weak
    references, so a freed tensor whose memory is reused never hits) and their in-place modification counters.
    Every layer of a model, forward and backward, passes the same mask tensors: the tables (about ten small
    kernels) are then built once. At most ``_TABLE_CACHE_SIZE`` entries; tables of the oldest are dropped."""
    if cu_seqlens is None and segments is None:
        return build_mask_tables(batch, tq, tk, q_offset, cu_seqlens, segments, device)
    versions = (tensor_version(cu_seqlens), tensor_version(segments))
    key = (batch, tq, tk, q_offset, str(device), id(cu_seqlens), id(segments))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and None not in versions:
        refs, cached_versions, tables = hit
        same = all((r is None and t is None) or (r is not None and r() is t)
                   for r, t in zip(refs, (cu_seqlens, segments)))
        if same and cached_versions == versions:
            _TABLE_CACHE.move_to_end(key)
            return tables
    tables = build_mask_tables(batch, tq, tk, q_offset, cu_seqlens, segments, device)
    if None not in versions:
        refs = tuple(weakref.ref(t) if t is not None else None for t in (cu_seqlens, segments))
        _TABLE_CACHE[key] = (refs, versions, tables)
        _TABLE_CACHE.move_to_end(key)
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    return tables


def build_mask_tables(
    batch: int, tq: int, tk: int, q_offset: int, cu_seqlens: torch.Tensor | None,
    segments: torch.Tensor | None, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int32 tables read by the kernels (no host sync).

    Returns:
        ``meta_q [Bm, 3, Tq]`` (doc start, hidden start, hidden end per query) and ``meta_k [Bm, 4, Tk]``
        (doc start, doc end, chosen start, rejected start per key); ``Bm`` is ``B`` for per-row shared
        prefix segments and 1 otherwise. Dummy 1-element tensors when neither documents nor segments.
    """
    if cu_seqlens is None and segments is None:
        z = torch.zeros(1, dtype=torch.int32, device=device)
        return z, z
    t = torch.arange(tk, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.bucketize(t, cu[1:], right=True).clamp_max(cu.numel() - 2)
        dstart, dend = cu[doc], cu[doc + 1]
    else:
        doc = None
        dstart, dend = torch.zeros_like(t), torch.full_like(t, tk)
    if segments is not None:
        seg = segments.to(device=device, dtype=torch.long)
        if doc is not None:
            cs, rs = (seg[doc, 0] + dstart)[None], (seg[doc, 1] + dstart)[None]
        else:
            cs = seg[:, 0:1].expand(batch, tk)
            rs = seg[:, 1:2].expand(batch, tk)
    else:
        cs = rs = torch.zeros_like(t)[None]
    bm = cs.shape[0]
    meta_k = torch.stack([dstart[None].expand(bm, tk), dend[None].expand(bm, tk), cs, rs], dim=1)
    p = torch.arange(tq, device=device) + q_offset
    hidden = p[None] >= rs[:, p]
    meta_q = torch.stack([
        dstart[p][None].expand(bm, tq),
        torch.where(hidden, cs[:, p], 0),
        torch.where(hidden, rs[:, p], 0),
    ], dim=1)
    return meta_q.to(torch.int32).contiguous(), meta_k.to(torch.int32).contiguous()
