"""Plain-PyTorch RoPE rotation by a per-position delta.

Two pairings of the head dimension exist: the half-split ``rotate_half`` convention of Llama/Qwen/Mistral in
transformers (pairs are dimensions ``i`` and ``i + D/2``, the default here) and the interleaved one of GPT-J/GPT-NeoX
style ``rotate_every_two`` code (pairs ``2i`` and ``2i + 1``, ``interleaved=True``). Pair ``i`` turns by the angle
``delta · inv_freq[i]`` either way.
"""

from __future__ import annotations

import torch

__all__ = ["naive_rope_rotate", "rope_angles", "rotate_with"]


def naive_rope_rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, *,
                      interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` by ``delta`` positions: ``x·cos(Δθ) + rotate_half(x)·sin(Δθ)``.

    Pure rotation (no ``attention_scaling``): a vector that already carries RoPE's scaling keeps it.

    Args:
        x: ``[B, H, T, D]`` vectors (any float dtype); ``D == 2 * inv_freq.numel()``.
        delta: ``[B, T]`` or ``[T]`` integer or float position shifts (may be negative).
        inv_freq: ``[D/2]`` RoPE inverse frequencies (``model.model.rotary_emb.inv_freq``).
        interleaved: pairs are dimensions ``(2i, 2i+1)`` (GPT-J style) instead of ``(i, i + D/2)``.

    Returns:
        ``[B, H, T, D]`` tensor of ``x``'s dtype, rotated in fp32.

    Examples::

        >>> x = torch.randn(1, 2, 5, 8); f = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
        >>> back = naive_rope_rotate(naive_rope_rotate(x, torch.full((5,), 3), f), torch.full((5,), -3), f)
        >>> torch.allclose(back, x, atol=1e-5)
        True
    """
    d = x.shape[-1]
    if d != 2 * inv_freq.numel():
        raise ValueError(
            f"head dim {d} != 2 * len(inv_freq) = {2 * inv_freq.numel()}: partial rotary embeddings are not supported"
        )
    cos, sin = rope_angles(delta, inv_freq, x.device)
    return rotate_with(x, cos, sin, interleaved=interleaved)


def rope_angles(delta: torch.Tensor, inv_freq: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``cos, sin`` of ``delta · inv_freq`` shaped ``[B|1, 1, T, D/2]`` (fp32), for :func:`rotate_with`."""
    if delta.dim() == 1:
        delta = delta[None]
    ang = delta.to(device=device, dtype=torch.float32)[:, None, :, None] * inv_freq.to(device, torch.float32)
    return torch.cos(ang), torch.sin(ang)


def rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by precomputed ``cos, sin`` ``[., ., T, D/2]`` in fp32; returns ``x.dtype``.

    Pairs are ``(i, i + D/2)`` (half-split), or ``(2i, 2i+1)`` with ``interleaved``.
    """
    xf = x.to(torch.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        # stack then flatten puts each rotated pair back at (2i, 2i+1)
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
