"""Masked (causal / sink-window / documents / shared-prefix) flash attention and its reference.

One public function, :func:`masked_attention`, and its plain-PyTorch reference :func:`naive_masked_attention`. The
modules are cut by role, and each imports only from the layers below it:

1. ``interface.py``: the public function (validation, dispatch) and the Triton path as ``torch.library`` custom ops
   with autograd. It imports the layers below (and with them Triton) on first use, so ``import longkit`` does not.
2. Launch and plan (host code): ``launch.py`` (forward and backward launchers) and ``launch_hopper.py`` (the Hopper
   kernels' descriptors and launches) act on the decisions of ``plan.py`` (which kernel runs, how its work is cut)
   with the tiles of ``configs.py``. Tuning variables are read through ``longkit/kernels/envs.py``.
3. Kernels (``@triton.jit`` only): ``fwd.py`` / ``bwd.py``, the pointer kernels for every mask on any GPU;
   ``fwd_ws.py`` (warp-specialised causal / Λ forward) and ``dkdv_tma.py`` (TMA dk/dv), for Hopper.
4. Shared pieces: ``_jit.py`` (the visibility rule and the block schedule, device side), ``tma_ws.py`` (what the
   warp-specialised kernels share), ``tables.py`` (the per-token mask tables, host side), ``_interpreter.py``
   (a Triton interpreter fix for the CPU test tier).

``naive.py`` (dense fp32 math) is the CPU path and the tests' oracle.

How the kernels work, in short: one program per (query block, batch × query head) forward and for dq, one per
(kv block, batch × kv head) for dk/dv; GQA by index, K/V never repeated. The mask is never materialised: per block a
schedule visits only the blocks that can be visible, skips the elementwise mask on blocks proven fully visible, and
reads documents and shared-prefix segments from small per-token tables. Scores use ``exp2`` with ``log2(e)`` folded
into the scale, fp32 accumulation; ``lse`` is the natural log of the sum of ``exp(scale q·k)``. The backward has no
atomics (deterministic). Each module's docstring has the details of its part.
"""

from __future__ import annotations

from .interface import masked_attention
from .naive import naive_masked_attention

__all__ = ["masked_attention", "naive_masked_attention"]
