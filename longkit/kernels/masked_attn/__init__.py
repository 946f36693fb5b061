"""Masked (causal / sink-window / documents / shared-prefix) flash attention and its reference."""

from __future__ import annotations

from .interface import masked_attention
from .naive import naive_masked_attention

__all__ = ["masked_attention", "naive_masked_attention"]
