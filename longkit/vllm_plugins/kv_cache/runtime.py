"""The packed-KV options of this process's engine (set by the CPU model runner hook, read by the backend).

vLLM asks the backend class for its page layout (``customize_spec``, a classmethod) outside any config context,
so the options the runner hook validated are kept here for the process. One worker process serves one engine;
in a process that builds several engines (vLLM's in-process executor) each ``load_model`` sets them anew.
"""

from __future__ import annotations

from ...kernels.kv_quant.spec import KVQuantSpec

__all__ = ["activate", "active_spec", "deactivate", "is_active"]

_active: KVQuantSpec | None = None


def activate(spec: KVQuantSpec) -> None:
    """Make ``spec`` the options of the engine this process is building."""
    global _active
    _active = spec


def deactivate() -> None:
    """This process's next engine uses vLLM's dense cache."""
    global _active
    _active = None


def is_active() -> bool:
    return _active is not None


def active_spec() -> KVQuantSpec:
    """The options of this process's engine; raises ``RuntimeError`` when the packed cache was not activated."""
    if _active is None:
        raise RuntimeError(
            "longkit's packed KV-cache backend is in use but no options were activated in this process: it is "
            "selected by longkit's vLLM plugin from additional_config['longkit_kv_cache'] when the CPU model "
            "runner loads the model; do not select longkit.vllm_plugins.kv_cache.backend.PackedKVBackend directly")
    return _active
