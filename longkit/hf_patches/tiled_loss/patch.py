"""``apply_patches(model, tiled_loss=...)``: a causal LM's training loss without the ``[tokens, vocab]`` logits.

One piece, on this model instance only: its ``forward`` is wrapped. A call with ``labels`` runs the backbone
(``model.model``, with every argument the stock forward gives it), takes the hidden states the LM head would score
(``logits_to_keep`` applied as the stock forward does) and computes transformers' ``ForCausalLMLoss`` with
:func:`longkit.kernels.tiled_ce.tiled_cross_entropy`:

* labels are shifted by one (padded with ``ignore_index``, default -100) unless ``shift_labels`` is passed, which is
  then used as is (as ``ForCausalLMLoss`` does);
* the loss is the mean over the positions that count, or the sum divided by ``num_items_in_batch`` when given
  (what ``Trainer`` passes under gradient accumulation);
* the result is ``CausalLMOutputWithPast(loss=..., logits=None, past_key_values, hidden_states, attentions)`` (a
  tuple without the ``None`` fields with ``return_dict=False``). **No logits are returned on this path**: a caller
  that needs them calls without ``labels`` (the stock forward runs) and computes its loss itself.

A call without ``labels`` runs the original forward unchanged, including one that passes only ``shift_labels`` (the
stock forward computes no loss then either). Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM`` with a plain ``nn.Linear`` LM head (tied to the input embeddings or
not; a bias is used if present). Refused with the reason: other classes and model types, configs with
``final_logit_softcapping`` (these forwards ignore it, so the intent is unclear), a custom ``loss_function`` /
``loss_type``, an LM head replaced by another module (PEFT on ``lm_head``, quantised layers), ZeRO-3-partitioned or
DTensor (FSDP2) LM-head weights.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ...config import TiledLossConfig
from ...errors import UnsupportedModelError
from ...kernels.tiled_ce import tiled_cross_entropy
from ..attention import SUPPORTED_MODEL_TYPES, check_model

__all__ = ["TECHNIQUE", "MODEL_TYPES", "install", "uninstall", "config_of"]

TECHNIQUE = "tiled_loss"
MODEL_TYPES = SUPPORTED_MODEL_TYPES
_STATE_ATTR = "_longkit_tiled_loss"  # the config, on a patched model instance
# the stock CausalLM forward's parameters (transformers 5.x, the four families); anything else is refused
_PARAMS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels", "use_cache",
           "logits_to_keep")
_CACHE_NAMES = ("past_key_values", "cache")  # the KV-cache argument (and output field) before / since 5.24


def _check(model: nn.Module) -> None:
    mtype = check_model(model, TECHNIQUE, MODEL_TYPES)
    cls = type(model).__name__
    if not cls.endswith("ForCausalLM"):
        raise UnsupportedModelError(f"{TECHNIQUE}: {cls} is not a causal LM; the tiled loss replaces the LM head + "
                                    f"loss of {mtype.capitalize()}ForCausalLM only")
    if _STATE_ATTR in vars(model):
        raise UnsupportedModelError(f"{TECHNIQUE} is already installed on this {cls}; uninstall it first (or use "
                                    "longkit.apply_patches, which replaces it)")
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        raise UnsupportedModelError(
            f"{TECHNIQUE}: config.final_logit_softcapping={cap!r} is set, but {cls}'s own forward does not apply it, "
            "so the loss it should give is ambiguous; set config.final_logit_softcapping = None (stock behaviour) "
            "or compute the loss with longkit.kernels.tiled_ce.tiled_cross_entropy(..., softcap=...) yourself")
    if "_loss_function" in vars(model) or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise UnsupportedModelError(
            f"{TECHNIQUE}: {cls} has a custom loss (loss_function assigned or loss_type="
            f"{getattr(model, 'loss_type', None)!r}); the tiled loss computes transformers' ForCausalLMLoss only")
    params = tuple(p for p, v in inspect.signature(model.forward).parameters.items()
                   if v.kind is not inspect.Parameter.VAR_KEYWORD)
    if tuple("past_key_values" if p in _CACHE_NAMES else p for p in params) != _PARAMS:
        raise UnsupportedModelError(f"{TECHNIQUE}: {cls}.forward takes {params}, not the expected {_PARAMS}; this "
                                    "transformers version is not supported by the tiled loss")
    if not isinstance(getattr(model, "model", None), nn.Module):
        raise UnsupportedModelError(f"{TECHNIQUE}: {cls} has no backbone at .model")
    _lm_head(model)


def _lm_head(model: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` LM head (checked on every call: PEFT, FSDP or ZeRO-3 may change it after install)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise UnsupportedModelError(
            f"{TECHNIQUE}: the LM head is a {type(head).__name__}, not a plain nn.Linear (LoRA on lm_head, quantised "
            "layers are not supported); leave lm_head out of PEFT's target_modules, or remove the tiled loss")
    weight = head.weight
    if hasattr(weight, "ds_id"):
        raise NotImplementedError(f"{TECHNIQUE}: the LM head is partitioned by DeepSpeed ZeRO-3; the tiled loss reads "
                                  "lm_head.weight directly and does not gather it. Use ZeRO stage <= 2")
    if type(weight.data).__name__ == "DTensor" or type(weight).__name__ == "DTensor":
        raise NotImplementedError(f"{TECHNIQUE}: the LM head weight is a DTensor (FSDP2 / tensor parallel); not "
                                  "supported")
    return head


def _loss_forward(model: nn.Module, cfg: TiledLossConfig, args: dict[str, Any], extra: dict[str, Any],  # noqa: ANN401
                  cache_name: str = "past_key_values") -> Any:  # noqa: ANN401
    """The stock ``*ForCausalLM.forward`` with ``labels``, the LM head and loss tiled."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = extra.pop("return_dict", None)  # as transformers' @can_return_tuple: not passed to the backbone
    if return_dict is None:
        return_dict = model.config.return_dict
    labels = args["labels"]
    shift_labels = extra.get("shift_labels")
    num_items_in_batch = extra.get("num_items_in_batch")
    ignore_index = extra.get("ignore_index", -100)
    outputs = model.model(input_ids=args.get("input_ids"), attention_mask=args.get("attention_mask"),
                          position_ids=args.get("position_ids"), **{cache_name: args.get(cache_name)},
                          inputs_embeds=args.get("inputs_embeds"), use_cache=args.get("use_cache"), **extra)
    hidden = outputs.last_hidden_state
    keep = args.get("logits_to_keep", 0)
    hidden = hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    head = _lm_head(model)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(head.weight.device)
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.device)
    if shift_labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{TECHNIQUE}: the labels give {shift_labels.shape[0]} targets but the LM head scores "
                         f"{hidden.shape[0]} positions (logits_to_keep={keep!r}); pass labels of the scored positions' "
                         "shape, as the stock loss requires")
    loss = tiled_cross_entropy(hidden, head.weight, shift_labels, bias=head.bias, chunk_size=cfg.chunk_size,
                               num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)
    out = CausalLMOutputWithPast(loss=loss, logits=None, **{cache_name: getattr(outputs, cache_name)},
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


def _tiled_forward(model: nn.Module, original: Callable, cfg: TiledLossConfig) -> Callable:
    sig = inspect.signature(original)
    var_kw = next(n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD)
    cache_name = next(n for n in _CACHE_NAMES if n in sig.parameters)  # this transformers version's name

    @functools.wraps(original)  # keeps the stock signature: generate() and Trainer inspect it
    def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        bound = sig.bind(*args, **kwargs).arguments
        if bound.get("labels") is None:
            return original(*args, **kwargs)
        extra = dict(bound.pop(var_kw, {}))
        return _loss_forward(model, cfg, bound, extra, cache_name)

    return forward


def install(model: nn.Module, cfg: TiledLossConfig) -> dict[str, Any]:
    """Wrap this ``model``'s forward (see the module docstring). Returns the undo record (``touched`` = 1)."""
    if not isinstance(cfg, TiledLossConfig):
        raise TypeError(f"{TECHNIQUE}: cfg must be a TiledLossConfig, got {type(cfg).__name__}")
    _check(model)
    had_forward = "forward" in vars(model)
    original = model.forward
    model.forward = _tiled_forward(model, original, cfg)
    setattr(model, _STATE_ATTR, cfg)
    return {"touched": 1, "had_forward": had_forward, "original": original}


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install`."""
    if undo["had_forward"]:
        model.forward = undo["original"]
    else:
        vars(model).pop("forward", None)
    vars(model).pop(_STATE_ATTR, None)


def config_of(model: nn.Module) -> TiledLossConfig | None:
    """The :class:`TiledLossConfig` installed on ``model``, or ``None``."""
    return vars(model).get(_STATE_ATTR)

