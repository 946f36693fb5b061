"""The mask of the whole (gathered) sequence under sequence parallelism, built once per forward.

After the first all-to-all every rank attends over the full sequence, so it needs the full sequence's
document boundaries. They follow from the position ids (a restart = a new packed document) and the
2-D padding mask (a pad/real switch = a new segment, so real tokens never see padding). Both are gathered
across the sequence-parallel group once per forward and reused by every layer (DeepSpeed's ALST gathers
the position ids in every layer).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.masks import AttentionMask, causal, documents

__all__ = ["SequenceLayout", "build_layout", "LayoutCache"]


@dataclass(frozen=True)
class SequenceLayout:
    """How to run attention over the gathered sequence ``[B, h, T, D]``.

    Attributes:
        mask: ``causal()`` for one plain row; otherwise ``documents(cu_seqlens)`` over the batch rows
            flattened into one packed row (the kernel's documents mask is single-row).
        flatten: whether ``[B, h, T, D]`` must be flattened to ``[1, h, B*T, D]`` for ``mask``.
    """

    mask: AttentionMask
    flatten: bool


def build_layout(position_ids: torch.Tensor, padding: torch.Tensor | None = None) -> SequenceLayout:
    """Layout of the full sequence from its position ids ``[B, T]`` and optional padding mask ``[B, T]``
    (1/True = real token). A segment starts at column 0, wherever the position does not continue the
    previous one (packed documents), and wherever padding starts or stops."""
    pos = position_ids.long()
    B, T = pos.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if padding is not None:
        pad = padding.bool()
        starts[:, 1:] |= pad[:, 1:] != pad[:, :-1]
    starts[:, 0] = True
    if B == 1 and int(starts.sum()) == 1:
        return SequenceLayout(causal(), flatten=False)
    flat = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([flat, flat.new_tensor([B * T])]).to(torch.int32).cpu()
    return SequenceLayout(documents(cu), flatten=True)


def _gather_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:  # noqa: ANN001
    """Concatenate ``[B, T/P]`` shards of the group along the sequence, in rank order."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class LayoutCache:
    """Gathers positions/padding and builds the layout once per forward (keyed on the position-ids tensor,
    which the model passes unchanged to every layer, also when gradient checkpointing recomputes one)."""

    def __init__(self, group, world: int):  # noqa: ANN001
        self.group, self.world = group, world
        self._key: tuple | None = None
        self._layout: SequenceLayout | None = None

    def get(self, position_ids: torch.Tensor, padding: torch.Tensor | None, batch: int) -> SequenceLayout:
        """The layout for this forward's local ``position_ids`` ``[B or 1, T/P]`` and padding ``[B, T/P]``."""
        key = self._key
        if (key is not None and key[0]() is position_ids
                and (key[1] is None if padding is None else (key[1] is not None and key[1]() is padding))):
            return self._layout
        pos = _gather_seq(position_ids.long().expand(batch, -1), self.group, self.world)
        pad = None if padding is None else _gather_seq(padding.to(torch.int8), self.group, self.world)
        self._layout = build_layout(pos, pad)
        self._key = (weakref.ref(position_ids), None if padding is None else weakref.ref(padding))
        return self._layout
