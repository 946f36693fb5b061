"""LM-Infinite for Hugging Face decoder models (Han et al., "LM-Infinite: Zero-Shot Extreme Length
Generalization for Large Language Models", NAACL 2024).

Installed per model instance by ``longkit.apply_patches(model, lm_infinite=...)``. Each query attends to the
first ``n_global`` tokens and the nearest ``n_local`` tokens (a Λ-shaped mask); global-branch keys outside the
window are scored as if at distance ``limit_distance``.

Modules:

* :mod:`.attention`: the attention function and mask builder registered under ``longkit_lm_infinite``;
* :mod:`.cache`: :class:`LMInfiniteCache`, the bounded cache ``generate()`` uses by default;
* :mod:`.static_cache`: :class:`LMInfiniteStaticCache`, its fixed-shape, graph-capturable form
  (``decode="static" | "cuda_graph"``);
* :mod:`.patch`: :func:`install` / :func:`uninstall` on one model instance (the technique's entry points,
  found here by :mod:`longkit.hf_patches.registry`).
"""

from .attention import ATTN_KEY, lm_infinite_attention, lm_infinite_mask
from .cache import LMInfiniteCache
from .patch import install, uninstall
from .static_cache import LMInfiniteStaticCache

__all__ = ["ATTN_KEY", "install", "uninstall", "lm_infinite_attention", "lm_infinite_mask", "LMInfiniteCache",
           "LMInfiniteStaticCache"]
