"""Install / uninstall LM-Infinite on one model instance (what ``apply_patches(model, lm_infinite=...)`` calls).

* the attention switch (:mod:`longkit.hf_patches.attention`) to ``longkit_lm_infinite``;
* the model's ``_prepare_cache_for_generation`` wrapped (this instance only) so ``generate()`` uses the
  bounded :class:`~.cache.LMInfiniteCache`, or with ``decode="static" | "cuda_graph"`` the fixed-shape
  :class:`~.static_cache.LMInfiniteStaticCache`;
* with ``decode="cuda_graph"`` this instance's ``get_compiled_call`` replaced by the CUDA-graph runner of
  :mod:`longkit.hf_patches.decode_graph`.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from ...config import LMInfiniteConfig
from ...errors import ConfigError, UnsupportedModelError
from ..attention import (
    STATIC_ROPE_TYPES,
    attention_modules,
    check_model,
    restore_attention,
    sliding_window,
    switch_attention,
)
from ..compat import cache_kwarg
from ..decode_graph import install_runner, uninstall_runner
from .attention import ATTN_KEY, STATE_ATTR, LayerState, lm_infinite_attention, lm_infinite_mask
from .cache import LMInfiniteCache
from .static_cache import LMInfiniteStaticCache

__all__ = ["install", "uninstall"]

TECHNIQUE = "lm_infinite"


def _graph_device_ok(model: nn.Module) -> bool:
    return model.device.type == "cuda"


def _check_model(model: nn.Module, cfg: LMInfiniteConfig) -> tuple[nn.Module, list[nn.Module]]:
    """The model's rotary embedding and attention modules, after every check LM-Infinite needs."""
    check_model(model, TECHNIQUE)
    config = model.config
    backbone = getattr(model, "model", model)
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(f"{type(model).__name__} has no `model.rotary_emb.inv_freq`; LM-Infinite "
                                    "needs a RoPE model")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"lm_infinite supports static RoPE types {sorted(STATIC_ROPE_TYPES)}; this model uses '{rope_type}', "
            "whose frequencies change with length"
        )
    window = sliding_window(config)
    if window is not None and cfg.n_local > window:
        raise UnsupportedModelError(
            f"this model was trained with a sliding window of {window} tokens; lm_infinite n_local={cfg.n_local} "
            f"exceeds it. Use n_local <= {window}."
        )
    attns = attention_modules(backbone, TECHNIQUE)
    head_dim = attns[0].head_dim
    if 2 * rotary.inv_freq.numel() != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings are not supported (rotary dim {2 * rotary.inv_freq.numel()} != head dim "
            f"{head_dim})"
        )
    return rotary, attns


def _refuse_assisted(generation_mode: Any, bounded: bool) -> None:
    """Assisted/speculative generation crops the cache after each verification, which a bounded cache cannot.

    Refused before the prompt runs, with the same message on every transformers version: up to 5.23
    ``generate()`` reached the layers' ``crop`` (our error), from 5.24 it checks ``Cache.is_croppable`` after
    the prefill and raises its own, generic ``ValueError``.
    """
    if bounded and getattr(generation_mode, "value", generation_mode) == "assisted_generation":
        raise NotImplementedError(
            "assisted/speculative generation is not supported with lm_infinite's bounded cache (it cannot be "
            "cropped: evicted tokens are gone); use LMInfiniteConfig(bounded_cache=False)"
        )


def _wrap_prepare_cache(model: nn.Module, cfg: LMInfiniteConfig) -> None:
    """Make ``generate()`` build the bounded cache where it would build its default dynamic cache."""
    original = model._prepare_cache_for_generation
    n_layers = model.config.num_hidden_layers
    key = cache_kwarg()  # "cache" from transformers 5.24, "past_key_values" before

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get(key)
        # Only when generate() would build its default dynamic cache: a user cache or an explicit
        # cache_implementation is respected as given.
        ours = (user_cache is None and generation_config.cache_implementation is None
                and generation_config.use_cache is not False)
        _refuse_assisted(args[0] if args else kwargs.get("generation_mode"),
                         ours or isinstance(user_cache, LMInfiniteCache | LMInfiniteStaticCache))
        if ours:
            mask = model_kwargs.get("attention_mask")
            if cfg.decode == "eager":
                model_kwargs[key] = LMInfiniteCache(n_layers, cfg.n_global, cfg.n_local, mask)
                return None
            if cfg.decode == "cuda_graph" and not _graph_device_ok(self):
                raise UnsupportedModelError(
                    f"LMInfiniteConfig(decode='cuda_graph') needs the model on a CUDA device, it is on "
                    f"{self.device}; use decode='static' (same outputs, no graphs) elsewhere"
                )
            model_kwargs[key] = LMInfiniteStaticCache(
                n_layers, cfg.n_global, cfg.n_local, mask, graphable=cfg.decode == "cuda_graph")
            return None
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def install(model: nn.Module, cfg: LMInfiniteConfig) -> dict[str, Any]:
    """Switch this model instance to LM-Infinite. Returns what :func:`uninstall` needs to undo it."""
    cfg = cfg.resolved(model.config.max_position_embeddings)
    rotary, attns = _check_model(model, cfg)
    current = model.config._attn_implementation
    if isinstance(current, str) and current.startswith("longkit_") and current != ATTN_KEY:
        # Switching now would silently drop that technique's attention (kv_cache and memory stack on LM-Infinite).
        raise ConfigError(
            f"lm_infinite must be applied before the technique that set attention {current!r}: "
            "longkit.remove_patches(model), then e.g. apply_patches(model, lm_infinite=..., kv_cache=...) with "
            "lm_infinite listed first"
        )
    undo = switch_attention(model, ATTN_KEY, lm_infinite_attention, lm_infinite_mask, attns, STATE_ATTR,
                            lambda m: LayerState(cfg, rotary))
    if cfg.bounded_cache:
        undo["prepare_cache"] = "_prepare_cache_for_generation" in vars(model)
        _wrap_prepare_cache(model, cfg)
    if cfg.decode == "cuda_graph":
        # generate() routes one-token steps on a compileable cache through get_compiled_call: graph those
        # of our static cache only (any other cache runs eagerly through the runner).
        install_runner(model, accept=lambda cache: isinstance(cache, LMInfiniteStaticCache))
        undo["graph_runner"] = True
    undo["touched"] = len(attns)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install` on this instance."""
    if "prepare_cache" in undo and not undo["prepare_cache"]:
        model.__dict__.pop("_prepare_cache_for_generation", None)
    if undo.get("graph_runner"):
        uninstall_runner(model)
    restore_attention(model, undo)
