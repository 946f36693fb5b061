"""Sequence-parallel process groups.

Ranks ``[g * sp, (g + 1) * sp)`` form sequence-parallel group ``g`` (consecutive ranks keep the all-to-all
on one node's fast links). DeepSpeed itself is *not* told about these groups (no ``mpu``): ZeRO shards and
averages gradients over all ranks, as in plain data parallelism, and
:func:`~longkit.deepspeed_ext.sequence_parallel.reduce_loss` scales each rank's backward by the group
size so that this average is exactly the gradient of the batch. (DeepSpeed 0.19.8's own sequence-parallel
averaging divides by ``world / sp`` in ZeRO 0-2 but by ``world`` in ZeRO-3's default reduce-scatter path,
so no single loss scaling is exact for every stage when an ``mpu`` is passed.)
"""

from __future__ import annotations

import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["SequenceParallelGroups"]


class SequenceParallelGroups:
    """This rank's sequence-parallel group for a group size ``sp_size`` (collective: call on every rank)."""

    def __init__(self, sp_size: int):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun/deepspeed and call "
                               "deepspeed.init_distributed() (longkit.deepspeed_ext.initialize does it for you)")
        world = dist.get_world_size()
        if sp_size < 1 or world % sp_size != 0:
            raise ConfigError(f"longkit.sequence_parallel.size={sp_size} must divide the world size {world} "
                              f"(launch a multiple of {sp_size} processes, or change the size)")
        rank = dist.get_rank()
        self.sp_size, self.world_size = sp_size, world
        self.group = None
        self.ranks: list[int] = []
        for g in range(world // sp_size):  # new_group is collective: same order on every rank
            ranks = list(range(g * sp_size, (g + 1) * sp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.group, self.ranks = group, ranks

    @property
    def sp_rank(self) -> int:
        """This rank's index inside its sequence-parallel group (= which sequence shard it holds)."""
        return dist.get_rank() - self.ranks[0]

    @property
    def dp_size(self) -> int:
        """Number of sequence-parallel groups (= distinct batches per step)."""
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        """Index of this rank's sequence-parallel group."""
        return dist.get_rank() // self.sp_size
