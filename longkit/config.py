"""Technique options: small frozen dataclasses validated on construction.

Rule: options shared by several hosts live here; each host package only parses its own section into them (the
DeepSpeed ``"longkit"`` section in ``longkit/deepspeed_ext/config.py``, vLLM arguments in
``longkit/vllm_plugins/<feature>/config.py``, ``apply_patches`` keywords in ``longkit/hf_patches``), so one name
means one thing everywhere. Options only one host has stay in that host's config module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ._validate import check_bool, check_choice, check_int
from .errors import ConfigError

__all__ = ["LMInfiniteConfig"]

_DECODE_MODES = ("eager", "static", "cuda_graph")


@dataclass(frozen=True)
class LMInfiniteConfig:
    """LM-Infinite (Han et al., NAACL 2024): Λ-shaped attention plus a distance limit.

    Each query attends to the first ``n_global`` tokens and to the nearest ``n_local`` tokens; any
    relative distance larger than ``limit_distance`` is clamped to it, so no rotation unseen in
    pretraining ever appears.

    Args:
        n_global: number of leading ("sink") tokens every query may see. Paper: 10-100.
        n_local: size of the local causal window, in tokens. ``None`` = the model's
            ``max_position_embeddings`` (the pretraining length), as in the paper.
        limit_distance: clamped relative distance used for global-branch keys outside the window.
            ``None`` = ``n_local``.
        bounded_cache: make ``generate()`` keep only ``n_global + n_local`` tokens per layer (constant
            memory and time per decoded token). ``False`` keeps HF's full cache (same outputs).
        query_chunk: queries processed per step by the CPU/PyTorch path (memory vs. speed).
        decode: how ``generate()`` decodes with the bounded cache (same outputs in every mode):

            * ``"eager"``: the ring cache returns data-dependent shapes; no CUDA graphs.
            * ``"static"``: a preallocated ``n_global + n_local``-slot cache whose write index, token
              positions and validity live on the device, and a one-query attention step with fixed shapes
              and no host synchronisation (runs anywhere; the building block of ``"cuda_graph"``).
            * ``"cuda_graph"``: ``"static"`` plus CUDA-graph replay of every one-token decode forward
              (CUDA only; removes the per-step host overhead that bounds HF eager decoding). Prefill stays eager.
    """

    n_global: int = 10
    n_local: int | None = None
    limit_distance: int | None = None
    bounded_cache: bool = True
    query_chunk: int = 1024
    decode: str = "eager"

    def __post_init__(self) -> None:
        # Normalised values are stored back (numpy ints -> int) so equal configs compare and hash equal.
        owner = type(self).__name__
        ints = {
            "n_global": check_int(owner, "n_global", self.n_global, min=0),
            "n_local": check_int(owner, "n_local", self.n_local, min=1, allow_none=True),
            "limit_distance": check_int(owner, "limit_distance", self.limit_distance, min=1, allow_none=True),
            "query_chunk": check_int(owner, "query_chunk", self.query_chunk, min=1),
        }
        for name, value in ints.items():
            object.__setattr__(self, name, value)
        check_bool(owner, "bounded_cache", self.bounded_cache)
        check_choice(owner, "decode", self.decode, _DECODE_MODES)
        if self.decode != "eager" and not self.bounded_cache:
            raise ConfigError(
                f"LMInfiniteConfig.decode={self.decode!r} needs bounded_cache=True (it is a mode of the bounded cache)"
            )

    def resolved(self, max_position_embeddings: int) -> LMInfiniteConfig:
        """Fill the ``None`` defaults from the model's pretraining length."""
        n_local = self.n_local
        if n_local is None:  # only then is the model's length needed (some configs leave it None)
            n_local = check_int("LMInfiniteConfig.resolved", "max_position_embeddings", max_position_embeddings, min=1)
        limit = self.limit_distance if self.limit_distance is not None else n_local
        return replace(self, n_local=n_local, limit_distance=limit)
