"""Memory blocks on top of LM-Infinite (InfLLM: Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation
for LLMs with an Efficient Context Memory", arXiv 2402.04617): recall of facts that LM-Infinite's Λ window hides.

``longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(...), memory=MemoryConfig(...))``. LM-Infinite keeps
the first ``n_global`` tokens and the last ``n_local``; memory groups the tokens in between into blocks of
``block_size``, keeps ``repr_keys`` representative keys per block, and lets every chunk of queries also attend to
the ``topk`` blocks most relevant to it, every retrieved block at one place the model saw in pretraining (its
token ``o`` at distance ``distance - o``, default LM-Infinite's ``limit_distance``). Design and measurements:
``docs/inf_memory.md``.

Modules:

* :mod:`.attention`: the attention function registered under ``longkit_inf_memory`` (prefill in chunks through
  the shared masked-attention kernel on CUDA, the PyTorch reference elsewhere; one SDPA call per decode step);
* :mod:`.cache`: :class:`MemoryCache`, LM-Infinite's static cache plus the block store (device, or pinned host
  memory with a device LRU cache);
* :mod:`.patch`: :func:`install` / :func:`uninstall` (found by :mod:`longkit.hf_patches.registry`).
"""

from .attention import ATTN_KEY, memory_attention
from .cache import DeviceStore, MemoryCache, MemoryLayer, OffloadStore
from .patch import install, uninstall

__all__ = ["ATTN_KEY", "install", "uninstall", "memory_attention", "MemoryCache", "MemoryLayer", "DeviceStore",
           "OffloadStore"]
