"""Which techniques ``apply_patches`` knows, the config class of each and the module that installs it.

Each technique names one module exposing ``install(model, cfg) -> undo`` and ``uninstall(model, undo)``
(``undo`` must hold ``"touched"``: how many modules the patch changed). The module is imported on first use,
so ``import longkit`` stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..config import (
    ActivationOffloadConfig,
    KVCacheConfig,
    LMInfiniteConfig,
    MemoryConfig,
    PrefixSharingConfig,
    RopeConfig,
    TiledLossConfig,
    TiledMLPConfig,
)
from .attention import SUPPORTED_MODEL_TYPES

__all__ = ["Technique", "TECHNIQUES", "SUPPORTED_MODEL_TYPES"]


@dataclass(frozen=True)
class Technique:
    """One ``apply_patches`` keyword: its config class, supported model types and installing module."""

    name: str
    config_cls: type
    model_types: frozenset[str]
    module: str  # dotted path of the module with install(model, cfg) / uninstall(model, undo)

    def adapter(self) -> ModuleType:
        """The installing module (imported now)."""
        return importlib.import_module(self.module)

    def install(self, model: Any, cfg: Any) -> dict[str, Any]:
        return self.adapter().install(model, cfg)

    def uninstall(self, model: Any, undo: dict[str, Any]) -> None:
        self.adapter().uninstall(model, undo)


TECHNIQUES: dict[str, Technique] = {
    "lm_infinite": Technique("lm_infinite", LMInfiniteConfig, SUPPORTED_MODEL_TYPES,
                             "longkit.hf_patches.lm_infinite"),
    "memory": Technique("memory", MemoryConfig, SUPPORTED_MODEL_TYPES, "longkit.hf_patches.inf_memory"),
    "rope": Technique("rope", RopeConfig, SUPPORTED_MODEL_TYPES, "longkit.hf_patches.rope"),
    "prefix_sharing": Technique("prefix_sharing", PrefixSharingConfig, SUPPORTED_MODEL_TYPES,
                                "longkit.hf_patches.prefix_sharing.patch"),
    "tiled_loss": Technique("tiled_loss", TiledLossConfig, SUPPORTED_MODEL_TYPES, "longkit.hf_patches.tiled_loss"),
    "tiled_mlp": Technique("tiled_mlp", TiledMLPConfig, SUPPORTED_MODEL_TYPES, "longkit.hf_patches.tiled_mlp"),
    "activation_offload": Technique("activation_offload", ActivationOffloadConfig, SUPPORTED_MODEL_TYPES,
                                    "longkit.offload"),
    "kv_cache": Technique("kv_cache", KVCacheConfig, SUPPORTED_MODEL_TYPES, "longkit.hf_patches.kv_cache"),
}
