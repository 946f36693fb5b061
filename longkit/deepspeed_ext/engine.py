"""``longkit.deepspeed_ext.initialize``: ``deepspeed.initialize`` plus the ``"longkit"`` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from .._compat import require_host
from .._validate import check_int
from ..errors import ConfigError
from .config import SECTION, LongkitDSConfig, load_ds_config
from .sequence_parallel import SequenceParallel, ShardedLoader

__all__ = ["initialize", "LongkitEngine"]


class LongkitEngine(NamedTuple):
    """What :func:`initialize` returns: DeepSpeed's four values plus the sequence-parallel context."""

    engine: Any
    optimizer: Any
    training_dataloader: ShardedLoader | None
    lr_scheduler: Any
    sp: SequenceParallel


def initialize(model: nn.Module, config: dict[str, Any] | str | Path, *, model_parameters: Any = None,
               optimizer: Any = None, lr_scheduler: Any = None, training_data: Any = None,
               collate_fn: Any = None, pad_token_id: int = 0, **deepspeed_kwargs: Any) -> LongkitEngine:
    """Wire everything the ``"longkit"`` section asks for, then call ``deepspeed.initialize``.

    Steps: validate the section (clear errors on bad values); initialise ``torch.distributed`` through
    DeepSpeed if needed; build the sequence-parallel groups (DeepSpeed itself treats every rank as
    data-parallel: ZeRO shards and averages over all ranks, and the loss backward is scaled to make that
    exact); switch the HF model's attention to the mode's (Ulysses; LASP-2 for linear-attention layers); install
    activation offload if ``"activation_offload"`` asks for it (``longkit.offload.get_offloader(model).stats()``
    reports it); and, if ``training_data`` is given, build a loader that feeds every rank of a group the same
    samples and yields this rank's shard (labels shifted before sharding, sequence padded to the group size).

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Qwen3, Mistral families).
        config: DeepSpeed config (dict or JSON path) with an optional ``"longkit"`` section.
        model_parameters, optimizer, lr_scheduler, deepspeed_kwargs: passed to ``deepspeed.initialize``.
        training_data: optional map-style dataset; batches come from ``collate_fn`` and must hold
            ``input_ids`` (and usually ``labels``) as ``[B, T]`` tensors.

    Returns:
        :class:`LongkitEngine` ``(engine, optimizer, training_dataloader, lr_scheduler, sp)``. Train with
        ``loss = engine(**shard).loss`` (already the whole batch's loss on every rank of the group),
        ``engine.backward(loss)``, ``engine.step()``.
    """
    check_int("initialize", "pad_token_id", pad_token_id, min=0)
    require_host("deepspeed", "longkit.deepspeed_ext")
    import deepspeed
    import torch.distributed as dist

    ds_config = load_ds_config(config)
    section = LongkitDSConfig.from_dict(ds_config.get(SECTION))
    if "mpu" in deepspeed_kwargs:
        raise ValueError("longkit.deepspeed_ext.initialize builds the process groups itself; do not pass mpu")
    size = section.sequence_parallel.size
    if size > 1 and "train_batch_size" in ds_config:
        # DeepSpeed counts every rank as data-parallel, so its train_batch_size would be `size` times the
        # number of samples actually trained on.
        raise ConfigError("with longkit.sequence_parallel.size > 1 set train_micro_batch_size_per_gpu and "
                          "gradient_accumulation_steps instead of train_batch_size (samples per step = micro "
                          f"batch x accumulation steps x world_size / {size})")
    if not dist.is_initialized():
        deepspeed.init_distributed()
    sp = SequenceParallel(section.sequence_parallel, section.activation_offload)
    sp.prepare_model(model)
    engine, opt, _, sched = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=model_parameters, optimizer=optimizer,
        lr_scheduler=lr_scheduler, **deepspeed_kwargs)
    loader = None
    if training_data is not None:
        loader = sp.dataloader(training_data, batch_size=engine.train_micro_batch_size_per_gpu(),
                               collate_fn=collate_fn, device=engine.device, pad_token_id=pad_token_id)
    return LongkitEngine(engine, opt, loader, sched, sp)
