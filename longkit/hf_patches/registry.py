"""Which techniques exist and which model types each supports (dispatch on ``config.model_type``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import LMInfiniteConfig

__all__ = ["Technique", "TECHNIQUES", "SUPPORTED_MODEL_TYPES"]


@dataclass(frozen=True)
class Technique:
    """One ``apply_patches`` keyword: its config class, supported model types and installer."""

    name: str
    config_cls: type
    model_types: frozenset[str]
    install: Callable[[Any, Any], dict[str, Any]]
    uninstall: Callable[[Any, dict[str, Any]], None]


def _lm_infinite_install(model, cfg):
    from . import lm_infinite

    return lm_infinite.install(model, cfg)


def _lm_infinite_uninstall(model, undo):
    from . import lm_infinite

    lm_infinite.uninstall(model, undo)


SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})

TECHNIQUES: dict[str, Technique] = {
    "lm_infinite": Technique("lm_infinite", LMInfiniteConfig, SUPPORTED_MODEL_TYPES,
                             _lm_infinite_install, _lm_infinite_uninstall),
}
