"""longkit's shared kernels: one functional API, Triton on CUDA, plain PyTorch (``naive``) elsewhere.

Importing this package does not import Triton; kernels load it on first use.
"""

from __future__ import annotations

from .masked_attn import masked_attention, naive_masked_attention
from .masks import AttentionMask, causal, documents, shared_prefix, sink_window

__all__ = [
    "masked_attention",
    "naive_masked_attention",
    "AttentionMask",
    "causal",
    "sink_window",
    "documents",
    "shared_prefix",
]
