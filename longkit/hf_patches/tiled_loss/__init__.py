"""Tiled LM-head loss: a causal LM's training loss computed ``chunk_size`` tokens at a time, without the
``[tokens, vocab]`` logits (issue #26).

``install(model, TiledLossConfig(...))`` / ``uninstall(model, undo)`` patch one model instance (:mod:`.patch`); the
math is :func:`longkit.kernels.tiled_ce.tiled_cross_entropy`. With ``labels`` the patched forward returns the loss and
``logits=None``; without ``labels`` it is the stock forward.
"""

from __future__ import annotations

from ...config import TiledLossConfig
from .patch import config_of, install, uninstall

__all__ = ["TiledLossConfig", "install", "uninstall", "config_of"]
