"""What PIE can edit: RoPE models whose frequencies do not depend on the length, and full dynamic caches."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import LongkitError, UnsupportedModelError
from ..attention import STATIC_ROPE_TYPES, check_model, sliding_window

__all__ = ["UnsupportedCacheError", "PIEEditError", "STATIC_ROPE_TYPES", "check_pie_model", "check_cache"]

TECHNIQUE = "pie"
# RoPE types whose inv_freq is fixed (independent of the sequence length): one rotation by Δ moves a key by Δ
# positions. "dynamic"/"longrope" change their frequencies with the length, so old keys would need new ones.


class UnsupportedCacheError(LongkitError, TypeError):
    """The KV cache is of a kind PIE cannot edit (sliding-window, quantized, static, LM-Infinite's bounded)."""


class PIEEditError(LongkitError, ValueError):
    """An edit is malformed: a span out of range, overlapping edits, a text edit without a tokenizer."""


def check_pie_model(model: Any) -> torch.Tensor:  # noqa: ANN401
    """Every check PIE needs; returns the model's RoPE ``inv_freq`` ``[D/2]``.

    Raises:
        UnsupportedModelError: not a RoPE model, an unsupported model type, a multimodal wrapper, a RoPE type
            whose frequencies change with the length, partial rotary, or sliding-window attention.
    """
    backbone = getattr(model, "model", None)
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise UnsupportedModelError(
            f"PIE re-rotates cached keys and needs a RoPE model; {type(model).__name__} has no "
            "`model.rotary_emb.inv_freq` (absolute or learned position embeddings cannot be shifted)"
        )
    check_model(model, TECHNIQUE)
    config = model.config
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"PIE supports RoPE types whose frequencies do not depend on the length {sorted(STATIC_ROPE_TYPES)}; "
            f"this model uses {rope_type!r}"
            + (" (its frequencies change with the sequence length, so shifted keys would need other ones)"
               if rope_type in ("dynamic", "longrope") else "")
        )
    window = sliding_window(config)
    if window is not None:
        raise UnsupportedModelError(
            f"this model uses sliding-window attention (window {window}); PIE edits full caches only (a sliding "
            "cache has dropped the keys an edit would shift). Load it with use_sliding_window=False or "
            "sliding_window=None if it was trained without one"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if 2 * rotary.inv_freq.numel() != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings are not supported (rotary dim {2 * rotary.inv_freq.numel()} != head dim "
            f"{head_dim})"
        )
    return rotary.inv_freq


def check_cache(cache: Any) -> None:  # noqa: ANN401
    """Raise :class:`UnsupportedCacheError` unless ``cache`` is a plain, non-offloaded ``DynamicCache`` of
    full-attention ``DynamicLayer`` s (the only layout where column ``j`` holds position ``j`` of every layer)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    name = type(cache).__name__
    if type(cache).__name__ in ("LMInfiniteCache", "LMInfiniteStaticCache"):
        raise UnsupportedCacheError(
            f"PIE cannot edit a {name}: it has evicted tokens and stores its ring out of position order. Let the "
            "EditableContext own a DynamicCache; LM-Infinite's attention (apply_patches(model, "
            "lm_infinite=...)) works with it, since generate() keeps a user-given cache"
        )
    if "Quantized" in name:
        raise UnsupportedCacheError(f"PIE cannot edit a {name}: quantized keys cannot be re-rotated in place; use "
                                    "a DynamicCache")
    if not isinstance(cache, DynamicCache):
        raise UnsupportedCacheError(f"PIE edits a transformers DynamicCache, got a {name} (static, sliding-window, "
                                    "offloaded and quantized caches are not supported)")
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError("PIE cannot edit an offloaded DynamicCache (offloading=True): its layers are "
                                    "moved between devices behind the editor's back")
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            kind = "sliding-window" if getattr(layer, "is_sliding", False) else "unsupported"
            raise UnsupportedCacheError(
                f"PIE cannot edit layer {i} of this DynamicCache: a {kind} {type(layer).__name__} (only full "
                "DynamicLayer s hold every position; build the cache with DynamicCache() and no config)"
            )
