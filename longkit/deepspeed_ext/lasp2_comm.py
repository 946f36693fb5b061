"""LASP-2's communication: the per-layer exchange of chunk summaries and the short-convolution halo.

* :func:`prefix_state`: ONE all-gather per linear-attention layer in forward of every rank's chunk summary
  (a fixed-size tensor: its size does not depend on the sequence length), after which each rank combines
  the summaries of the ranks before it into its initial state. The backward is ONE reduce-scatter: each
  rank gets the sum, over the ranks after it, of the gradients with respect to its own summary.
* :func:`halo_from_previous`: the last ``kernel_size - 1`` columns of the previous rank's causal-convolution
  input (Gated DeltaNet layers convolve over time before the recurrence); point-to-point forward to the next
  rank, the gradient back to the previous one.

Every call records the bytes this rank hands to the collective in a :class:`CommStats` (per layer and phase),
so tests and users can check that the traffic per layer and step does not grow with the sequence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CommStats", "LASP2Comm", "prefix_state", "halo_from_previous"]


@dataclass
class CommStats:
    """Bytes this rank hands to LASP-2's collectives, summed per ``(layer, op, phase)`` (bounded memory: one
    entry per key, however long training runs).

    ``nbytes`` is the size of the buffer this rank contributes: the local summary for the forward all-gather,
    the gathered gradients (``world`` summaries) for the backward reduce-scatter, the halo for a send. Layer
    ``-1`` is the once-per-forward document-boundary check (a few integers per row).
    """

    totals: dict[tuple[int, str, str], list[int]] = field(default_factory=dict)  # key -> [calls, bytes]

    def record(self, layer: int, op: str, phase: str, nbytes: int) -> None:
        entry = self.totals.setdefault((layer, op, phase), [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)

    def reset(self) -> None:
        """Forget everything recorded (call once per step to read one step's traffic)."""
        self.totals.clear()

    def per_layer(self) -> dict[int, dict[str, int]]:
        """``{layer_idx: {"forward": bytes, "backward": bytes}}`` (layers >= 0 only)."""
        out: dict[int, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        for (layer, _, phase), (_, nbytes) in self.totals.items():
            if layer >= 0:
                out[layer][phase] += nbytes
        return dict(out)

    def calls(self) -> dict[tuple[int, str, str], int]:
        """How many times each ``(layer, op, phase)`` ran."""
        return {key: calls for key, (calls, _) in self.totals.items()}


@dataclass
class LASP2Comm:
    """This rank's place in the sequence-parallel group (rank ``r`` holds the ``r``-th chunk of the sequence)."""

    group: Any
    rank: int
    world: int
    stats: CommStats = field(default_factory=CommStats)


def _all_gather(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    # torch 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); older torch has only
    # the latter. Both take a flat output of world * x.numel() elements.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


class _PrefixState(torch.autograd.Function):
    """All-gather the per-rank summaries, combine the earlier ranks' ones into this rank's initial state.

    The combine runs inside the function (not as separate autograd ops) so that every rank, rank 0 included
    (whose initial state is zero and depends on nothing), runs the backward collective: a rank that skipped it
    would leave the others waiting.
    """

    @staticmethod
    def forward(ctx, summary: torch.Tensor, combine: Callable, comm: LASP2Comm,  # noqa: ANN001
                layer: int) -> torch.Tensor:
        flat = summary.detach().reshape(-1).contiguous()
        n = flat.numel()
        gathered = flat.new_empty(comm.world * n)
        _all_gather(gathered, flat, comm.group)
        comm.stats.record(layer, "all_gather", "forward", n * flat.element_size())
        gathered = gathered.view(comm.world, n)
        ctx.save_for_backward(gathered)
        ctx.combine, ctx.comm, ctx.layer, ctx.shape = combine, comm, layer, summary.shape
        return combine(gathered[: comm.rank])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        (gathered,) = ctx.saved_tensors
        comm = ctx.comm
        grads = torch.zeros_like(gathered)
        if comm.rank > 0 and grad is not None:
            # d(initial state)/d(earlier summaries): recompute the (tiny) combine with autograd on.
            with torch.enable_grad():
                prefix = gathered[: comm.rank].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(ctx.combine(prefix), prefix, grad)
            grads[: comm.rank] = g
        mine = grads.new_empty(gathered.shape[1])
        _reduce_scatter(mine, grads.reshape(-1), comm.group)  # rank j gets sum over ranks r > j of dL/dsummary_j
        comm.stats.record(ctx.layer, "reduce_scatter", "backward", grads.numel() * grads.element_size())
        return mine.view(ctx.shape), None, None, None


def prefix_state(summary: torch.Tensor, combine: Callable[[torch.Tensor], torch.Tensor], comm: LASP2Comm,
                 layer: int) -> torch.Tensor:
    """This rank's initial state from every rank's chunk summary (differentiable; collective: call on every rank).

    Args:
        summary: this rank's summary, any shape (fp32 recommended: it is what crosses the wire).
        combine: maps the earlier ranks' summaries ``[rank, summary.numel()]`` (rows in rank order) to the
            initial state; it must accept zero rows (rank 0) and be differentiable.
        comm: the group; ``comm.stats`` records the bytes.
        layer: the layer index recorded in ``comm.stats``.
    """
    return _PrefixState.apply(summary, combine, comm, layer)


def _p2p(ops: list[tuple[Callable, torch.Tensor, int]], group: Any) -> None:
    if not ops:
        return
    def peer_rank(r: int) -> int:  # P2P takes global ranks
        return r if group is None else dist.get_global_rank(group, r)

    reqs = dist.batch_isend_irecv([dist.P2POp(fn, t, peer_rank(peer), group=group) for fn, t, peer in ops])
    for r in reqs:
        r.wait()


class _HaloFromPrevious(torch.autograd.Function):
    """Send ``tail`` to the next rank, receive the previous rank's (zeros on rank 0); backward the reverse."""

    @staticmethod
    def forward(ctx, tail: torch.Tensor, comm: LASP2Comm, layer: int) -> torch.Tensor:  # noqa: ANN001
        tail = tail.detach().contiguous()
        got = torch.zeros_like(tail)
        ops = []
        if comm.rank + 1 < comm.world:
            ops.append((dist.isend, tail, comm.rank + 1))
            comm.stats.record(layer, "send_halo", "forward", tail.numel() * tail.element_size())
        if comm.rank > 0:
            ops.append((dist.irecv, got, comm.rank - 1))
        _p2p(ops, comm.group)
        ctx.comm, ctx.layer = comm, layer
        return got

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        comm = ctx.comm
        grad = grad.contiguous()
        got = torch.zeros_like(grad)
        ops = []
        if comm.rank > 0:
            ops.append((dist.isend, grad, comm.rank - 1))
            comm.stats.record(ctx.layer, "send_halo", "backward", grad.numel() * grad.element_size())
        if comm.rank + 1 < comm.world:
            ops.append((dist.irecv, got, comm.rank + 1))
        _p2p(ops, comm.group)
        return got, None, None


def halo_from_previous(tail: torch.Tensor, comm: LASP2Comm, layer: int) -> torch.Tensor:
    """The previous rank's ``tail`` (same shape; zeros on rank 0), differentiable (collective over neighbours).

    Args:
        tail: this rank's last columns that the next rank's causal convolution reads, e.g. ``[B, C, K - 1]``.
    """
    return _HaloFromPrevious.apply(tail, comm, layer)
