"""vLLM plugins: the ``longkit_suffix`` speculative-decoding drafter (suffix matching + copying).

``register`` is the ``vllm.general_plugins`` entry point (``longkit = "longkit.vllm_plugins:register"``).
vLLM calls it in every process it starts (API server or ``LLM`` process, engine core, workers),
possibly more than once, so it is idempotent. It checks the vLLM version and makes
``--speculative-config '{"method": "longkit_suffix", ...}'`` available; nothing else in vLLM changes
until a user asks for the drafter. See ``docs/vllm_spec.md``.
"""

from __future__ import annotations

import logging

__all__ = ["is_registered", "register"]

_registered = False


def register() -> None:
    """Entry point for ``vllm.general_plugins``: version check + the ``longkit_suffix`` method name.

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
    from .spec.method import install_method_alias

    install_method_alias()
    _registered = True
    # A child of vLLM's logger, so the line appears in vLLM's log with the process name of each process
    # that loaded the plugin (main, EngineCore, workers).
    logging.getLogger("vllm.plugins.longkit").info(
        "longkit plugin registered: speculative method 'longkit_suffix' available (vllm %s)", version
    )


def is_registered() -> bool:
    """Whether :func:`register` has run in this process (tests use it to prove every process loads it)."""
    return _registered
