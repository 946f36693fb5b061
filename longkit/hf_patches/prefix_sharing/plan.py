"""Which rows of a batch share a prefix, and the packed layout that computes each shared prefix once.

Rows are compared as sequences of (token, position) pairs over their non-padding columns (padding never counts
as shared). A *group* is a set of rows identical on their first ``P`` columns; it becomes one document::

    prefix (the group's valid tokens in columns [0, P)) + branch_1 + ... + branch_G

where branch ``r`` holds row ``r``'s valid tokens from column ``P`` on. Every token keeps its own position id,
so a branch continues from the prefix end exactly as in its own row. The attention mask is
``documents(cu_seqlens) & shared_prefix(branch starts)``: a branch query sees the prefix and its own branch. A
causal model then gives every token of every row the hidden state it has in the unpacked batch (the prefix's
hidden states depend on the prefix alone); :meth:`PackedLayout.scatter` puts them back into the ``[N, L]``
layout (padding positions get zeros), and its backward adds the branches' gradients into the shared prefix.

Grouping maximises the tokens saved, ``sum (|group| - 1) * shared tokens``, over groups that are contiguous
in the rows' lexicographic order (a prefix tree's one-level cut, found by dynamic programming): a short prefix
shared by every row (a chat template's system prompt) does not swallow the long prompt a DPO pair or a GRPO
group shares.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...kernels.masks import AttentionMask, documents, shared_prefix

__all__ = ["PackedLayout", "common_prefix_lengths", "choose_groups", "plan_shared_prefix"]

# elements of the [rows, N, L] comparison done at once (bounds the temporary memory to ~64 MiB of bools)
_COMPARE_CHUNK = 1 << 26


@dataclass(frozen=True)
class PackedLayout:
    """The packed forward's inputs and the map back to the caller's rows.

    Attributes:
        input_ids: ``[R, T]`` packed tokens (``R = 1`` when packing, else one row per group).
        position_ids: ``[R, T]`` each token's position in its original row.
        mask: the attention rule of the packed rows.
        index: ``[N, L]`` for every original (row, column) its flat index into the ``R * T`` packed tokens,
            ``R * T`` (a zero row) for padding.
        groups: the rows of each group (a row alone is a group of one).
        tokens: valid tokens of the original batch; ``packed_tokens``: tokens the packed rows compute.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: AttentionMask
    index: torch.Tensor
    groups: tuple[tuple[int, ...], ...]
    tokens: int
    packed_tokens: int

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """``[R, T, ...]`` per packed token -> ``[N, L, ...]`` per original token (zeros at padding)."""
        flat = packed.reshape(-1, *packed.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return flat.index_select(0, self.index.reshape(-1)).view(*self.index.shape, *packed.shape[2:])


def _row_keys(input_ids: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """``[N, L, 1 or 2]`` what must match for two rows to share a column: the token (-1 at padding) and, when the
    caller passed them, the position id."""
    tok = torch.where(valid, input_ids, torch.full_like(input_ids, -1))
    if position_ids is None:
        return tok[..., None]
    return torch.stack([tok, position_ids.expand_as(tok).to(tok.dtype)], dim=-1)


def common_prefix_lengths(keys: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` int64: the number of leading columns on which rows ``i`` and ``j`` of ``keys [N, L, K]`` agree."""
    n, length = keys.shape[:2]
    step = max(1, _COMPARE_CHUNK // max(1, n * length * keys.shape[2]))
    out = []
    for i in range(0, n, step):
        differ = (keys[i:i + step, None] != keys[None]).any(-1)  # [step, N, L]
        first = differ.to(torch.uint8).argmax(-1)  # the first differing column (argmax returns the first max)
        out.append(torch.where(differ.any(-1), first, torch.full_like(first, length)))
    return torch.cat(out)


def _lexicographic(lcp: list[list[int]], next_key: list[list[tuple]], length: int) -> list[int]:
    """Row indices in lexicographic order of their keys (compared at the first differing column)."""
    def cmp(i: int, j: int) -> int:
        d = lcp[i][j]
        if d >= length:
            return (i > j) - (i < j)
        a, b = next_key[i][j], next_key[j][i]
        return (a > b) - (a < b)
    return sorted(range(len(lcp)), key=functools.cmp_to_key(cmp))


def choose_groups(order: list[int], adjacent_cols: list[int], adjacent_shared: list[int],
                  min_shared: int) -> list[tuple[list[int], int, int]]:
    """Partition ``order`` (rows sorted lexicographically) into contiguous groups that maximise saved tokens.

    Args:
        order: row indices in lexicographic order.
        adjacent_cols / adjacent_shared: for each neighbouring pair in ``order``, the common prefix in columns and
            in valid (non-padding) tokens.
        min_shared: a group of two or more rows must share at least this many valid tokens.

    Returns:
        ``(rows, P, shared)`` per group: its rows (in the caller's row order), the shared columns ``P`` (``None``
        for a row alone) and the valid tokens in them.
    """
    n = len(order)
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        best[k], cut[k] = best[k - 1], k - 1  # row order[k-1] alone
        low = None  # smallest shared count over the pairs of order[j .. k-1]
        for j in range(k - 2, -1, -1):
            low = adjacent_shared[j] if low is None else min(low, adjacent_shared[j])
            if low < min_shared:
                break
            gain = best[j] + (k - j - 1) * low
            if gain > best[k]:
                best[k], cut[k] = gain, j
    groups = []
    k = n
    while k > 0:
        j = cut[k]
        rows = order[j:k]
        if len(rows) == 1:
            groups.append((rows, None, None))
        else:
            m = min(range(j, k - 1), key=lambda t: (adjacent_shared[t], adjacent_cols[t]))
            groups.append((sorted(rows), adjacent_cols[m], adjacent_shared[m]))
        k = j
    return sorted(groups, key=lambda g: g[0][0])


def plan_shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, min_shared: int, pack: bool) -> PackedLayout | None:
    """The packed layout for a ``[N, L]`` batch, or ``None`` when no two rows share ``min_shared`` tokens.

    ``attention_mask`` is the 2-D padding mask (``None``: no padding); ``position_ids`` (``None``: column index, as
    transformers uses without a cache) is compared too, so rows only share a prefix that sits at the same
    positions. One host sync (a few ``[N, N]`` tables); everything per token stays on the device.
    """
    n, length = input_ids.shape
    dev = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if position_ids is not None and position_ids.shape[-1] != length:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(input_ids.shape)}")
    keys = _row_keys(input_ids, valid, position_ids)
    lcp = common_prefix_lengths(keys)  # [N, N]
    counts = torch.nn.functional.pad(valid.long().cumsum(1), (1, 0))  # [N, L + 1]: valid tokens before column c
    shared = counts.gather(1, lcp)  # [N, N]: valid tokens in the common prefix
    at = lcp.clamp_max(length - 1)
    next_key = keys[torch.arange(n, device=dev)[:, None], at]  # [N, N, K]: row i's key at the first mismatch
    lcp_h, shared_h, next_h, total_h = (lcp.tolist(), shared.tolist(), next_key.tolist(),
                                        counts[:, -1].tolist())  # the host sync
    order = _lexicographic(lcp_h, [[tuple(x) for x in row] for row in next_h], length)
    adj_cols = [lcp_h[a][b] for a, b in zip(order, order[1:])]
    adj_shared = [shared_h[a][b] for a, b in zip(order, order[1:])]
    groups = choose_groups(order, adj_cols, adj_shared, min_shared)
    if all(len(rows) == 1 for rows, _, _ in groups):
        return None

    # per group: shared columns P, prefix tokens, branch starts (relative to the document), document length
    cols, plen, bstart, doc_len, starts = [0] * n, [0] * n, [0] * n, [], []
    for rows, p, sh in groups:
        if p is None:  # a row alone: all of it is "prefix", no branch
            p, sh = length, total_h[rows[0]]
        s, pos = [], sh
        for r in rows:
            cols[r], plen[r], bstart[r] = p, sh, pos
            s.append(pos)
            pos += total_h[r] - sh
        doc_len.append(pos)
        starts.append(s if len(rows) > 1 else [])
    g_max = max(2, max(len(s) for s in starts))
    segs = [s + [d] * (g_max - len(s)) for s, d in zip(starts, doc_len)]
    if pack:
        offsets = [0]
        for d in doc_len:
            offsets.append(offsets[-1] + d)
        rows_out, width = 1, max(1, offsets[-1])
        doc_off = offsets[:-1]
    else:
        rows_out, width = len(groups), max(1, max(doc_len))
        doc_off = [g * width for g in range(len(groups))]
    group_of = [0] * n
    for g, (rows, _, _) in enumerate(groups):
        for r in rows:
            group_of[r] = g
    tens = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)[:, None]  # noqa: E731
    cum = counts[:, 1:] - 1  # rank of each valid column among its row's valid columns
    col = torch.arange(length, device=dev)[None]
    index = tens([doc_off[g] for g in group_of]) + torch.where(
        col < tens(cols), cum, tens(bstart) + cum - tens(plen))
    size = rows_out * width
    index = torch.where(valid, index, torch.full_like(index, size))
    pos = (position_ids.expand_as(input_ids) if position_ids is not None else col.expand_as(input_ids))
    flat_ids = input_ids.new_zeros(size + 1)
    flat_pos = input_ids.new_zeros(size + 1)
    flat_ids[index] = input_ids  # prefix columns are written once per member, with the same values
    flat_pos[index] = pos.to(flat_pos.dtype)
    seg_t = torch.tensor(segs, dtype=torch.int32, device=dev)
    if pack:
        mask = documents(torch.tensor(offsets, dtype=torch.int32, device=dev)) & shared_prefix(seg_t)
    else:
        mask = shared_prefix(seg_t)
    return PackedLayout(
        input_ids=flat_ids[:size].view(rows_out, width), position_ids=flat_pos[:size].view(rows_out, width),
        mask=mask, index=index, groups=tuple(tuple(rows) for rows, _, _ in groups),
        tokens=sum(total_h), packed_tokens=sum(doc_len))
