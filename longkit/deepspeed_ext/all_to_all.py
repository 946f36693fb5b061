"""Ulysses all-to-all: sequence shards <-> head shards, with GQA and uneven head counts.

Each rank holds ``[B, H, T/P, D]`` (its slice of the sequence, every head). Before attention one
all-to-all gives each rank ``[B, H_r, T, D]`` (the whole sequence, its heads); after attention a second one
swaps back. Design choices:

* **q, k and v travel in one all-to-all** (one collective instead of three: fewer launches and latencies).
* **Query heads are split as evenly as possible** (``H % P != 0`` is allowed: ranks differ by one head).
  Each rank receives the KV heads its query heads read; a KV head needed by several ranks (fewer KV heads
  than ranks, or a GQA group cut between ranks) is sent to each of them, and its gradient is summed back
  by autograd. Nothing else is repeated.
* The collective is a plain ``all_to_all_single`` with split sizes inside an autograd function whose
  backward is the reverse all-to-all, so it works on NCCL and gloo (CPU tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["HeadPlan", "all_to_all_flat", "seq_to_heads", "heads_to_seq"]


@dataclass(frozen=True)
class HeadPlan:
    """Which query and KV heads each of ``world`` ranks owns after the first all-to-all.

    Attributes:
        q_ranges: per rank ``(start, stop)`` of its query heads.
        kv_ranges: per rank ``(start, stop)`` of the KV heads those query heads read.
    """

    num_heads: int
    num_kv_heads: int
    world: int
    q_ranges: tuple[tuple[int, int], ...]
    kv_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, num_heads: int, num_kv_heads: int, world: int) -> HeadPlan:
        """Split ``num_heads`` query heads over ``world`` ranks (GQA groups of ``num_heads // num_kv_heads``)."""
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ConfigError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
        if num_heads < world:
            raise ConfigError(
                f"Ulysses needs at least one query head per rank: the model has {num_heads} attention heads but "
                f"the sequence-parallel size is {world}; use longkit.sequence_parallel.size <= {num_heads}")
        group = num_heads // num_kv_heads
        base, extra = divmod(num_heads, world)
        q_ranges, kv_ranges, start = [], [], 0
        for r in range(world):
            stop = start + base + (1 if r < extra else 0)
            q_ranges.append((start, stop))
            kv_ranges.append((start // group, (stop - 1) // group + 1))
            start = stop
        return cls(num_heads, num_kv_heads, world, tuple(q_ranges), tuple(kv_ranges))

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def local_kv_index(self, rank: int) -> torch.Tensor | None:
        """KV head (local index) read by each local query head, or ``None`` when the local heads form
        regular GQA groups (each local KV head serves the same number of consecutive query heads)."""
        (qa, qb), (ka, kb) = self.q_ranges[rank], self.kv_ranges[rank]
        idx = torch.tensor([h // self.group - ka for h in range(qa, qb)])
        counts = torch.bincount(idx, minlength=kb - ka)
        if bool((counts == counts[0]).all()):
            return None
        return idx


class _AllToAllFlat(torch.autograd.Function):
    """``all_to_all_single`` on a flat tensor with split sizes; backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:  # noqa: ANN001
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        out = grad.new_empty(sum(ctx.send))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all_flat(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:  # noqa: ANN001
    """Differentiable all-to-all of a 1-D tensor: ``send[r]`` elements go to rank ``r``, ``recv[r]`` come back."""
    return _AllToAllFlat.apply(x, send, recv, group)


def seq_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: HeadPlan, rank: int,
                 group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """``[B, H, T/P, D]`` sequence shards -> ``[B, H_rank, T, D]`` head shards of the whole sequence.

    All ranks must hold the same local length ``T/P`` (pad the sequence to a multiple of ``P``).
    Returns local ``(q, k, v)``; k/v carry the KV heads ``plan.kv_ranges[rank]``. ``v`` may have another head dim
    than ``q`` and ``k`` (multi-head latent attention).
    """
    B, _, t_local, D = q.shape
    Dv = v.shape[-1]
    unit, unit_v = B * t_local * D, B * t_local * Dv
    pieces, send = [], []
    for (qa, qb), (ka, kb) in zip(plan.q_ranges, plan.kv_ranges):
        pieces += [q[:, qa:qb].reshape(-1), k[:, ka:kb].reshape(-1), v[:, ka:kb].reshape(-1)]
        send.append(unit * ((qb - qa) + (kb - ka)) + unit_v * (kb - ka))
    (qa, qb), (ka, kb) = plan.q_ranges[rank], plan.kv_ranges[rank]
    nq, nkv = qb - qa, kb - ka
    recv = [unit * (nq + nkv) + unit_v * nkv] * plan.world
    out = all_to_all_flat(torch.cat(pieces), send, recv, group)
    # out = [source 0: q | k | v][source 1: q | k | v]...; source s holds sequence chunk s.
    per_src = out.view(plan.world, -1)
    q_full = per_src[:, : unit * nq].reshape(plan.world, B, nq, t_local, D)
    k_full = per_src[:, unit * nq: unit * (nq + nkv)].reshape(plan.world, B, nkv, t_local, D)
    v_full = per_src[:, unit * (nq + nkv):].reshape(plan.world, B, nkv, t_local, Dv)

    def _join(x: torch.Tensor) -> torch.Tensor:  # [P, B, h, T/P, d] -> [B, h, T, d]
        return x.permute(1, 2, 0, 3, 4).reshape(B, x.shape[2], plan.world * t_local, x.shape[-1])

    return _join(q_full), _join(k_full), _join(v_full)


def heads_to_seq(out: torch.Tensor, plan: HeadPlan, rank: int, group) -> torch.Tensor:  # noqa: ANN001
    """``[B, H_rank, T, D]`` head shards -> ``[B, H, T/P, D]`` this rank's sequence shard, every head."""
    B, nq, T, D = out.shape
    t_local = T // plan.world
    # Send chunk s of the sequence to rank s: [P, B, h, T/P, D] flattened per destination.
    chunks = out.view(B, nq, plan.world, t_local, D).permute(2, 0, 1, 3, 4).reshape(-1)
    unit = B * t_local * D
    send = [unit * nq] * plan.world
    recv = [unit * (qb - qa) for qa, qb in plan.q_ranges]
    got = all_to_all_flat(chunks, send, recv, group)
    parts = torch.split(got, recv)
    heads = [p.view(B, qb - qa, t_local, D) for p, (qa, qb) in zip(parts, plan.q_ranges)]
    return torch.cat(heads, dim=1)
