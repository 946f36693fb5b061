"""Technique options: small frozen dataclasses validated on construction.

The same dataclasses are meant to be parsed from the DeepSpeed ``"longkit"`` config section and from
vLLM arguments, so one name means one thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
        if not isinstance(self.n_global, int) or self.n_global < 0:
            raise ConfigError(f"LMInfiniteConfig.n_global must be an int >= 0, got {self.n_global!r}")
        if self.n_local is not None and (not isinstance(self.n_local, int) or self.n_local < 1):
            raise ConfigError(f"LMInfiniteConfig.n_local must be an int >= 1 or None, got {self.n_local!r}")
        if self.limit_distance is not None and (
            not isinstance(self.limit_distance, int) or self.limit_distance < 1
        ):
            raise ConfigError(
                f"LMInfiniteConfig.limit_distance must be an int >= 1 or None, got {self.limit_distance!r}"
            )
        if self.query_chunk < 1:
            raise ConfigError(f"LMInfiniteConfig.query_chunk must be >= 1, got {self.query_chunk!r}")
        if self.decode not in _DECODE_MODES:
            raise ConfigError(f"LMInfiniteConfig.decode must be one of {list(_DECODE_MODES)}, got {self.decode!r}")
        if self.decode != "eager" and not self.bounded_cache:
            raise ConfigError(
                f"LMInfiniteConfig.decode={self.decode!r} needs bounded_cache=True (it is a mode of the bounded cache)"
            )

    def resolved(self, max_position_embeddings: int) -> LMInfiniteConfig:
        """Fill the ``None`` defaults from the model's pretraining length."""
        n_local = self.n_local if self.n_local is not None else int(max_position_embeddings)
        limit = self.limit_distance if self.limit_distance is not None else n_local
        return replace(self, n_local=n_local, limit_distance=limit)
