"""A quantized KV cache for Hugging Face decoder models: rotated, packed 2/3/4-bit keys and values (TurboQuant-style,
optional QJL key correction, ThinK key-channel pruning; KIVI as a baseline) with a full-precision recent window.

Installed per model instance by ``longkit.apply_patches(model, kv_cache=KVCacheConfig(...))``; ``generate()`` then
stores its keys and values through :func:`longkit.kernels.kv_quant.quantize_kv` and attends to them with
:func:`~longkit.kernels.kv_quant.quantized_decode_attention` (see ``docs/kv_cache.md``).

Modules:

* :mod:`.cache`: :class:`QuantizedKVCache` (a transformers ``Cache``) and its layer :class:`QuantizedKVLayer`;
* :mod:`.attention`: the attention function registered under ``longkit_kv_cache`` (packed part + window, merged);
* :mod:`.bounded`: on top of LM-Infinite, :class:`BoundedQuantizedKVCache` (sinks + packed ring + window) and its
  attention (``longkit_kv_cache_lm_infinite``);
* :mod:`.patch`: :func:`install` / :func:`uninstall` on one model instance (found by
  :mod:`longkit.hf_patches.registry`).
"""

from .attention import ATTN_KEY, kv_cache_attention
from .bounded import BoundedQuantizedKVCache
from .cache import QuantizedKVCache, QuantizedKVLayer
from .patch import install, uninstall

__all__ = ["ATTN_KEY", "install", "uninstall", "kv_cache_attention", "QuantizedKVCache", "QuantizedKVLayer",
           "BoundedQuantizedKVCache"]
