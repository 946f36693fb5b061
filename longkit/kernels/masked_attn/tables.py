"""The per-token mask tables the kernels read: documents and shared-prefix segments, built on the host.

A documents or shared-prefix mask arrives as small tensors (``cu_seqlens``, per-document or per-row ``segments``
``[rows_or_docs, G]`` of branch starts ``s_1 <= ... <= s_G``, see :func:`longkit.kernels.masks.shared_prefix`); the
kernels read small per-token int32 tables instead: ``[B or 1, 3, Tq]`` for queries (doc start, hidden start, hidden
end: the one contiguous span a query must not see, ``[s_1, s_b)`` for a query in branch ``b >= 2``, empty
otherwise) and ``[B or 1, 4, Tk]`` for keys (doc start, doc end, and a branch span ``[kcs, krs)``: the keys in it
are seen by no query at or after ``krs``). Both are built with a few torch ops on the inputs' device (no host sync)
and memoised per mask tensor (:func:`mask_tables`): every layer of a model, forward and backward, passes the same
mask tensors.

With ``G = 2`` (DPO) the columns are (chosen start, rejected start) for every key, as they always were.
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

    A token's branch is the number of its row's/document's starts at or before it (0: the prefix, ``b``: branch
    ``b``, spanning ``[s_b, s_{b+1})``, the last one to the row/document end); positions are absolute here.

    Returns:
        ``meta_q [Bm, 3, Tq]``: doc start, hidden start, hidden end per query; the hidden span is ``[s_1, s_b)``
        for a query in branch ``b >= 2`` and ``(0, 0)`` (nothing) in the prefix or branch 1. ``meta_k [Bm, 4, Tk]``:
        doc start, doc end and ``(kcs, krs) = (s_c, s_{c+1})`` with ``c`` the key's branch clamped to
        ``[1, G - 1]``: for a key in branch ``b < G`` its own branch (no query at or after its end sees it, which
        the kv-block-parallel dk/dv uses to bound the query blocks, ``_jit._kv_block_rows``); a key in the prefix
        lies before ``kcs`` and one in the last branch at or after ``krs``, so neither is inside its span (nothing
        bounds the queries that see it). ``G = 2`` gives (chosen start, rejected start) for every key. ``Bm`` is
        ``B`` for per-row shared prefix segments and 1 otherwise. Dummy 1-element tensors when neither documents
        nor segments.
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
    p = torch.arange(tq, device=device) + q_offset
    if segments is not None:
        seg = segments.to(device=device, dtype=torch.long)
        g = seg.shape[1]
        if doc is not None:
            starts = (seg[doc] + dstart[:, None])[None]  # [1, Tk, G]: absolute starts of each token's document
        else:
            starts = seg[:, None, :].expand(batch, tk, g)  # [B, Tk, G]
        branch = (starts <= t[None, :, None]).sum(2)  # [Bm, Tk]: 0 = prefix, b = branch b
        c = branch.clamp(1, g - 1)[..., None]
        kcs, krs = starts.gather(2, c - 1).squeeze(2), starts.gather(2, c).squeeze(2)
        qb = branch[:, p]  # [Bm, Tq]
        hidden = qb >= 2
        hlo = torch.where(hidden, starts[:, p, 0], 0)
        hhi = torch.where(hidden, starts[:, p].gather(2, (qb - 1).clamp_min(0)[..., None]).squeeze(2), 0)
    else:
        kcs = krs = torch.zeros_like(t)[None]
        hlo = hhi = torch.zeros_like(p)[None]
    bm = kcs.shape[0]
    meta_k = torch.stack([dstart[None].expand(bm, tk), dend[None].expand(bm, tk), kcs, krs], dim=1)
    meta_q = torch.stack([dstart[p][None].expand(bm, tq), hlo, hhi], dim=1)
    return meta_q.to(torch.int32).contiguous(), meta_k.to(torch.int32).contiguous()
