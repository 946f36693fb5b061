"""RoPE (re-)rotation: shift already-rotated vectors by a per-position delta.

RoPE rotations compose, ``R(a)·R(b) = R(a + b)``, so a post-RoPE key at position ``p`` becomes the
key at ``p + Δ`` by one more rotation: used by LM-Infinite's distance limit and by KV-cache edits.
"""

from .naive import naive_rope_rotate, rope_angles, rotate_with

__all__ = ["naive_rope_rotate", "rope_angles", "rotate_with"]
