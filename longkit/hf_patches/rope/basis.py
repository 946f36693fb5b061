"""Giraffe's RoPE frequency bases (Pal et al., "Giraffe: Adventures in Expanding Context Lengths in LLMs",
arXiv 2308.10882), as plain functions of the standard frequencies. No transformers import.

Notation: rotary dim ``d`` (even), base ``θ``, pair index ``i = 0 .. d/2-1``, standard frequencies
``f_i = θ^(-2i/d)`` (radians per position, highest first).
"""

from __future__ import annotations

import torch

__all__ = ["standard_inv_freq", "power_basis", "truncated_basis"]


def standard_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``f_i = base^(-2i/dim)`` for ``i < dim/2``: fp32 ``[dim // 2]`` (the same arithmetic as transformers')."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponent)


def power_basis(inv_freq: torch.Tensor, power: float) -> torch.Tensor:
    """Power basis: ``f_i' = f_i · (1 - 2i/d)^power`` with ``d = 2 · len(inv_freq)``.

    The factor falls from 1 (``i = 0``, the fastest frequency, unchanged) to ``(2/d)^power`` (the slowest), so
    slow frequencies are stretched the most; ``power = 0`` returns the basis unchanged.
    """
    half = inv_freq.shape[-1]
    shrink = 1.0 - torch.arange(half, dtype=torch.float32, device=inv_freq.device) / half  # 1 - 2i/d, > 0
    return inv_freq * shrink.pow(power).to(inv_freq.dtype)


def truncated_basis(inv_freq: torch.Tensor, a: float, b: float, rho: float) -> torch.Tensor:
    """Truncated basis: ``f_i`` if ``f_i >= b``; ``rho`` if ``a < f_i < b``; ``0`` if ``f_i <= a``.

    Fast frequencies (a full turn within the training length when ``b = 2π/L``) are kept; the middle band is
    replaced by one slow frequency ``rho`` so positions stay distinguishable; the slowest stop rotating (their
    pairs carry no position, equally valid at any length). ``a = b = 0`` returns the basis unchanged.
    """
    middle = torch.full_like(inv_freq, rho)
    out = torch.where(inv_freq > a, middle, torch.zeros_like(inv_freq))
    return torch.where(inv_freq >= b, inv_freq, out)
