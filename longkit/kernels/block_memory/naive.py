"""Block memory in plain PyTorch: representative keys, block scoring, top-k selection, gathering, and the
attention over sinks + retrieved blocks + local window (the CPU path and the tests' oracle).

Every function here is a batched tensor op with shapes fixed by its arguments: on a CUDA device the whole
selection (scores, ``torch.topk``, the gather) stays on the device, with no host read of a score or an index.

Positional rule of :func:`naive_memory_attention`, per batch row, query at position ``p`` (post-RoPE ``q``):

* **window**: keys at positions ``s`` with ``n_global <= s <= p`` and ``p - s < n_local``, scored ``q · k`` with
  both post-RoPE (their true distance);
* **sinks** (``s < n_global``, ``s <= p``): the true distance inside the window, else LM-Infinite's distance limit:
  ``q' · k'`` with ``q' = R(limit - p) q`` and ``k' = R(-s) k`` (the pair seen at distance ``limit``);
* **memory**: the retrieved blocks' keys as the memory stores them, scored ``R(distance - p) q · k_mem``: a key
  stored at position ``x`` is seen at distance ``distance - x`` (the memory cache stores each block as if it started
  at position 0, so a block's token ``o`` is seen at ``distance - o``);
* one softmax over the three branches.

Representative keys (:func:`received_attention`, :func:`block_representatives`): token ``j`` of a block receives,
from each of the ``band`` queries ``i = j .. j + band - 1`` (``band = block_size``), the weight it has in the
softmax of query ``i`` over the sinks and its last ``band`` non-sink keys (the sinks scored as in the attention,
the others at their true distances), summed over the query heads of the KV group; a block's representatives are
its ``r`` keys with the most received weight. Every token is scored by the same number of queries, each over the
same number of keys, so no position inside a block is favoured; the sinks absorb the attention a query gives no
token in particular, as they do in the model.
"""

from __future__ import annotations

import math

import torch

from ..rope.naive import naive_rope_rotate

__all__ = [
    "received_attention",
    "sink_scores",
    "block_representatives",
    "score_blocks",
    "select_blocks",
    "gather_blocks",
    "naive_memory_attention",
]


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, ...]`` -> ``[B, Hkv, G, ...]`` (the query heads of each KV head together)."""
    b, hq = q.shape[:2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of key/value heads {hkv}")
    return q.reshape(b, hkv, hq // hkv, *q.shape[2:])


def received_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *, band: int,
                       n_global: int, scale: float, sink_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Weight each key receives from the given queries' band softmaxes, summed over queries and grouped heads.

    Query ``i`` (position ``p_i``) takes a softmax over the sinks and the keys with ``n_global <= s <= p_i`` and
    ``p_i - s < band`` (true distances, post-RoPE ``q · k``); key ``j`` receives its weight in it. The sinks take
    part as in the real attention (they absorb the attention a query gives no particular token), but receive nothing.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries; q_pos: ``[B, Tq]`` their positions (``< 0`` = padding: no weight).
        k: ``[B, Hkv, Tk, D]`` post-RoPE keys covering every query's band; k_pos: ``[B, Tk]`` (``< 0`` = empty).
        band: keys per query softmax (the block size). n_global: sink count (sinks are not block tokens).
        scale: softmax scale.
        sink_logits: ``[B, Hkv, G, Tq, S]`` the queries' unscaled sink scores (:func:`sink_scores`), or ``None``.

    Returns:
        ``[B, Hkv, Tk]`` fp32.
    """
    qg = _grouped(q.float(), k.shape[1])  # [B, Hkv, G, Tq, D]
    sc = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, Tk]
    p = q_pos[:, None, None, :, None]
    s = k_pos[:, None, None, None, :]
    inside = (s >= n_global) & (s <= p) & (p - s < band) & (p >= n_global)
    sc = sc.masked_fill(~inside, float("-inf"))
    if sink_logits is not None and sink_logits.shape[-1]:
        sc = torch.cat([sc, sink_logits * scale], dim=-1)
    w = torch.softmax(sc, dim=-1).nan_to_num(0.0)[..., :k.shape[2]]
    return w.masked_fill(~inside, 0.0).sum(dim=(2, 3))


def sink_scores(q: torch.Tensor, q_pos: torch.Tensor, k_sink: torch.Tensor, sink_pos: torch.Tensor, *, n_local: int,
                limit: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unscaled scores of queries against the sinks under LM-Infinite's rule: ``[B, Hkv, G, Tq, S]`` fp32.

    True distance inside the window (``q · k``), else ``R(limit - p) q · R(-s) k`` (distance ``limit``); ``-inf``
    where the sink is empty or after the query.
    """
    hkv = k_sink.shape[1]
    qg = _grouped(q.float(), hkv)
    p = q_pos[:, None, None, :, None]
    s = sink_pos[:, None, None, None, :]
    q_lim = _grouped(naive_rope_rotate(q, limit - q_pos, inv_freq).float(), hkv)
    k_lim = naive_rope_rotate(k_sink, -sink_pos.clamp(min=0), inv_freq)
    sc = torch.where(p - s < n_local, _scores(qg, k_sink), _scores(q_lim, k_lim))
    return sc.masked_fill(~((s >= 0) & (s <= p)), float("-inf"))


def block_representatives(k_raw: torch.Tensor, received: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` keys of each block with the most received attention, in position order.

    Args:
        k_raw: ``[..., block_size, D]`` a block's keys (any rotation: they are only selected, not changed).
        received: ``[..., block_size]`` what :func:`received_attention` gave its tokens.
        r: representatives per block (``<= block_size``).

    Returns:
        ``[..., r, D]``.
    """
    top = received.topk(r, dim=-1).indices.sort(dim=-1).values
    return k_raw.gather(-2, top[..., None].expand(*top.shape, k_raw.shape[-1]))


def score_blocks(q_mem: torch.Tensor, repr_k: torch.Tensor, n_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Relevance of every block to a chunk: ``sum`` over the group's query heads of ``logsumexp`` over the block's
    representatives of ``scale · q_mem · k_repr``.

    Args:
        q_mem: ``[B, Hq, D]`` the chunk's mean memory-branch query (``R(distance - p) q``, averaged over its queries),
            so a block is scored at the distance its tokens would be attended at.
        repr_k: ``[B, Hkv, N, r, D]`` representative keys of ``N`` block slots, as stored in the memory.
        n_valid: ``[B]`` blocks ``0 .. n_valid - 1`` may be selected for each row; the others score ``-inf``.
        scale: softmax scale.

    Returns:
        ``[B, Hkv, N]`` fp32 scores (``-inf`` for blocks that may not be selected).
    """
    hkv, n = repr_k.shape[1], repr_k.shape[2]
    qg = _grouped(q_mem.float(), hkv)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhnrd->bhgnr", qg, repr_k.float()) * scale
    score = torch.logsumexp(logits, dim=-1).sum(dim=2)  # [B, Hkv, N]
    allowed = torch.arange(n, device=repr_k.device)[None, :] < n_valid.to(repr_k.device)[:, None]
    return score.masked_fill(~allowed[:, None, :], float("-inf"))


def select_blocks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` blocks per row and KV head, on the device (no host read).

    Args:
        scores: ``[B, Hkv, N]`` from :func:`score_blocks` (``N >= k``).
        k: blocks to select.

    Returns:
        ``(idx, valid)``, both ``[B, Hkv, k]``: block indices in increasing order (so the gathered memory is laid
        out in position order, a deterministic layout; of equal scores the lower block index is taken) and whether
        each is a real candidate (a row with fewer than ``k`` allowed blocks gets ``valid=False`` entries, pointing
        at block 0).
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select k={k} of {n} block slots")
    # A stable sort, not topk: equal scores (blocks of identical tokens have identical keys) go to the lower block
    # index, so a row selects the same blocks alone and in any batch (topk breaks ties by memory layout).
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :k], idx[..., :k]
    valid = vals > float("-inf")
    key = torch.where(valid, idx, idx + n)  # valid blocks first, each group in increasing block order
    order = key.argsort(dim=-1)
    idx, valid = idx.gather(-1, order), valid.gather(-1, order)
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def gather_blocks(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Copy the selected blocks into one contiguous buffer.

    Args:
        store: ``[B, Hkv, N, block_size, D]`` block keys or values.
        idx: ``[B, Hkv, k]`` block indices per row and KV head.

    Returns:
        ``[B, Hkv, k · block_size, D]``.
    """
    b, h = idx.shape[:2]
    bi = torch.arange(b, device=idx.device)[:, None, None]
    hi = torch.arange(h, device=idx.device)[None, :, None]
    out = store[bi, hi, idx]  # [B, Hkv, k, block_size, D]
    return out.reshape(b, h, -1, store.shape[-1])


def _scores(qg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, G, Tq, Tk]`` fp32 dot products of grouped queries with ``k [B, Hkv, Tk, D]``."""
    return torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2))


def naive_memory_attention(
    q: torch.Tensor, q_pos: torch.Tensor, *, k_win: torch.Tensor, v_win: torch.Tensor, win_pos: torch.Tensor,
    k_sink: torch.Tensor, v_sink: torch.Tensor, sink_pos: torch.Tensor, k_mem: torch.Tensor | None,
    v_mem: torch.Tensor | None, mem_valid: torch.Tensor | None, n_global: int, n_local: int, limit: int,
    distance: int, inv_freq: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:
    """Attention of one query chunk over sinks + retrieved memory + local window (rule in the module docstring).

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries at positions ``q_pos [B, Tq]`` (``< 0`` = padding).
        k_win, v_win: ``[B, Hkv, W, D]`` post-RoPE window candidates at ``win_pos [B, W]`` (``< 0`` = empty;
            positions below ``n_global`` are ignored here: sinks come from ``k_sink``).
        k_sink, v_sink: ``[B, Hkv, S, D]`` post-RoPE sink keys at ``sink_pos [B, S]`` (``< 0`` = empty).
        k_mem, v_mem: ``[B, Hkv, M, D]`` keys (as stored: see the module docstring) and values of the retrieved
            blocks, or ``None``.
        mem_valid: ``[B, Hkv, M]`` which memory tokens are real (``None`` = all).
        n_global, n_local, limit: LM-Infinite's sink count, window and distance limit.
        distance: the distance at which memory tokens are scored.
        inv_freq: ``[D/2]`` RoPE inverse frequencies. scale: default ``D ** -0.5``.

    Returns:
        ``[B, Hq, Tq, D]`` in ``q.dtype`` (queries that see no key get zeros).
    """
    b, hq, tq, d = q.shape
    hkv = k_win.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = _grouped(q.float(), hkv)  # [B, Hkv, G, Tq, D]
    p = q_pos[:, None, None, :, None]
    parts, values = [], []
    # window: true distance
    s = win_pos[:, None, None, None, :]
    local = (s >= n_global) & (s <= p) & (p - s < n_local)
    parts.append(_scores(qg, k_win).masked_fill(~local, float("-inf")))
    values.append(v_win)
    # sinks: true distance inside the window, the distance limit outside
    if k_sink.shape[2]:
        parts.append(sink_scores(q, q_pos, k_sink, sink_pos, n_local=n_local, limit=limit, inv_freq=inv_freq))
        values.append(v_sink)
    # memory: every retrieved token at `distance`
    if k_mem is not None and k_mem.shape[2]:
        q_mem = _grouped(naive_rope_rotate(q, distance - q_pos, inv_freq).float(), hkv)
        seen = (q_pos >= 0)[:, None, None, :, None]  # padding queries see nothing
        if mem_valid is not None:
            seen = seen & mem_valid[:, :, None, None, :]
        parts.append(_scores(q_mem, k_mem).masked_fill(~seen, float("-inf")))
        values.append(v_mem)
    sc = torch.cat(parts, dim=-1) * scale
    w = torch.softmax(sc, dim=-1).nan_to_num(0.0)
    out = torch.matmul(w, torch.cat(values, dim=2).float()[:, :, None])  # [B, Hkv, G, Tq, D]
    return out.reshape(b, hq, tq, v_win.shape[-1]).to(q.dtype)
