"""TRL trainers whose policy and reference forwards compute each shared prompt once.

``PrefixSharingDPOTrainer`` / ``PrefixSharingGRPOTrainer`` / ``PrefixSharingRLOOTrainer`` are TRL's own trainers
with one extra keyword, ``prefix_sharing`` (``True``, a dict or a :class:`PrefixSharingConfig`). Nothing in TRL's
batches, losses or metrics changes: the patch sits under TRL's fused LM head, in the backbone (see
:mod:`.patch`), and hands back hidden states in TRL's own ``[rows, length]`` layout. It is installed on

* the policy before TRL's ``__init__`` runs when the policy is passed as a model (after it, when TRL loads it
  from a name), so PEFT wraps an already patched model and an adapter-disabled reference pass shares too;
* the reference model TRL loads or is given, before TRL precomputes reference log-probs
  (``precompute_ref_log_probs``) and after ``__init__`` otherwise.

Which rows share: DPO's chosen and rejected rows of one pair share the prompt; GRPO/RLOO rows of one prompt share
it when they are in the same forward (TRL shuffles a generation batch before cutting it into micro-batches: with
``steps_per_generation=1`` every completion of a prompt is in one forward).
"""

from __future__ import annotations

from typing import Any

import trl
from torch import nn

from ..._compat import require_host
from ...config import PrefixSharingConfig

__all__ = ["PrefixSharingDPOTrainer", "PrefixSharingGRPOTrainer", "PrefixSharingRLOOTrainer", "patch_model",
           "packed_lengths"]


def _as_config(value: Any) -> PrefixSharingConfig | None:  # noqa: ANN401
    """``prefix_sharing=`` as a config (``None`` for ``False``/``None``), read as ``apply_patches`` reads it."""
    from .. import _as_config as as_technique_config

    return None if value is None or value is False else as_technique_config("prefix_sharing", value)


def _unwrap(model: Any) -> Any:  # noqa: ANN401
    """The transformers model inside PEFT / DeepSpeed / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def patch_model(model: Any, cfg: PrefixSharingConfig) -> Any:  # noqa: ANN401
    """``apply_patches(model, prefix_sharing=cfg)`` on the transformers model inside any wrapper (idempotent)."""
    import longkit

    if model is None or isinstance(model, str):
        return model
    longkit.apply_patches(_unwrap(model), prefix_sharing=cfg)
    return model


class _PrefixSharingMixin:
    """Patches the policy and the reference model of a TRL trainer (see the module docstring)."""

    def __init__(self, *args: Any, prefix_sharing: Any = True, **kwargs: Any) -> None:  # noqa: ANN401
        require_host("trl", type(self).__name__)
        self._prefix_sharing = _as_config(prefix_sharing)
        if self._prefix_sharing is not None:
            model = kwargs.get("model", args[0] if args else None)
            patch_model(model, self._prefix_sharing)
            patch_model(kwargs.get("ref_model"), self._prefix_sharing)
        super().__init__(*args, **kwargs)
        if self._prefix_sharing is not None:
            patch_model(self.model, self._prefix_sharing)
            patch_model(getattr(self, "ref_model", None), self._prefix_sharing)

    def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        # runs inside TRL's __init__, before the reference model could be patched from outside
        if self._prefix_sharing is not None:
            patch_model(getattr(self, "ref_model", None), self._prefix_sharing)
        return super()._precompute_ref_logps(*args, **kwargs)


def packed_lengths(dataset: Any) -> list[int]:  # noqa: ANN401
    """Tokens each preference pair takes in a shared forward: ``prompt + chosen + rejected`` (the prompt once)."""
    return [len(p) + len(c) + len(r) for p, c, r in
            zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]


class PrefixSharingDPOTrainer(_PrefixSharingMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` + ``prefix_sharing=True``: each pair's prompt is computed once (same log-probs, loss,
    metrics and gradients as ``trl.DPOTrainer`` on the same batches, up to floating-point rounding).

    Length-aware batching: with ``DPOConfig(train_sampling_strategy="group_by_length")`` pairs of similar packed
    length (:func:`packed_lengths`) go into the same micro-batches (transformers' ``LengthGroupedSampler``; stock
    TRL refuses this option for preference data, which has no ``input_ids`` column): a packed row then holds pairs
    of similar cost and a ``pack=False`` batch pads less.
    """

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:  # noqa: ANN401
        dataset = self.train_dataset if train_dataset is None else train_dataset
        columns = getattr(dataset, "column_names", None) or []
        if (self.args.train_sampling_strategy == "group_by_length" and self.args.length_column_name not in columns
                and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns)):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=packed_lengths(dataset))
        return super()._get_train_sampler(train_dataset)


class PrefixSharingGRPOTrainer(_PrefixSharingMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` + ``prefix_sharing=True``: completions of one prompt in one forward share its
    computation (policy, old policy and reference log-probs); generation is unchanged."""


class PrefixSharingRLOOTrainer(_PrefixSharingMixin, trl.RLOOTrainer):
    """``trl.RLOOTrainer`` + ``prefix_sharing=True`` (as :class:`PrefixSharingGRPOTrainer`)."""
