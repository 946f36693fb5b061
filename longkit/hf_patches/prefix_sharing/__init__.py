"""Prefix sharing: rows that share a prompt (a DPO pair, a GRPO group) compute it once, with the same results.

``longkit.apply_patches(model, prefix_sharing=True)`` patches a model instance (:mod:`.patch`); the TRL trainers
in :mod:`.trl` (``PrefixSharingDPOTrainer``, ``PrefixSharingGRPOTrainer``, ``PrefixSharingRLOOTrainer``) patch the
policy and the reference model for you. See ``docs/prefix_sharing.md``.
"""

from __future__ import annotations

from typing import Any

from ...config import PrefixSharingConfig

__all__ = ["PrefixSharingConfig", "PrefixSharingDPOTrainer", "PrefixSharingGRPOTrainer",
           "PrefixSharingRLOOTrainer"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    # the trainers import TRL (heavy, optional): only on first use
    if name in ("PrefixSharingDPOTrainer", "PrefixSharingGRPOTrainer", "PrefixSharingRLOOTrainer"):
        from . import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
