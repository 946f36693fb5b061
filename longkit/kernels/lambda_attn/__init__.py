"""Λ-shaped attention with LM-Infinite's distance limit over *positions* (padding and evicted caches).

The index-based, kernel form of the same rule is :func:`longkit.kernels.masked_attention` with
:func:`longkit.kernels.sink_window` and ``q_global``/``k_global``; this module is the position-aware
plain-PyTorch path used on CPU, with left padding, and with bounded (evicting) caches.
"""

from .naive import LambdaPositions, chunked_lambda_attention, dense_lambda_attention

__all__ = ["LambdaPositions", "chunked_lambda_attention", "dense_lambda_attention"]
