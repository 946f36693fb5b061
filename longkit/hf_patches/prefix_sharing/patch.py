"""``apply_patches(model, prefix_sharing=...)``: the backbone computes each prefix its rows share once.

Two pieces, both on this model instance only:

* the backbone's ``forward`` (``model.base_model``, what TRL's fused LM head calls) is wrapped: a training-style
  call (``input_ids`` + 2-D padding mask, no cache) is planned (:mod:`.plan`); if rows share a prefix, one packed
  forward runs with the shared-prefix mask and its hidden states are scattered back to the caller's ``[N, L]``
  rows, so the LM head, every loss and metric downstream see exactly the tensors they expect. Other calls
  (generation with a cache, ``inputs_embeds``, 4-D masks, no shared prefix) run the original forward;
* the attention implementation is switched to a ``longkit_prefix_sharing_<previous>`` key whose function runs
  :func:`longkit.kernels.masked_attention` when the packed call hands it the mask and the previous
  implementation (sdpa, eager, flash, ...) otherwise, so generation and plain calls are unchanged. Its mask builder
  builds nothing for the packed call (transformers would otherwise read the restarting position ids as packed
  documents and build a dense mask) and the previous builder otherwise.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...config import PrefixSharingConfig
from ...errors import UnsupportedModelError
from ...kernels import masked_attention
from ..attention import attention_modules, check_model, restore_attention, sliding_window, switch_attention
from .plan import plan_shared_prefix

__all__ = ["TECHNIQUE", "MASK_KWARG", "install", "uninstall", "last_plan"]

TECHNIQUE = "prefix_sharing"
MASK_KWARG = "longkit_prefix_mask"  # the packed call's AttentionMask, passed to every layer through **kwargs
_STATE_ATTR = "_longkit_prefix_sharing"
_KEY_PREFIX = "longkit_prefix_sharing_"  # + the previous implementation: the attention key of a patched model
_PACKED = contextvars.ContextVar("longkit_prefix_sharing_packed", default=False)
_FUNCTIONS: dict[str, tuple[Callable, Callable]] = {}  # previous implementation -> (attention, mask builder)
_CACHE_NAMES = ("past_key_values", "cache")  # the KV-cache argument before / since transformers 5.24


def last_plan(model: nn.Module) -> Any:  # noqa: ANN401
    """The :class:`~.plan.PackedLayout` of ``model``'s last shared forward (``None`` if the last call ran unshared):
    its ``tokens`` / ``packed_tokens`` say what sharing saved."""
    return getattr(_backbone(model), "_longkit_last_plan", None)


def _previous_attention(prev: str, module: nn.Module) -> Callable:
    from transformers import AttentionInterface

    if prev == "eager":  # not registered in transformers: every modeling file defines its own
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(f"{TECHNIQUE}: {type(module).__name__} has no eager_attention_forward; load "
                                        "the model with attn_implementation='sdpa'")
        return fn
    return AttentionInterface._global_mapping[prev]


def _functions(prev: str) -> tuple[Callable, Callable]:
    """The attention function and mask builder that wrap the implementation ``prev`` (one pair per ``prev``, so
    registering again is a no-op)."""
    if prev in _FUNCTIONS:
        return _FUNCTIONS[prev]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        mask = kwargs.pop(MASK_KWARG, None)
        if mask is None:
            return _previous_attention(prev, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                     dropout=dropout, **kwargs)
        if dropout:
            raise NotImplementedError(f"{TECHNIQUE}: attention dropout ({dropout}) is not supported in the shared "
                                      "forward; set config.attention_dropout = 0")
        cfg: PrefixSharingConfig = getattr(module, _STATE_ATTR)
        dev = query.device.type
        if torch.is_autocast_enabled(dev):  # as sdpa under autocast: RoPE left q/k in fp32, v in the autocast dtype
            dt = torch.get_autocast_dtype(dev)
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        out = masked_attention(query, key, value, mask=mask, scale=scaling, impl=cfg.attention_impl)
        return out.transpose(1, 2).contiguous(), None

    def mask_builder(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        if _PACKED.get():
            return None  # the attention function gets the shared-prefix mask through MASK_KWARG
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS[prev](*args, **kwargs)

    _FUNCTIONS[prev] = (attention, mask_builder)
    return _FUNCTIONS[prev]


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


_POSITIONAL = ("input_ids", "attention_mask", "position_ids")  # the backbones' first parameters, in order


def _shared_forward(backbone: nn.Module, original: Callable, cfg: PrefixSharingConfig, window: int | None) -> Callable:
    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        backbone._longkit_last_plan = None
        if len(args) > len(_POSITIONAL):  # a cache or embeddings passed positionally: not a training call
            return original(*args, **kwargs)
        call = {**dict(zip(_POSITIONAL, args)), **kwargs}
        input_ids, attention_mask = call.get("input_ids"), call.get("attention_mask")
        position_ids = call.get("position_ids")
        has_cache = any(call.get(name) is not None for name in _CACHE_NAMES)  # 5.24 renamed past_key_values
        eligible = (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] > 1
                    and call.get("inputs_embeds") is None and not has_cache and not call.get("use_cache")
                    and (attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                                    and attention_mask.dim() == 2))
                    and (position_ids is None or position_ids.dim() == 2)
                    and not call.get("output_attentions"))
        plan = plan_shared_prefix(input_ids, attention_mask, position_ids, cfg.min_shared_tokens,
                                  cfg.pack) if eligible else None
        if plan is None:
            return original(*args, **kwargs)
        if window is not None and int(plan.position_ids.max()) >= window:
            raise UnsupportedModelError(
                f"{TECHNIQUE}: this model's sliding window ({window} tokens) is shorter than the batch (positions up "
                f"to {int(plan.position_ids.max())}); the shared forward does not apply a window. Shorten the rows "
                "below the window, or remove the patch for this model")
        for name in (*_POSITIONAL, "use_cache", *_CACHE_NAMES):
            call.pop(name, None)
        token = _PACKED.set(True)
        try:
            out = original(input_ids=plan.input_ids, attention_mask=None, position_ids=plan.position_ids,
                           use_cache=False, **{MASK_KWARG: plan.mask}, **call)
        finally:
            _PACKED.reset(token)
        backbone._longkit_last_plan = plan
        out.last_hidden_state = plan.scatter(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(plan.scatter(h) for h in out.hidden_states)
        return out

    return forward


def install(model: nn.Module, cfg: PrefixSharingConfig) -> dict[str, Any]:
    """Wrap ``model``'s backbone forward and switch its attention (see the module docstring)."""
    from ..handle import HANDLE_ATTR

    check_model(model, TECHNIQUE)
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is not None and "lm_infinite" in handle.undo:
        raise UnsupportedModelError(f"{TECHNIQUE} and lm_infinite both replace the attention; apply one of them "
                                    "(LM-Infinite is for long-context inference, prefix sharing for training)")
    prev = model.config._attn_implementation or "eager"
    if prev.startswith(_KEY_PREFIX):  # loaded with a patched model's setting (TRL builds its reference model so)
        prev = prev[len(_KEY_PREFIX):]
        model.set_attn_implementation(prev)
    elif prev.startswith("longkit_"):
        raise UnsupportedModelError(f"{TECHNIQUE}: the model already runs longkit attention {prev!r}; remove that "
                                    "patch first")
    modules = attention_modules(model, TECHNIQUE)
    if prev != "eager":
        from transformers import AttentionInterface

        if prev not in AttentionInterface._global_mapping:
            raise UnsupportedModelError(f"{TECHNIQUE}: unknown attention implementation {prev!r}; load the model "
                                        "with attn_implementation='sdpa'")
    _previous_attention(prev, modules[0])  # fail now, not at the first call
    attention, mask_builder = _functions(prev)
    undo = switch_attention(model, f"{_KEY_PREFIX}{prev}", attention, mask_builder, modules, _STATE_ATTR,
                            lambda m: cfg)
    backbone = _backbone(model)
    had_forward = "forward" in vars(backbone)
    original = backbone.forward
    backbone.forward = _shared_forward(backbone, original, cfg, sliding_window(model.config))
    undo.update(touched=len(modules), backbone=backbone, had_forward=had_forward, original=original)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install`."""
    backbone = undo["backbone"]
    if undo["had_forward"]:
        backbone.forward = undo["original"]
    else:
        vars(backbone).pop("forward", None)
    vars(backbone).pop("_longkit_last_plan", None)
    restore_attention(model, undo)
