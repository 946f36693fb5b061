"""longkit: long-sequence techniques as small adapters for transformers, TRL, DeepSpeed and vLLM,
on one shared Triton kernel package.

Importing ``longkit`` imports no optional host library (transformers, Triton, DeepSpeed, vLLM).
"""

from __future__ import annotations

from typing import Any

from .config import (
    ActivationOffloadConfig,
    KVCacheConfig,
    LMInfiniteConfig,
    MemoryConfig,
    PrefixSharingConfig,
    RopeConfig,
    TiledLossConfig,
    TiledMLPConfig,
)
from .errors import ConfigError, HostVersionError, LongkitError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "apply_patches",
    "remove_patches",
    "patched",
    "LMInfiniteConfig",
    "RopeConfig",
    "PrefixSharingConfig",
    "TiledLossConfig",
    "TiledMLPConfig",
    "ActivationOffloadConfig",
    "MemoryConfig",
    "KVCacheConfig",
    "register_rope_types",
    "LongkitError",
    "UnsupportedModelError",
    "HostVersionError",
    "ConfigError",
    "__version__",
]


def apply_patches(model: Any, **features: Any) -> Any:
    """Switch a transformers model instance to longkit techniques; see :func:`longkit.hf_patches.apply_patches`."""
    from .hf_patches import apply_patches as _apply

    return _apply(model, **features)


def remove_patches(model: Any) -> Any:
    """Undo every longkit patch on ``model``; see :func:`longkit.hf_patches.remove_patches`."""
    from .hf_patches import remove_patches as _remove

    return _remove(model)


def patched(model: Any, **features: Any):
    """Context manager that applies patches and restores the model; see :func:`longkit.hf_patches.patched`."""
    from .hf_patches import patched as _patched

    return _patched(model, **features)


def register_rope_types() -> None:
    """Register the Giraffe RoPE types (``giraffe_power``, ``giraffe_truncated``) in transformers.

    Call it before building or loading (``from_pretrained``) a model whose ``config.rope_parameters`` names one
    of them; ``apply_patches(model, rope=...)`` calls it itself. Idempotent; imports transformers.
    """
    from .hf_patches.rope import register

    register()
