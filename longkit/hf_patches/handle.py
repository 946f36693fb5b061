"""Per-model record of what longkit patched, so it can be undone exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PatchHandle"]

HANDLE_ATTR = "_longkit_patches"


@dataclass
class PatchHandle:
    """What ``apply_patches`` did to one model instance; ``remove()`` undoes it (also as a context manager)."""

    model: Any
    configs: dict[str, Any] = field(default_factory=dict)
    undo: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name}={cfg} ({self.undo[name].get('touched', '?')} modules)" for name, cfg in self.configs.items()]
        return "longkit patches: " + (", ".join(parts) if parts else "none")

    def remove(self) -> None:
        from .registry import TECHNIQUES

        for name in reversed(list(self.undo)):
            TECHNIQUES[name].uninstall(self.model, self.undo.pop(name))
            self.configs.pop(name, None)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.remove()
