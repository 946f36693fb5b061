"""HF ``Trainer`` with Ulysses sequence parallelism from the DeepSpeed config's ``"longkit"`` section.

    from longkit.deepspeed_ext.trainer import SequenceParallelTrainer
    args = TrainingArguments(..., deepspeed="ds_config.json")   # holds "longkit": {"sequence_parallel": ...}
    SequenceParallelTrainer(model=model, args=args, train_dataset=ds, data_collator=collate).train()

What changes against ``Trainer``: the model's attention is switched to Ulysses; the training loader gives
every rank of a sequence-parallel group the same samples (distinct across groups) and yields this rank's
shard (labels shifted before sharding); the loss is the micro-batch's loss over the whole sequence. With
gradient accumulation the micro-batch losses are averaged (each already a token mean), like ``Trainer``
without ``num_items_in_batch``.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..errors import ConfigError
from .sequence_parallel import SequenceParallel

__all__ = ["SequenceParallelTrainer"]


class SequenceParallelTrainer(Trainer):
    """``transformers.Trainer`` that reads ``"longkit"`` from ``args.deepspeed`` (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        ds = getattr(self.args, "hf_deepspeed_config", None)
        if ds is None:
            raise ConfigError("SequenceParallelTrainer needs TrainingArguments(deepspeed=<config with a "
                              '"longkit" section>)')
        self.sp = SequenceParallel.from_ds_config(ds.config)
        self.sp.prepare_model(self.model)
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: Trainer divides by GA steps

    def get_train_dataloader(self):  # noqa: ANN201
        """Same samples on every rank of a group (distinct across groups), yielded as this rank's shard."""
        if self.train_dataset is None:
            raise ValueError("SequenceParallelTrainer needs a train_dataset")
        pad = getattr(getattr(self, "processing_class", None), "pad_token_id", None) or 0
        return self.sp.dataloader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                  collate_fn=self.data_collator, shuffle=True, seed=self.args.seed,
                                  pad_token_id=pad)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        """The shard's forward; its ``loss`` is already the whole micro-batch's loss (the model's SP hook)."""
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
