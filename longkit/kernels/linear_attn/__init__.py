"""Decayed linear attention and the gated delta rule, with the chunk summaries LASP-2 sequence parallelism exchanges.

Public functions (layout ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, states ``[B, H, Dk, Dv]`` fp32):

* :func:`linear_attention`: ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` with a per-head decay
  ``log_decay [H]`` (lightning attention / MiniMax, RetNet) or per-token gates ``[B, H, T]`` (simple GLA); initial
  state in, final state out, gradients for all of them. Triton on CUDA, chunked PyTorch elsewhere.
* :func:`linear_attention_summary`: one chunk's ``(state, total log decay)``; ``S_end = exp(total) S_in + state``.
* :func:`gated_delta_rule`: Gated DeltaNet as transformers' Qwen3-Next torch path computes it (chunked PyTorch on
  every device for now). :func:`gated_delta_summary`: ``(state, A)`` with ``S_end = A S_in + state``.

The modules are cut by role, as ``masked_attn/``:

1. ``interface.py``: validation, dispatch, the Triton path's autograd.
2. ``launch.py`` (host): grids, tiles, the chunk-local cumulative gates, the launches.
3. ``fwd.py`` / ``bwd.py``: ``@triton.jit`` kernels only.

``naive.py`` holds the token-by-token recurrences (``naive_*``, the tests' oracle) and the chunked PyTorch versions
(``chunk_*_torch``, ``*_summary_torch``: the CPU path).
"""

from __future__ import annotations

from .interface import gated_delta_rule, gated_delta_summary, linear_attention, linear_attention_summary
from .naive import (
    chunk_gated_delta_rule_torch,
    chunk_linear_attention_torch,
    gated_delta_summary_torch,
    linear_attention_summary_torch,
    naive_gated_delta_rule,
    naive_linear_attention,
)

__all__ = [
    "linear_attention",
    "linear_attention_summary",
    "gated_delta_rule",
    "gated_delta_summary",
    "naive_linear_attention",
    "naive_gated_delta_rule",
    "chunk_linear_attention_torch",
    "chunk_gated_delta_rule_torch",
    "linear_attention_summary_torch",
    "gated_delta_summary_torch",
]
