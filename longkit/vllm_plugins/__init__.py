"""vLLM plugins: the ``longkit_suffix`` speculative-decoding drafter (suffix matching + copying), a guard that
refuses longkit's Giraffe RoPE types (which vLLM does not implement) when a model config is built, and a packed
low-bit KV cache for vLLM's CPU platform (``additional_config={"longkit_kv_cache": {...}}``).

``register`` is the ``vllm.general_plugins`` entry point (``longkit = "longkit.vllm_plugins:register"``).
vLLM calls it in every process it starts (API server or ``LLM`` process, engine core, workers),
possibly more than once, so it is idempotent. It checks the vLLM version, then applies :data:`INSTALLERS` in
order; each installer is idempotent itself and changes nothing in vLLM until a user asks for its feature
(e.g. ``--speculative-config '{"method": "longkit_suffix", ...}'``; the RoPE guard acts only on a checkpoint whose
``rope_type`` is a Giraffe type). See ``docs/vllm_spec.md`` and :mod:`.rope_guard`.
"""

from __future__ import annotations

import importlib
import logging
from typing import NamedTuple

__all__ = ["INSTALLERS", "Installer", "is_registered", "register"]


class Installer(NamedTuple):
    """One feature the plugin adds to vLLM: ``module:function`` (idempotent, imported lazily) and what it adds."""

    target: str
    adds: str

    def __call__(self) -> None:
        module, function = self.target.split(":")
        getattr(importlib.import_module(module), function)()


# Applied in this order by register(); a new feature (e.g. a KV-cache backend) appends its installer here.
INSTALLERS: tuple[Installer, ...] = (
    Installer("longkit.vllm_plugins.spec.method:install_method_alias", "speculative method 'longkit_suffix'"),
    Installer("longkit.vllm_plugins.rope_guard:install_rope_guard", "Giraffe rope_type refused at model config"),
    Installer("longkit.vllm_plugins.kv_cache.install:install_kv_cache", "packed KV cache (additional_config "
              "'longkit_kv_cache', CPU)"),
)

_registered = False


def register() -> None:
    """Entry point for ``vllm.general_plugins``: version check, then every installer of :data:`INSTALLERS`.

    Raises:
        HostVersionError: the installed vLLM is outside the supported range (the message names the
            versions, ``pip install 'vllm>=0.32,<0.33'``, ``LONGKIT_SKIP_VERSION_CHECK=1`` and
            ``VLLM_PLUGINS`` to leave longkit out).
    """
    global _registered
    if _registered:
        return
    from .._compat import require_host
    from ..errors import HostVersionError

    try:
        version = require_host("vllm", "longkit's vLLM plugin")
    except HostVersionError as e:
        raise HostVersionError(
            f"{e}. To run vLLM without longkit's plugin, set VLLM_PLUGINS to a list without 'longkit'."
        ) from None
    for installer in INSTALLERS:
        installer()
    _registered = True
    # A child of vLLM's logger, so the line appears in vLLM's log with the process name of each process
    # that loaded the plugin (main, EngineCore, workers).
    logging.getLogger("vllm.plugins.longkit").info(
        "longkit plugin registered (vllm %s): %s", version, "; ".join(i.adds for i in INSTALLERS)
    )


def is_registered() -> bool:
    """Whether :func:`register` has run in this process (tests use it to prove every process loads it)."""
    return _registered
