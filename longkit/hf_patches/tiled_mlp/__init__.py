"""Tiled MLP: each decoder layer's MLP runs over ``chunk_size``-token tiles and recomputes them in backward, so its
intermediates never exist for the whole sequence (issue #26; the sequence-tiled MLP of ALST).

``install(model, TiledMLPConfig(...))`` / ``uninstall(model, undo)`` patch one model instance (:mod:`.patch`); the
math is :func:`.function.tiled_apply`.
"""

from __future__ import annotations

from ...config import TiledMLPConfig
from .function import tiled_apply
from .patch import config_of, install, uninstall

__all__ = ["TiledMLPConfig", "install", "uninstall", "config_of", "tiled_apply"]
