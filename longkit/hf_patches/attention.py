"""The attention switch shared by every technique that replaces a Hugging Face model's core attention.

A technique (LM-Infinite, Ulysses, ...) provides an attention function and a mask builder; this module

* reads the model type one way (the *text* config's ``model_type``, so a multimodal wrapper is recognised
  for what its language model is) and checks it against one supported-model table;
* checks the layers (full attention only) and reports an active sliding window;
* finds the attention modules, registers the function in transformers' ``AttentionInterface`` **and** the
  mask builder under the same key in ``AttentionMaskInterface`` (without the builder transformers hands the
  attention no mask and padding is lost), attaches per-module state, switches only this model instance with
  ``set_attn_implementation`` and verifies that it took;
* undoes all of that exactly (:func:`restore_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..config import GIRAFFE_ROPE_TYPES
from ..errors import UnsupportedModelError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "STATIC_ROPE_TYPES",
    "text_config",
    "model_type",
    "check_model",
    "sliding_window",
    "attention_modules",
    "switch_attention",
    "restore_attention",
]

# Decoder families whose attention modules call the registered attention function with post-RoPE q/k and
# pass ``position_ids`` through (checked for each technique by its tests on tiny random configs).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

# RoPE types whose frequencies do not depend on the sequence length: a cached key can be re-rotated (PIE) and the
# distance limit applied (LM-Infinite) with one fixed set of frequencies.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", *GIRAFFE_ROPE_TYPES})


def text_config(config: Any) -> Any:
    """The language model's config: ``config.get_text_config()`` where it exists (multimodal wrappers)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def model_type(model_or_config: Any) -> str | None:
    """The text config's ``model_type`` of a model or config, or ``None`` for something that is neither."""
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        return None
    return getattr(text_config(config), "model_type", None)


def check_model(model: Any, technique: str, model_types: frozenset[str] = SUPPORTED_MODEL_TYPES) -> str:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a text-only model of a supported type.

    Returns the model type. Multimodal wrappers are refused: switching their attention implementation would
    also switch the vision tower's attention, which these techniques do not implement.
    """
    config = getattr(model, "config", None)
    mtype = model_type(model)
    if config is None or mtype is None:
        raise UnsupportedModelError(f"{technique}: {type(model).__name__} is not a transformers model "
                                    "(no config.model_type)")
    if mtype not in model_types:
        raise UnsupportedModelError(f"{technique} supports model types {sorted(model_types)}, not {mtype!r}")
    if text_config(config) is not config:
        raise UnsupportedModelError(
            f"{technique}: {type(model).__name__} is a multimodal model ({config.model_type!r} around a {mtype!r} "
            "language model); apply it to the language model alone, e.g. a "
            f"{mtype.capitalize()}ForCausalLM loaded from the same weights"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"{technique} needs full-attention layers only; config.layer_types has "
                                    f"{sorted(set(layer_types))}")
    return mtype


def sliding_window(config: Any) -> int | None:
    """The sliding window the model applies (``None`` if none or switched off by ``use_sliding_window``)."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return int(window)


def attention_modules(model: nn.Module, technique: str) -> list[nn.Module]:
    """The model's self-attention modules (those with ``q_proj``, ``layer_idx`` and ``head_dim``)."""
    attns = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")
             and hasattr(m, "q_proj")]
    if not attns:
        raise UnsupportedModelError(f"{technique}: found no attention modules with q_proj/layer_idx in "
                                    f"{type(model).__name__}")
    return attns


def _register(key: str, attention: Callable, mask: Callable) -> None:
    """Register both functions under ``key`` (idempotent; only this key is touched)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    if AttentionInterface._global_mapping.get(key) is not attention:
        AttentionInterface.register(key, attention)
    if AttentionMaskInterface._global_mapping.get(key) is not mask:
        AttentionMaskInterface.register(key, mask)


def switch_attention(model: nn.Module, key: str, attention: Callable, mask: Callable, modules: list[nn.Module],
                     state_attr: str, state: Callable[[nn.Module], Any]) -> dict[str, Any]:
    """Attach ``state(module)`` to every module as ``state_attr`` and switch this model to ``key``.

    Returns the undo record for :func:`restore_attention` (the previous implementation and the modules).
    """
    _register(key, attention, mask)
    undo: dict[str, Any] = {"attn_implementation": model.config._attn_implementation, "modules": modules,
                            "state_attr": state_attr}
    for m in modules:
        setattr(m, state_attr, state(m))
    model.set_attn_implementation(key)
    if model.config._attn_implementation != key:
        restore_attention(model, undo)
        raise UnsupportedModelError(f"{type(model).__name__} refused attn_implementation={key!r}")
    return undo


def restore_attention(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`switch_attention`: remove the module state and restore the previous implementation."""
    for m in undo["modules"]:
        if hasattr(m, undo["state_attr"]):
            delattr(m, undo["state_attr"])
    model.set_attn_implementation(undo["attn_implementation"])
