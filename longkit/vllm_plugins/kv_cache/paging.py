"""Addressing packed records in vLLM's paged KV cache (plain PyTorch, no vLLM import).

vLLM gives each layer a cache view ``[num_blocks, Hkv, block_size, C]`` (``C`` elements of the cache dtype); the
packed backend reads it as bytes ``[num_blocks, Hkv, block_size, slot_bytes]``, one record per (block slot, KV
head) in the first ``record_bytes`` bytes. Token ``t`` of a sequence lives in block ``block_table[t //
block_size]`` at offset ``t % block_size``; vLLM's ``slot_mapping`` gives ``block * block_size + offset`` for the
tokens written in a step.

:func:`block_plan` lists the blocks a step reads (each once, also when sequences share a prefix block) and remaps
the block table onto a compact scratch cache of just those blocks, so the stock CPU kernel can run on dequantized
pages. :func:`batch_index` gives per-token gather indices of each sequence's *context* (its tokens already in the
cache), for the sequence-by-sequence reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchIndex", "BlockPlan", "batch_index", "block_plan", "gather_records", "scatter_records"]


@dataclass
class BatchIndex:
    """Indices of one attention step over ``R`` sequences (``N`` new tokens, ``C`` context tokens in total).

    Attributes:
        q_lens, ctx_lens: int64 ``[R]``: new tokens of this step and tokens already in the cache, per sequence
            (``seq_len = ctx_len + q_len``).
        ctx_starts: int64 ``[R]``: where each sequence's context starts in the flattened ``[C]`` order.
        ctx_block, ctx_offset: int64 ``[C]``: physical block and offset of every context token (sequence by
            sequence, position by position).
        scratch_block_table: int32 ``[R, max_blocks]``: each sequence's scratch blocks, in order.
        num_scratch_blocks: scratch blocks in total (``sum(ceil(seq_len / block_size))``).
        ctx_scratch_slot: int64 ``[C]``: scratch slot of every context token.
        new_scratch_slot: int64 ``[N]``: scratch slot of every new token (in the step's token order).
    """

    q_lens: torch.Tensor
    ctx_lens: torch.Tensor
    ctx_starts: torch.Tensor
    ctx_block: torch.Tensor
    ctx_offset: torch.Tensor
    scratch_block_table: torch.Tensor
    num_scratch_blocks: int
    ctx_scratch_slot: torch.Tensor
    new_scratch_slot: torch.Tensor


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    if x.numel() > 1:
        torch.cumsum(x[:-1], 0, out=out[1:])
    return out


def batch_index(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                block_size: int) -> BatchIndex:
    """Gather indices and scratch addresses for one step (see :class:`BatchIndex`).

    Args:
        query_start_loc: int ``[R + 1]``: new tokens of sequence ``r`` are ``[query_start_loc[r],
            query_start_loc[r + 1])`` of the step.
        seq_lens: int ``[R]``: tokens of each sequence including this step's.
        block_table: int ``[R, >= ceil(max seq_len / block_size)]``: physical blocks per sequence.
        block_size: tokens per block of the layer's cache view.
    """
    dev = seq_lens.device
    qsl = query_start_loc.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    R = seq.numel()
    q_lens = qsl[1:R + 1] - qsl[:R]
    ctx_lens = seq - q_lens
    if bool((ctx_lens < 0).any()):
        raise ValueError(f"attention metadata: a sequence has fewer tokens ({seq.tolist()}) than new tokens "
                         f"({q_lens.tolist()})")
    rows = torch.arange(R, device=dev)
    ctx_starts = _exclusive_cumsum(ctx_lens)
    C = int(ctx_lens.sum())
    ctx_row = torch.repeat_interleave(rows, ctx_lens, output_size=C)
    ctx_pos = torch.arange(C, device=dev) - ctx_starts[ctx_row]
    bt = block_table.to(torch.int64)
    ctx_block = bt[ctx_row, ctx_pos // block_size]
    ctx_offset = ctx_pos % block_size

    n_blocks = (seq + block_size - 1) // block_size
    scratch_start = _exclusive_cumsum(n_blocks)
    total = int(n_blocks.sum())
    width = max(int(n_blocks.max()) if R else 0, 1)
    cols = torch.arange(width, device=dev)
    # Entries past a sequence's last block are never read (the kernel stops at seq_len); keep them in range.
    sbt = (scratch_start[:, None] + cols[None, :]).clamp(max=max(total - 1, 0)).to(torch.int32)
    ctx_scratch = (scratch_start[ctx_row] + ctx_pos // block_size) * block_size + ctx_pos % block_size

    N = int(q_lens.sum())
    new_row = torch.repeat_interleave(rows, q_lens, output_size=N)
    new_pos = ctx_lens[new_row] + torch.arange(N, device=dev) - qsl[new_row]
    new_scratch = (scratch_start[new_row] + new_pos // block_size) * block_size + new_pos % block_size
    return BatchIndex(q_lens, ctx_lens, ctx_starts, ctx_block, ctx_offset, sbt, total, ctx_scratch, new_scratch)


def gather_records(pages: torch.Tensor, block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Records of the given slots: ``pages [num_blocks, Hkv, block_size, record_bytes]`` (uint8) ->
    ``[len(block), Hkv, record_bytes]`` (a copy)."""
    return pages[block, :, offset]


def scatter_records(pages: torch.Tensor, slot_mapping: torch.Tensor, records: torch.Tensor) -> int:
    """Write ``records [N, Hkv, record_bytes]`` to the slots ``slot_mapping [N]`` (``block * block_size +
    offset``) of ``pages [num_blocks, Hkv, block_size, record_bytes]``; negative slots (padding tokens) are
    skipped. Returns the number of records written."""
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, records = slots[keep], records[keep]
    bs = pages.shape[2]
    pages[slots // bs, :, slots % bs] = records
    return int(slots.numel())


@dataclass
class BlockPlan:
    """The blocks one attention step reads, and where they go in a compact scratch cache.

    Attributes:
        blocks: int64 ``[U]``: distinct physical blocks holding the step's sequences (context and new tokens),
            sorted; scratch block ``u`` is a copy of physical block ``blocks[u]``.
        scratch_block_table: int32 ``[R, W]``: the block table in scratch block numbers (entries past a sequence's
            last block are 0 and never read).
        new_scratch_slot: int64 ``[N]``: scratch slot of every new token of the step (in the step's token order).
    """

    blocks: torch.Tensor
    scratch_block_table: torch.Tensor
    new_scratch_slot: torch.Tensor


def block_plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
               block_size: int) -> BlockPlan:
    """The :class:`BlockPlan` of one step (arguments as :func:`batch_index`)."""
    dev = seq_lens.device
    qsl = query_start_loc.to(torch.int64)
    seq = seq_lens.to(torch.int64)
    R = seq.numel()
    q_lens = qsl[1:R + 1] - qsl[:R]
    n_blocks = (seq + block_size - 1) // block_size
    width = max(int(n_blocks.max()) if R else 0, 1)
    used = torch.arange(width, device=dev)[None, :] < n_blocks[:, None]
    blocks, inverse = torch.unique(block_table[:, :width].to(torch.int64)[used], sorted=True, return_inverse=True)
    sbt = torch.zeros(R, width, dtype=torch.int32, device=dev)
    sbt[used] = inverse.to(torch.int32)
    N = int(q_lens.sum())
    new_row = torch.repeat_interleave(torch.arange(R, device=dev), q_lens, output_size=N)
    new_pos = (seq - q_lens)[new_row] + torch.arange(N, device=dev) - qsl[new_row]
    new_slot = sbt[new_row, new_pos // block_size].to(torch.int64) * block_size + new_pos % block_size
    return BlockPlan(blocks, sbt, new_slot)
