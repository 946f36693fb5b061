"""Install / uninstall memory blocks on a model that runs LM-Infinite (``apply_patches(model, memory=...)``).

Memory is a layer on top of LM-Infinite, not a replacement: it needs ``lm_infinite`` on the same model, applied in
the same call (listed before ``memory``) or earlier, and reads its resolved configuration (``n_global``,
``n_local``, ``limit_distance``) from it. Installing memory

* checks the model as LM-Infinite does (same supported models, same errors) and the combined configuration;
* switches this instance's attention from ``longkit_lm_infinite`` to ``longkit_inf_memory``
  (:mod:`longkit.hf_patches.attention`), whose padding-mask builder is LM-Infinite's;
* wraps ``_prepare_cache_for_generation`` (over LM-Infinite's wrapper) so ``generate()`` builds a
  :class:`~.cache.MemoryCache`, and refuses generation modes the cache cannot serve (assisted, beam search).

Uninstalling restores LM-Infinite's attention and cache wrapper. If LM-Infinite was removed first (``patched()``
removes techniques in the order they were applied), memory only removes its own state.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from ...config import MemoryConfig
from ...errors import ConfigError
from ..attention import attention_modules, switch_attention
from ..compat import cache_kwarg
from ..lm_infinite.attention import ATTN_KEY as LMI_KEY
from ..lm_infinite.attention import STATE_ATTR as LMI_STATE
from ..lm_infinite.attention import lm_infinite_mask
from ..lm_infinite.patch import _check_model
from .attention import ATTN_KEY, STATE_ATTR, MemoryState, memory_attention
from .cache import MemoryCache

__all__ = ["install", "uninstall"]

TECHNIQUE = "memory"


def _lm_infinite_state(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    """LM-Infinite's per-layer state on this model (raises if it is not installed)."""
    attns = attention_modules(getattr(model, "model", model), TECHNIQUE)
    states = [getattr(m, LMI_STATE, None) for m in attns]
    if any(s is None for s in states) or model.config._attn_implementation != LMI_KEY:
        raise ConfigError(
            "memory works on top of LM-Infinite: apply both, LM-Infinite first, e.g. "
            "longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_local=2048), memory=MemoryConfig()) "
            f"(this model's attention is {model.config._attn_implementation!r})"
        )
    return states[0], attns


def _resolve(model: nn.Module, cfg: MemoryConfig, lm: Any) -> int:
    """Check the memory options against LM-Infinite's and the model's; returns the memory distance."""
    if lm.decode == "cuda_graph":
        raise NotImplementedError(
            "memory does not support LMInfiniteConfig(decode='cuda_graph') yet (a decode step selects and writes "
            "blocks with host-side bookkeeping); use decode='eager' or 'static' (memory decodes with its own "
            "fixed-buffer cache in both)"
        )
    if not lm.bounded_cache:
        raise ConfigError("memory needs LMInfiniteConfig(bounded_cache=True): its cache (the bounded LM-Infinite "
                          "cache plus the memory blocks) is what generate() uses")
    if lm.n_local < 2 * cfg.block_size:
        raise ConfigError(
            f"memory needs LM-Infinite's n_local >= 2 * block_size (a block must be final, i.e. scored by the "
            f"block_size queries after it, before it leaves the window); got n_local={lm.n_local}, "
            f"block_size={cfg.block_size}. Use MemoryConfig(block_size<={lm.n_local // 2}) or a larger n_local"
        )
    distance = cfg.distance if cfg.distance is not None else lm.limit_distance
    if distance < cfg.block_size:
        raise ConfigError(
            f"memory distance {distance} is below block_size={cfg.block_size}: a retrieved block's token o is seen at "
            f"distance - o, which must stay >= 1. Use MemoryConfig(distance>={cfg.block_size}) or smaller blocks"
        )
    pretrain = getattr(model.config, "max_position_embeddings", None)
    if pretrain is not None and distance > pretrain:
        raise ConfigError(
            f"memory distance {distance} exceeds the model's pretraining length {pretrain}: retrieved tokens would be "
            f"seen at a distance the model never saw. Set MemoryConfig(distance=...) (or LM-Infinite's "
            f"limit_distance) to at most {pretrain}"
        )
    return distance


def _wrap_prepare_cache(model: nn.Module, cfg: MemoryConfig, lm: Any) -> Any:
    """Make ``generate()`` build a :class:`MemoryCache`; returns what was there before (to restore)."""
    previous = vars(model).get("_prepare_cache_for_generation")
    call_previous = model._prepare_cache_for_generation
    n_layers = model.config.num_hidden_layers
    key = cache_kwarg()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get(key)
        ours = (user_cache is None and generation_config.cache_implementation is None
                and generation_config.use_cache is not False)
        if ours or isinstance(user_cache, MemoryCache):
            mode = args[0] if args else kwargs.get("generation_mode")
            if getattr(mode, "value", mode) == "assisted_generation":
                raise NotImplementedError("assisted/speculative generation is not supported with memory (its cache "
                                          "cannot be cropped)")
            if (generation_config.num_beams or 1) > 1:
                raise NotImplementedError("beam search is not supported with memory (the memory blocks are per "
                                          "batch row); use greedy or sampling")
        if ours:
            model_kwargs[key] = MemoryCache(n_layers, lm.n_global, lm.n_local, model_kwargs.get("attention_mask"),
                                            cfg)
            return None
        return call_previous(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    return previous


def install(model: nn.Module, cfg: MemoryConfig) -> dict[str, Any]:
    """Add memory blocks to this model's LM-Infinite. Returns what :func:`uninstall` needs to undo it."""
    lm_state, _ = _lm_infinite_state(model)
    lm = lm_state.cfg
    rotary, attns = _check_model(model, lm)  # LM-Infinite's own model checks (same models, same errors)
    distance = _resolve(model, cfg, lm)
    undo = switch_attention(model, ATTN_KEY, memory_attention, lm_infinite_mask, attns, STATE_ATTR,
                            lambda m: MemoryState(cfg, lm, distance, rotary))
    undo["prepare_previous"] = _wrap_prepare_cache(model, cfg, lm)
    undo["prepare_ours"] = vars(model)["_prepare_cache_for_generation"]
    undo["touched"] = len(attns)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install` on this instance (back to LM-Infinite, or to nothing if LM-Infinite is gone)."""
    for m in undo["modules"]:
        if hasattr(m, STATE_ATTR):
            delattr(m, STATE_ATTR)
    if vars(model).get("_prepare_cache_for_generation") is undo["prepare_ours"]:
        if undo["prepare_previous"] is None:
            del model._prepare_cache_for_generation
        else:
            model._prepare_cache_for_generation = undo["prepare_previous"]
    if model.config._attn_implementation == ATTN_KEY:
        # Only when nothing else changed it since: LM-Infinite removed first already restored the original.
        model.set_attn_implementation(undo["attn_implementation"])
