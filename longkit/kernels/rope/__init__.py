"""RoPE (re-)rotation: shift already-rotated vectors by a per-position delta.

RoPE rotations compose, ``R(a)·R(b) = R(a + b)``, so a post-RoPE key at position ``p`` becomes the
key at ``p + Δ`` by one more rotation: used by LM-Infinite's distance limit and by KV-cache edits (PIE).

One public function, :func:`rerotate_` (and its range form :func:`rerotate_range_`), and the plain-PyTorch
reference :func:`naive_rope_rotate` with its two halves :func:`rope_angles` / :func:`rotate_with`. The modules are
cut by role, as ``masked_attn/``:

1. ``interface.py``: validation, dispatch, the Triton path as the custom op ``torch.ops.longkit.rope_rerotate_``.
2. ``launch.py`` (host): tile and grid choice (``LONGKIT_ROPE_CONFIG`` through ``longkit/kernels/envs.py``), launch.
3. ``rerotate.py``: the ``@triton.jit`` kernel; one program per (token block, batch row × head group), cos/sin
   computed once per program in fp32 and reused across its heads, pairs rotated in fp32, stored in place.

``naive.py`` (fp32 math) is the CPU path and the tests' oracle.
"""

from .interface import rerotate_, rerotate_range_
from .naive import naive_rope_rotate, rope_angles, rotate_with

__all__ = ["rerotate_", "rerotate_range_", "naive_rope_rotate", "rope_angles", "rotate_with"]
