"""Tiled LM head + cross-entropy: the loss of ``hidden @ weight.T`` and its gradients, never materialising ``[N, V]``.

One public function, :func:`tiled_cross_entropy`, and its full-logits reference :func:`naive_cross_entropy` (the
math of transformers' ``ForCausalLMLoss`` on already-shifted rows). The tiled function is plain PyTorch in
``interface.py`` (validation, the autograd function and its per-tile loop, CPU and CUDA alike); ``naive.py`` is the
tests' oracle. Memory: about ``chunk_size × V × 6`` bytes of tiles for 16-bit inputs plus an fp32 ``grad_weight``
accumulator (details in ``interface.py``).
"""

from __future__ import annotations

from .interface import tiled_cross_entropy
from .naive import naive_cross_entropy

__all__ = ["tiled_cross_entropy", "naive_cross_entropy"]
