"""Options of PIE (HF-only, so they live here rather than in ``longkit/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..._validate import check_bool, check_choice, check_int

__all__ = ["PIEConfig"]

_WINDOWS = ("line", "token")
_IMPLS = (None, "auto", "naive", "triton")


@dataclass(frozen=True)
class PIEConfig:
    """How an :class:`~.context.EditableContext` turns edits into cache updates.

    Args:
        window: what a text edit re-tokenizes. ``"line"`` (default): the whole edited line(s), widened to the
            enclosing token boundaries; ``"token"``: only the tokens that the edited characters touch.
        trim_common: drop the tokens that the old and the re-tokenized window share at both ends, so only
            tokens that really changed are replaced (fewer tokens to encode; shared trailing tokens are kept
            and re-rotated like the rest of the suffix).
        chunk_size: most tokens per forward when encoding (bounds activation memory of a long re-encode).
        rerotate_impl: passed to :func:`longkit.kernels.rope.rerotate_` as ``impl`` (``None`` = Triton on
            CUDA, the PyTorch reference elsewhere).
        refresh_tail: after a ``"pie"`` edit, re-encode the context's last ``refresh_tail`` tokens (those after
            the last edit only) instead of keeping their re-rotated entries: the tokens next to the generation
            point then see the edited text, at the cost of a forward over them. ``0`` (default) is PIE as published.
    """

    window: str = "line"
    trim_common: bool = True
    chunk_size: int = 2048
    rerotate_impl: str | None = None
    refresh_tail: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "window", self.window, _WINDOWS)
        check_bool(owner, "trim_common", self.trim_common)
        object.__setattr__(self, "chunk_size", check_int(owner, "chunk_size", self.chunk_size, min=1))
        object.__setattr__(self, "refresh_tail", check_int(owner, "refresh_tail", self.refresh_tail, min=0))
        if self.rerotate_impl is not None:
            check_choice(owner, "rerotate_impl", self.rerotate_impl, [c for c in _IMPLS if c is not None])
