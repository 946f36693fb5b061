"""Install / uninstall the quantized KV cache on one model instance (``apply_patches(model, kv_cache=...)``).

* the attention switch (:mod:`longkit.hf_patches.attention`) to ``longkit_kv_cache`` (this instance only);
* the model's ``_prepare_cache_for_generation`` wrapped (this instance only) so ``generate()`` builds a
  :class:`~.cache.QuantizedKVCache` sized for the run where it would build its default dynamic cache; a
  ``QuantizedKVCache`` passed as ``past_key_values`` is used as given.

Refused with a clear error (each is a combination this cache cannot serve correctly): another cache passed to
``generate()`` or a ``cache_implementation``; assisted/speculative generation (a rollback cannot give back full
precision to tokens quantized during a rejected verification); the CUDA-graph decode runner (the cache's lengths
live on the host and its buffers grow); sliding-window models.

On top of LM-Infinite (``apply_patches(model, lm_infinite=..., kv_cache=...)``, LM-Infinite first): the attention
switches to ``longkit_kv_cache_lm_infinite`` and ``generate()`` builds a
:class:`~.bounded.BoundedQuantizedKVCache` (LM-Infinite's sinks + window, the window's older tokens packed);
removing ``kv_cache`` gives LM-Infinite back.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from ...config import KVCacheConfig
from ...errors import ConfigError, UnsupportedModelError
from ..attention import attention_modules, check_model, restore_attention, sliding_window, switch_attention
from ..compat import cache_kwarg
from ..handle import HANDLE_ATTR
from ..lm_infinite import patch as lm_infinite_patch
from ..lm_infinite.attention import ATTN_KEY as LMI_KEY
from ..lm_infinite.attention import STATE_ATTR as LMI_STATE
from ..lm_infinite.attention import lm_infinite_mask
from .attention import ATTN_KEY, STATE_ATTR, kv_cache_attention, kv_cache_mask
from .bounded import BOUNDED_ATTN_KEY, BoundedQuantizedKVCache, bounded_attention, check_bounded_options
from .bounded_static import StaticBoundedQuantizedKVCache
from .cache import QuantizedKVCache, check_spec_fits

__all__ = ["install", "uninstall"]

TECHNIQUE = "kv_cache"
_GRAPH_RUNNER_ATTR = "_longkit_graph_runner"  # set on a model by hf_patches.decode_graph.install_runner


def _refuse_graph_runner(model: nn.Module) -> None:
    if _GRAPH_RUNNER_ATTR in vars(model):
        raise NotImplementedError(
            "kv_cache does not support the CUDA-graph decode runner (lm_infinite decode='cuda_graph' or "
            "hf_patches.decode_graph): the quantized cache keeps its lengths on the host and grows its buffers, so a "
            "decode step cannot be captured; generate without the runner"
        )


def _lm_infinite_config(model: nn.Module, attns: list[nn.Module]) -> Any:
    """LM-Infinite's resolved config when this model runs LM-Infinite (kv_cache then stacks on it), else ``None``."""
    if model.config._attn_implementation != LMI_KEY:
        return None
    states = [getattr(m, LMI_STATE, None) for m in attns]
    if any(st is None for st in states):
        return None
    lm = states[0].cfg
    if not lm.bounded_cache:
        raise ConfigError("kv_cache on top of lm_infinite needs LMInfiniteConfig(bounded_cache=True): the quantized "
                          "bounded cache is what generate() uses")
    return lm


def _check_model(model: nn.Module, cfg: KVCacheConfig) -> tuple[list[nn.Module], Any]:
    """The model's attention modules and LM-Infinite's config (or ``None``), after every check the cache needs."""
    check_model(model, TECHNIQUE)
    handle = getattr(model, HANDLE_ATTR, None)
    current = model.config._attn_implementation
    attns = attention_modules(getattr(model, "model", model), TECHNIQUE)
    lm = _lm_infinite_config(model, attns)
    if lm is None and handle is not None and "lm_infinite" in handle.configs:
        raise NotImplementedError(f"kv_cache cannot be combined with {current!r} on top of lm_infinite (e.g. "
                                  "memory blocks); use lm_infinite and kv_cache alone")
    if lm is None and isinstance(current, str) and current.startswith("longkit_") and current != ATTN_KEY:
        raise NotImplementedError(f"kv_cache cannot be combined with another longkit attention ({current!r}): both "
                                  "replace the attention; use one of them")
    if lm is not None:
        check_bounded_options(cfg, lm.n_local)
    window = sliding_window(model.config)
    if window is not None:
        raise UnsupportedModelError(
            f"kv_cache does not support sliding-window attention (this model attends to the last {window} tokens); "
            "the packed part is read in full. Use a full-attention model (e.g. use_sliding_window=False in its config "
            "if it was trained without one)"
        )
    check_spec_fits(cfg.spec(), attns[0].head_dim)
    if lm is None or lm.decode != "cuda_graph":  # LM-Infinite's runner graphs the static quantized cache
        _refuse_graph_runner(model)
    return attns, lm


def _wrap_prepare_cache(model: nn.Module, cfg: KVCacheConfig, lm: Any = None) -> None:
    """Make ``generate()`` build a :class:`QuantizedKVCache` (or, on top of LM-Infinite, a
    :class:`BoundedQuantizedKVCache`) where it would build its default dynamic cache."""
    original = model._prepare_cache_for_generation
    key = cache_kwarg()  # "cache" from transformers 5.24, "past_key_values" before
    static = lm is not None and lm.decode != "eager"
    ours_type = QuantizedKVCache if lm is None else StaticBoundedQuantizedKVCache if static else BoundedQuantizedKVCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        mode = args[0] if args else kwargs.get("generation_mode")
        if getattr(mode, "value", mode) == "assisted_generation":
            raise NotImplementedError(
                "assisted/speculative generation is not supported with kv_cache: rejected draft tokens are rolled "
                "back, but tokens quantized during their verification cannot get their full precision back; "
                "generate without an assistant, or longkit.remove_patches(model)"
            )
        if lm is None or lm.decode != "cuda_graph":
            _refuse_graph_runner(self)
        if lm is not None and (generation_config.num_beams or 1) > 1:
            raise NotImplementedError("beam search is not supported with lm_infinite + kv_cache (the packed ring is "
                                      "per row); use greedy decoding or sampling")
        user_cache = model_kwargs.get(key)
        if user_cache is not None and not isinstance(user_cache, ours_type):
            raise ConfigError(
                f"this model is patched with kv_cache, but generate() got a {type(user_cache).__name__}: pass a "
                f"longkit.hf_patches.kv_cache.{ours_type.__name__}, or none (generate() then builds one), or "
                "longkit.remove_patches(model) for a full-precision cache"
            )
        if user_cache is None and generation_config.cache_implementation is not None:
            raise ConfigError(
                f"this model is patched with kv_cache, which builds its own cache; drop "
                f"cache_implementation={generation_config.cache_implementation!r} (or longkit.remove_patches(model))"
            )
        if user_cache is None and generation_config.use_cache is not False:
            if static:
                if lm.decode == "cuda_graph" and not lm_infinite_patch._graph_device_ok(self):
                    raise UnsupportedModelError(
                        f"LMInfiniteConfig(decode='cuda_graph') needs the model on a CUDA device, it is on "
                        f"{self.device}; use decode='static' (same outputs, no graphs) elsewhere"
                    )
                model_kwargs[key] = StaticBoundedQuantizedKVCache(
                    self.config, cfg, lm.n_global, lm.n_local, model_kwargs.get("attention_mask"),
                    graphable=lm.decode == "cuda_graph")
                return None
            if lm is not None:
                model_kwargs[key] = BoundedQuantizedKVCache(self.config, cfg, lm.n_global, lm.n_local,
                                                            model_kwargs.get("attention_mask"))
                return None
            max_len = args[2] if len(args) > 2 else kwargs.get("max_cache_length")
            model_kwargs[key] = QuantizedKVCache(self.config, cfg,
                                                 max_cache_len=max_len if isinstance(max_len, int) else None)
            return None
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def install(model: nn.Module, cfg: KVCacheConfig) -> dict[str, Any]:
    """Switch this model instance to the quantized KV cache. Returns what :func:`uninstall` needs to undo it."""
    if not isinstance(cfg, KVCacheConfig):
        raise ConfigError(f"kv_cache: install needs a KVCacheConfig, got {type(cfg).__name__}")
    attns, lm = _check_model(model, cfg)
    if lm is None:
        undo = switch_attention(model, ATTN_KEY, kv_cache_attention, kv_cache_mask, attns, STATE_ATTR, lambda m: cfg)
    else:  # stacked on LM-Infinite: its padding-mask builder, its state stays on the modules
        undo = switch_attention(model, BOUNDED_ATTN_KEY, bounded_attention, lm_infinite_mask, attns, STATE_ATTR,
                                lambda m: cfg)
    undo["prepare_cache"] = vars(model).get("_prepare_cache_for_generation")  # an instance override, if any
    _wrap_prepare_cache(model, cfg, lm)
    undo["touched"] = len(attns)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install` on this instance."""
    if "prepare_cache" in undo:
        if undo["prepare_cache"] is None:
            model.__dict__.pop("_prepare_cache_for_generation", None)
        else:
            model._prepare_cache_for_generation = undo["prepare_cache"]
    restore_attention(model, undo)
