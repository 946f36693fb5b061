"""The user-facing sequence-parallel context: model preparation, batch sharding, loss reduction, data loading.

Every rank of a sequence-parallel group gets the *same* full batch (token ids are small), shards it
itself with :meth:`SequenceParallel.shard_batch` and runs the model on its shard. Labels are shifted
*before* sharding (the last token of shard ``r`` predicts the first token of shard ``r + 1``), the
sequence is padded to a multiple of the group size, and the loss is normalised by the token count of the
whole batch, then summed over the group, so it equals the single-process loss exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import ActivationOffloadConfig
from ..errors import ConfigError
from .adapters import sp_adapter
from .config import SequenceParallelConfig
from .groups import SequenceParallelGroups

__all__ = ["SequenceParallel", "reduce_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_HOOKS_ATTR = "_longkit_sp_undo"
_OFFLOAD_ATTR = "_longkit_sp_offload"  # the offloader prepare_model installed (unprepare_model removes it)


class _GroupSum(torch.autograd.Function):
    """Sum over the group; the backward also sums, so every rank's graph gets the full upstream gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def reduce_loss(loss: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """Sum per-shard losses (each already divided by the whole batch's token count) over the group.

    The backward scales each rank's gradient by the group size; DeepSpeed then averages gradients over all
    ranks (it sees every rank as data-parallel), which divides that factor out: the gradients equal the
    single-process gradients of the batch (averaged over the sequence-parallel groups' batches as usual).
    """
    return _GroupSum.apply(loss, group)


class SequenceParallel:
    """Sequence parallelism for one process: its group, the model adapter and the batch/loss helpers.

    Build it with :func:`longkit.deepspeed_ext.initialize` (which also calls ``deepspeed.initialize``), or
    directly with ``SequenceParallel(SequenceParallelConfig(size=2))`` after ``torch.distributed`` is up.
    ``size == 1`` is a valid no-op configuration (same code path for single-GPU baselines).

    ``activation_offload`` (what the section's ``"activation_offload"`` key gives
    :meth:`from_ds_config`): when enabled, :meth:`prepare_model` also installs
    :class:`longkit.offload.ActivationOffloader` on the model (with any sequence-parallel size).
    """

    def __init__(self, config: SequenceParallelConfig, activation_offload: ActivationOffloadConfig | None = None):
        if not isinstance(config, SequenceParallelConfig):
            raise ConfigError(f"SequenceParallel takes a SequenceParallelConfig, got {type(config).__name__}; build "
                              "it with SequenceParallelConfig(size=..., mode=..., attention=...) or use "
                              "SequenceParallel.from_ds_config(ds_config)")
        if activation_offload is not None and not isinstance(activation_offload, ActivationOffloadConfig):
            raise ConfigError(f"SequenceParallel's activation_offload must be an ActivationOffloadConfig or None, got "
                              f"{type(activation_offload).__name__}")
        self.config = config
        self.activation_offload = activation_offload
        self.size = config.size
        if self.size > 1:
            self.groups: SequenceParallelGroups | None = SequenceParallelGroups(self.size)
            self.group = self.groups.group
            self.rank = self.groups.sp_rank
        else:
            self.groups, self.group, self.rank = None, None, 0

    @classmethod
    def from_ds_config(cls, config: dict[str, Any] | str) -> SequenceParallel:
        """Build from a DeepSpeed config's ``"longkit"`` section (``torch.distributed`` must be up: e.g. after
        ``Accelerator(...)`` or ``deepspeed.init_distributed()``)."""
        from .config import parse_ds_config

        section = parse_ds_config(config)
        return cls(section.sequence_parallel, section.activation_offload)

    # ------------------------------------------------------------------------------------------ model
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Install the mode's attention and the loss reduction on this model instance (no-op for size 1), and
        activation offload when ``activation_offload`` is enabled."""
        self._prepare_offload(model)
        if self.size == 1 or hasattr(model, _HOOKS_ATTR):
            return model
        undo = sp_adapter(self.config.mode).install(model, self.group, self.rank, self.size, self.config)
        undo["mode"] = self.config.mode
        undo["loss_hook"] = model.register_forward_hook(self._reduce_output_loss, with_kwargs=True)
        setattr(model, _HOOKS_ATTR, undo)
        return model

    def unprepare_model(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`prepare_model`."""
        undo = model.__dict__.pop(_HOOKS_ATTR, None)
        if undo is not None:
            undo["loss_hook"].remove()
            sp_adapter(undo["mode"]).uninstall(model, undo)
        offloader = model.__dict__.pop(_OFFLOAD_ATTR, None)
        if offloader is not None:
            offloader.remove()
        return model

    def _prepare_offload(self, model: nn.Module) -> None:
        cfg = self.activation_offload
        if cfg is None or not cfg.enabled:
            return
        from ..offload import ActivationOffloader, get_offloader

        current = get_offloader(model)
        if current is not None:
            if current.config == cfg:
                return  # prepared already (or installed by the user with the same options)
            raise ConfigError(f"the model already has activation offload with {current.config}, but the DeepSpeed "
                              f"config asks for {cfg}; remove one of them")
        setattr(model, _OFFLOAD_ATTR, ActivationOffloader(model, cfg))

    def _reduce_output_loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if loss is None:
            return output
        if kwargs.get("num_items_in_batch") is None:
            # A per-shard *mean* cannot be combined exactly (shards hold different numbers of labels).
            raise ValueError("under sequence parallelism compute the loss from SequenceParallel.shard_batch(...) "
                             "outputs (they carry num_items_in_batch for the whole batch)")
        output.loss = reduce_loss(loss, self.group)
        return output

    # ------------------------------------------------------------------------------------------ batches
    def shard_batch(self, batch: Mapping[str, Any], pad_token_id: int = 0) -> dict[str, Any]:
        """This rank's shard of a full batch (every rank of the group passes the same batch).

        Args:
            batch: ``input_ids [B, T]`` and optionally ``labels``, ``attention_mask``, ``position_ids``
                (``[B, T]``; packed documents restart their positions). Other ``[B, T]`` tensors are sharded
                too; anything else is passed through.
            pad_token_id: token used to pad ``T`` up to a multiple of the group size (never attended to by
                real tokens, never in the loss).

        Returns:
            A dict for ``model(**shard)``: ``input_ids``, ``position_ids`` (global positions), the other
            ``[B, T]`` tensors, and with labels: ``labels``/``shift_labels`` (already shifted; padding
            positions get -100, as a prediction made from a pad token is undefined) and
            ``num_items_in_batch`` (labelled tokens of the whole batch), plus ``use_cache=False``.
        """
        if "input_ids" not in batch:
            raise ConfigError("shard_batch needs input_ids [B, T] in the batch")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ConfigError(f"input_ids must be a [B, T] tensor, got {getattr(ids, 'shape', type(ids))}")
        B, T = ids.shape
        out: dict[str, Any] = {}
        seq: dict[str, torch.Tensor] = {"input_ids": ids}
        for k, v in batch.items():
            if k in ("input_ids", "labels", "shift_labels", "num_items_in_batch"):
                continue
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) in ((B, T), (1, T)):
                seq[k] = v.expand(B, *v.shape[1:]) if v.shape[0] == 1 else v
            else:
                out[k] = v
        if "position_ids" not in seq:
            seq["position_ids"] = torch.arange(T, device=ids.device).expand(B, T)
        labels = batch.get("labels")
        if labels is not None:
            if tuple(labels.shape) != (B, T):
                raise ConfigError(f"labels must have input_ids' shape {(B, T)}, got {tuple(labels.shape)}")
            # Shift before sharding: position t is scored on token t + 1, which may live on the next rank.
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            if "attention_mask" in seq:  # a padding position predicts nothing (its hidden state is not defined)
                shifted[seq["attention_mask"] == 0] = IGNORE_INDEX
            seq["shift_labels"] = shifted
            out["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
        pad = (-T) % self.size
        if pad:
            fill = {"input_ids": pad_token_id, "shift_labels": IGNORE_INDEX, "attention_mask": 0}
            for k, v in seq.items():
                if k == "position_ids":  # keep counting: padding continues the last document
                    ext = v[:, -1:] + torch.arange(1, pad + 1, device=v.device)
                else:
                    ext = torch.full((B, pad, *v.shape[2:]), fill.get(k, 0), dtype=v.dtype, device=v.device)
                seq[k] = torch.cat([v, ext], dim=1)
        chunk = (T + pad) // self.size
        lo, hi = self.rank * chunk, (self.rank + 1) * chunk
        for k, v in seq.items():
            out[k] = v[:, lo:hi].contiguous()  # HF loss code uses .view()
        if "shift_labels" in out:
            out["labels"] = out["shift_labels"]
        out.setdefault("use_cache", False)
        return out

    def data_parallel(self) -> tuple[int, int]:
        """``(number of sequence-parallel groups, index of this rank's group)``: the data-parallel view that
        samplers use (with size 1, every process is its own group)."""
        if self.groups is not None:
            return self.groups.dp_size, self.groups.dp_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def dataloader(self, dataset: Any, batch_size: int, collate_fn: Any = None, shuffle: bool = True,
                   seed: int = 0, drop_last: bool = True, device: torch.device | str | None = None,
                   pad_token_id: int = 0) -> ShardedLoader:
        """A loader that gives every rank of a group the same samples (distinct across groups), sharded.

        Iterating it yields :meth:`shard_batch` outputs moved to ``device``; call ``set_epoch`` per epoch.
        """
        from torch.utils.data import DataLoader, DistributedSampler

        dp_size, dp_rank = self.data_parallel()
        sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                            drop_last=drop_last)
        return ShardedLoader(loader, sampler, self, device, pad_token_id)


class ShardedLoader:
    """Iterable over sharded batches (see :meth:`SequenceParallel.dataloader`)."""

    def __init__(self, loader: Iterable, sampler: Any, sp: SequenceParallel, device: Any, pad_token_id: int):
        self.loader, self.sampler, self.sp, self.device, self.pad_token_id = loader, sampler, sp, device, pad_token_id

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:
        """The underlying loader's dataset (what ``Trainer`` reads to count samples)."""
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (same order on every rank of a group)."""
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            shard = self.sp.shard_batch(batch, self.pad_token_id)
            if self.device is not None:
                shard = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in shard.items()}
            yield shard
