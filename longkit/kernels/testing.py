"""Tolerance helpers shared by longkit's kernel tests (and usable by anyone testing a kernel).

Rule (FlashAttention ``hopper/test_flash_attn.py``): compare the kernel and the input-dtype reference
against one high-precision reference and require ``max|out - ref| <= ratio * max|lowprec_ref - ref| +
floor``: the kernel may be at most ``ratio`` times as wrong as PyTorch itself in that dtype.
"""

from __future__ import annotations

import torch

__all__ = ["assert_close", "assert_rms_close", "mismatch_report"]


def mismatch_report(name: str, ref: torch.Tensor, out: torch.Tensor, bad: torch.Tensor, limit: float,
                    first: int = 5) -> str:
    """Human-readable failure: mismatch count, worst error and the first offending indices."""
    diff = (out.double() - ref.double()).abs()
    idx = bad.nonzero()[:first].tolist()
    samples = ", ".join(f"{tuple(i)}: out={out[tuple(i)].item():.6g} ref={ref[tuple(i)].item():.6g}" for i in idx)
    worst = diff.nan_to_num(float("inf")).max().item() if diff.numel() else 0.0
    return (f"{name}: {int(bad.sum())} / {bad.numel()} elements exceed {limit:.3g} (max |diff| = {worst:.3g}, "
            f"NaN in out: {int(torch.isnan(out).sum())}); first: {samples}")


def assert_close(
    name: str,
    ref: torch.Tensor,
    out: torch.Tensor,
    *,
    lowprec_ref: torch.Tensor | None = None,
    atol_floor: float = 1e-5,
    ratio: float = 2.0,
) -> None:
    """Assert ``max|out - ref| <= ratio * max|lowprec_ref - ref| + atol_floor`` (elementwise bound).

    Args:
        name: label used in the failure message (e.g. ``"dq"``).
        ref: high-precision reference (fp32/fp64), any shape.
        out: tensor under test, same shape.
        lowprec_ref: the reference computed in the input dtype; without it only ``atol_floor`` applies.
        atol_floor: noise floor added to the bound.
        ratio: how many times PyTorch's own low-precision error the kernel may reach.

    Raises:
        AssertionError: with mismatch count and the first indices. NaN/inf in ``out`` never pass
        (unless ``ref`` has the same non-finite value at that index).
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    ref64, out64 = ref.detach().double(), out.detach().double()
    same_nonfinite = (~torch.isfinite(ref64)) & (ref64 == out64)
    base = 0.0
    if lowprec_ref is not None:
        lp = (lowprec_ref.detach().double() - ref64).abs()
        lp = lp[torch.isfinite(lp)]
        base = lp.max().item() if lp.numel() else 0.0
    limit = ratio * base + atol_floor
    err = (out64 - ref64).abs()
    bad = ~((err <= limit) | same_nonfinite)
    if bool(bad.any()):
        raise AssertionError(mismatch_report(name, ref64, out64, bad, limit))


def assert_rms_close(name: str, ref: torch.Tensor, out: torch.Tensor, *, ratio: float = 5e-3,
                     lowprec_ref: torch.Tensor | None = None, lowprec_ratio: float = 2.0) -> None:
    """RMS rule (fla ``assert_close``): ``rms(out - ref) <= ratio * rms(ref)``, or, with ``lowprec_ref``,
    ``rms(out - ref) <= lowprec_ratio * rms(lowprec_ref - ref) + ratio * rms(ref)``.

    Raises:
        AssertionError: with the RMS values, the mismatch count at the elementwise ``4 * limit`` level
        and the first indices.
    """
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    ref64, out64 = ref.detach().double(), out.detach().double()
    fin = torch.isfinite(ref64)
    if bool((~torch.isfinite(out64) & fin).any()):
        bad = ~torch.isfinite(out64) & fin
        raise AssertionError(mismatch_report(name, ref64, out64, bad, 0.0))
    diff = (out64 - ref64)[fin]
    rms = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    ref_rms = ref64[fin].pow(2).mean().sqrt().item() if diff.numel() else 0.0
    limit = ratio * ref_rms
    if lowprec_ref is not None:
        lp = (lowprec_ref.detach().double() - ref64)[fin]
        limit += lowprec_ratio * (lp.pow(2).mean().sqrt().item() if lp.numel() else 0.0)
    if rms > limit:
        bad = ((out64 - ref64).abs() > 4 * limit) & fin
        raise AssertionError(f"{name}: rms error {rms:.3g} > limit {limit:.3g} (rms ref {ref_rms:.3g}); "
                             + mismatch_report(name, ref64, out64, bad, 4 * limit))
