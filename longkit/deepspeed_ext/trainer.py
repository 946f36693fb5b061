"""HF ``Trainer`` with Ulysses sequence parallelism from the DeepSpeed config's ``"longkit"`` section.

    from longkit.deepspeed_ext.trainer import SequenceParallelTrainer
    args = TrainingArguments(..., deepspeed="ds_config.json")   # holds "longkit": {"sequence_parallel": ...}
    trainer = SequenceParallelTrainer(model=model, args=args, train_dataset=ds, eval_dataset=eval_ds,
                                      data_collator=collate)
    trainer.train()                      # eval_strategy="steps"/"epoch" evaluates under SP too
    trainer.evaluate()["eval_loss"]      # equals the one-process Trainer's eval_loss on the same samples

What changes against ``Trainer``: the model's attention is switched to Ulysses (and activation offload installed
if the section's ``"activation_offload"`` asks for it); the training loader gives
every rank of a sequence-parallel group the same samples (distinct across groups) and yields this rank's
shard (labels shifted before sharding); the loss is the micro-batch's loss over the whole sequence. With
gradient accumulation the micro-batch losses are averaged (each already a token mean), like ``Trainer``
without ``num_items_in_batch``.

Evaluation (``evaluate``, ``eval_strategy`` during ``train``, ``predict``) is **loss only**. The eval set is
split across the groups in order (no shuffling) and every rank of a group gets the same batches as shards;
``eval_loss`` is ``Trainer``'s definition on one process: the mean of the batches' token-mean losses,
weighted by their number of samples, each sample counted once (see ``evaluation_loop``). Predictions /
logits (``prediction_loss_only=False``, ``compute_metrics``) raise ``NotImplementedError``: each rank
holds logits for its slice of the sequence only. ``evaluate()`` before ``train()`` needs ZeRO-3, as for any
DeepSpeed ``Trainer`` (transformers' rule for DeepSpeed inference); with ZeRO 0-2 evaluate during or after
training.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer
from transformers.trainer_pt_utils import find_batch_size

from ..errors import ConfigError
from .sequence_parallel import IGNORE_INDEX, SequenceParallel, ShardedLoader

__all__ = ["SequenceParallelTrainer"]

_REAL = "longkit_real_samples"  # key of an eval shard: its number of real (not filler) samples
_NO_PREDICTIONS = (
    "SequenceParallelTrainer evaluates the loss only: under sequence parallelism every rank holds the logits "
    "of its slice of the sequence, and gathering full [batch, seq, vocab] logits on every rank is the memory "
    "cost sequence parallelism exists to avoid. Use TrainingArguments(prediction_loss_only=True) (evaluate() "
    "without compute_metrics already does) and compute other metrics from the loss, or run predictions on a "
    "model without sequence parallelism.")


class _Tagged(Dataset):
    """``dataset`` read at positions ``p >= len(dataset)`` too (wrapping around), tagging each sample real or
    filler; ``len`` stays the real length (``Trainer`` reports it as the number of eval samples)."""

    def __init__(self, dataset: Any):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, p: int) -> tuple[Any, bool]:
        return self.dataset[p % self.n], p < self.n


class _TaggedCollate:
    """Collate real and filler samples; fillers get no labels, and the batch carries the real-sample count."""

    def __init__(self, collate_fn: Any):
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, bool]]) -> dict[str, Any]:
        batch = dict(self.collate_fn([sample for sample, _ in items]))
        real = [r for _, r in items]
        if not all(real) and batch.get("labels") is not None:
            labels = batch["labels"].clone()
            labels[~torch.tensor(real)] = IGNORE_INDEX
            batch["labels"] = labels
        batch[_REAL] = sum(real)
        return batch


def _local(tensors: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for ``Trainer.gather_function`` during evaluation: no per-step collective."""
    return tensors


class SequenceParallelTrainer(Trainer):
    """``transformers.Trainer`` that reads ``"longkit"`` from ``args.deepspeed`` (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        given = inspect.signature(Trainer.__init__).bind_partial(self, *args, **kwargs).arguments
        if given.get("compute_metrics") is not None and not getattr(given.get("args"), "prediction_loss_only",
                                                                    False):
            raise NotImplementedError(_NO_PREDICTIONS)  # fail now, not at the first evaluation hours later
        super().__init__(*args, **kwargs)
        ds = getattr(self.args, "hf_deepspeed_config", None)
        if ds is None:
            raise ConfigError("SequenceParallelTrainer needs TrainingArguments(deepspeed=<config with a "
                              '"longkit" section>)')
        self.sp = SequenceParallel.from_ds_config(ds.config)
        self.sp.prepare_model(self.model)
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: Trainer divides by GA steps
        self._eval_sums: torch.Tensor | None = None

    def _pad_token_id(self) -> int:
        return getattr(getattr(self, "processing_class", None), "pad_token_id", None) or 0

    def get_train_dataloader(self):  # noqa: ANN201
        """Same samples on every rank of a group (distinct across groups), yielded as this rank's shard."""
        if self.train_dataset is None:
            raise ValueError("SequenceParallelTrainer needs a train_dataset")
        return self.sp.dataloader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                                  collate_fn=self.data_collator, shuffle=True, seed=self.args.seed,
                                  pad_token_id=self._pad_token_id())

    # ------------------------------------------------------------------------------------------ evaluation
    def get_eval_dataloader(self, eval_dataset=None):  # noqa: ANN001, ANN201
        """Eval batches in dataset order, split across the groups; every rank of a group gets the same ones,
        yielded as its shard (see :meth:`_sp_eval_loader`)."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        return self._sp_eval_loader(eval_dataset if eval_dataset is not None else self.eval_dataset)

    def get_test_dataloader(self, test_dataset):  # noqa: ANN001, ANN201
        """As :meth:`get_eval_dataloader`, for ``predict`` (loss only)."""
        return self._sp_eval_loader(test_dataset)

    def _sp_eval_loader(self, dataset: Any) -> ShardedLoader:
        """Group ``g`` of ``G`` reads positions ``g, g + G, ...`` below ``ceil(n / G) * G`` (with one group:
        the dataset in order, like ``Trainer``'s ``SequentialSampler``). Positions past the end are fillers
        (samples from the start with labels -100, not counted): every group runs the same number of forwards,
        which ZeRO-3 needs (each forward gathers parameters from all ranks, so a group that stopped early
        would hang the others), while each real sample is counted exactly once."""
        dp_size, dp_rank = self.sp.data_parallel()
        positions = range(dp_rank, math.ceil(len(dataset) / dp_size) * dp_size, dp_size)
        loader = DataLoader(_Tagged(dataset), batch_size=self.args.eval_batch_size, sampler=positions,
                            collate_fn=_TaggedCollate(self.data_collator), drop_last=self.args.dataloader_drop_last,
                            num_workers=self.args.dataloader_num_workers)
        return ShardedLoader(loader, positions, self.sp, None, self._pad_token_id())

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,  # noqa: ANN001, ANN201
                        metric_key_prefix="eval"):
        """``Trainer.evaluation_loop`` with ``{prefix}_loss`` computed over the whole eval set.

        ``Trainer`` gathers every step's loss from all processes (``gather_for_metrics``), repeated
        ``eval_batch_size`` times, and averages; on one process the last, partial batch is cut to its real
        size, so ``eval_loss = sum_b n_b * loss_b / sum_b n_b``. Under sequence parallelism that gather would
        be wrong twice: every rank of a group returns the same loss (the group's, not a shard's), so it
        would count each batch once per rank; and the groups may hold different numbers of real samples.
        So here the per-step gather is disabled (no collective per step: only the model's in-group ones) and
        every rank accumulates ``[sum n_b * loss_b, sum n_b]`` over its batches' real samples. One all-reduce
        over all ranks at the end adds the groups; each group's ranks contribute identical sums, which
        multiplies numerator and denominator by the group size alike, so the ratio is exact and is the
        one-process value (with one group: the same batches in the same order).
        """
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        if not loss_only:  # same arguments on every rank: all raise, none waits in a collective
            raise NotImplementedError(_NO_PREDICTIONS)
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        gather = self.gather_function
        self.gather_function = _local
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.gather_function = gather
            sums, self._eval_sums = self._eval_sums, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        key = f"{metric_key_prefix}_loss"
        if sums[1] > 0:
            output.metrics[key] = (sums[0] / sums[1]).item()
        else:  # no labels anywhere: no loss (Trainer's own key would be a per-rank value)
            output.metrics.pop(key, None)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: ANN001, ANN201
        """The batch's loss over the whole sequence (identical on every rank of the group); loss only.

        Unlike ``Trainer.prediction_step`` this does not count label tokens across processes (a collective
        per step, and per-shard counts): the shard already carries the whole batch's ``num_items_in_batch``.
        """
        if not prediction_loss_only:
            raise NotImplementedError(_NO_PREDICTIONS)
        real = inputs.pop(_REAL, None)
        if not self.label_names or any(inputs.get(k) is None for k in self.label_names):
            return None, None, None  # no labels, no loss; the same on every rank of the group
        real = find_batch_size(inputs) if real is None else real
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs).detach()
        if self._eval_sums is not None and real:  # a batch of fillers only has loss 0/0: skip it
            self._eval_sums[0] += loss.to(self._eval_sums) * real
            self._eval_sums[1] += real
        return loss, None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        """The shard's forward; its ``loss`` is already the whole micro-batch's loss (the model's SP hook)."""
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
