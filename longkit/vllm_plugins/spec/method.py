"""The ``"method": "longkit_suffix"`` spelling of ``--speculative-config``.

vLLM validates ``SpeculativeConfig.method`` against a fixed list, so a new method name cannot be
registered. What can be done without touching that schema: rewrite the user's dict *before* vLLM
builds the config. ``EngineArgs.create_speculative_config`` is wrapped (once per process) so that

    {"method": "longkit_suffix", ...}  ->  {"method": "custom_class",
                                            "model": "longkit.vllm_plugins.spec.SuffixProposer", ...}

and the drafter options are validated right there, in the process the user started, before vLLM
spawns its engine and workers (a bad value fails in seconds, with longkit's message on top).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ConfigError
from .config import SuffixSpecConfig
from .proposer import PROPOSER_PATH

__all__ = ["DEFAULT_NUM_SPECULATIVE_TOKENS", "METHOD", "install_method_alias", "rewrite_speculative_config"]

METHOD = "longkit_suffix"
DEFAULT_NUM_SPECULATIVE_TOKENS = 16
_TAG = "longkit.spec.method_alias"


def rewrite_speculative_config(engine_args: Any) -> None:
    """Turn ``longkit_suffix`` into vLLM's ``custom_class`` form in place and validate our options.

    Requests that do not name longkit are left untouched.

    Args:
        engine_args: vLLM ``EngineArgs`` (``speculative_config``, ``spec_method``, ``spec_model``,
            ``spec_tokens``, ``additional_config``).

    Raises:
        ConfigError: ``model`` combined with ``longkit_suffix``, or an invalid drafter option.
    """
    raw = engine_args.speculative_config
    spec_method = getattr(engine_args, "spec_method", None)
    if raw is not None and not isinstance(raw, Mapping):
        return  # already a SpeculativeConfig object: nothing to rewrite
    cfg = {str(k).replace("-", "_"): v for k, v in (raw or {}).items()}
    method = cfg.get("method", spec_method)
    ours = method == METHOD or (method in (None, "custom_class") and cfg.get("model") == PROPOSER_PATH)
    if not ours:
        return
    if method == METHOD:
        model = cfg.get("model", getattr(engine_args, "spec_model", None))
        if model not in (None, PROPOSER_PATH):
            raise ConfigError(
                f"speculative_config: method '{METHOD}' needs no draft model, but model={model!r} was given; "
                "remove 'model' (or --spec-model)"
            )
        if spec_method == METHOD:
            engine_args.spec_method = None  # vLLM would otherwise write it back into the dict
        cfg["method"] = "custom_class"
        cfg["model"] = PROPOSER_PATH
        if cfg.get("num_speculative_tokens") is None and getattr(engine_args, "spec_tokens", None) is None:
            cfg["num_speculative_tokens"] = DEFAULT_NUM_SPECULATIVE_TOKENS
    merged = dict(cfg)
    if getattr(engine_args, "spec_tokens", None) is not None:
        merged.setdefault("num_speculative_tokens", engine_args.spec_tokens)
    SuffixSpecConfig.from_vllm(merged, getattr(engine_args, "additional_config", None))
    engine_args.speculative_config = cfg


def install_method_alias() -> bool:
    """Wrap ``EngineArgs.create_speculative_config`` with :func:`rewrite_speculative_config` (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    from ..patching import wrap_method

    def make(orig: Any) -> Any:
        def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            rewrite_speculative_config(self)
            return orig(self, *args, **kwargs)

        return create_speculative_config

    return wrap_method(EngineArgs, "create_speculative_config", make, _TAG)
