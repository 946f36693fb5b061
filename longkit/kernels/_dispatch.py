"""Choose between the Triton kernels and the plain-PyTorch references.

Rule (STYLE.md, practice 6): ``impl=None``/``"auto"`` picks Triton for CUDA tensors and ``naive``
elsewhere, falling back to ``naive`` with one warning when Triton is missing on a CUDA machine; an
explicit request (``impl="triton"`` or ``LONGKIT_KERNEL_IMPL=triton``) that cannot be honoured raises.
Triton is never imported here (only looked up), so ``import longkit.kernels`` stays light.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from longkit.kernels import envs
from longkit.kernels.envs import triton_interpreting  # re-exported: part of this module's interface

__all__ = ["select_impl", "triton_available", "triton_interpreting", "IMPLS", "ENV_VAR"]

IMPLS = ("auto", "triton", "naive")
ENV_VAR = envs.KERNEL_IMPL
_warned: set[str] = set()


def triton_available() -> bool:
    """True when the ``triton`` package is installed (not imported)."""
    return importlib.util.find_spec("triton") is not None


def select_impl(impl: str | None, device: torch.device, op: str) -> str:
    """Return ``"triton"`` or ``"naive"`` for an op on ``device``.

    Args:
        impl: ``None``/``"auto"``, ``"triton"`` or ``"naive"``; ``None`` reads ``LONGKIT_KERNEL_IMPL``.
        device: device of the op's inputs.
        op: op name, used in messages.

    Raises:
        ValueError: unknown ``impl``.
        RuntimeError: ``"triton"`` explicitly requested but not installed, or the tensors are not on
            CUDA and ``TRITON_INTERPRET=1`` is not set.
    """
    source = "impl"
    if impl is None:
        impl = envs.kernel_impl()
        source = ENV_VAR
    impl = impl.lower()
    if impl not in IMPLS:
        raise ValueError(f"{source} must be one of {IMPLS}, got {impl!r}")
    if impl == "naive":
        return "naive"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: {source}='triton' was requested but Triton is not installed "
                "(pip install 'longkit[triton]'), or use impl='naive'"
            )
        if device.type != "cuda" and not envs.triton_interpreting():
            raise RuntimeError(
                f"{op}: {source}='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 "
                "to run the Triton kernel on CPU tensors (slow, for tests)"
            )
        return "triton"
    # auto
    if device.type == "cuda":
        if triton_available():
            return "triton"
        if op not in _warned:
            _warned.add(op)
            warnings.warn(
                f"{op}: Triton is not installed, falling back to the slow dense PyTorch reference "
                "(pip install 'longkit[triton]')", RuntimeWarning, stacklevel=3,
            )
        return "naive"
    return "naive"
