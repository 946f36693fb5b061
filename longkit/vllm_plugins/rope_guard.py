"""Refuse the Giraffe RoPE types in vLLM when the model config is built, with longkit's message.

A model fine-tuned with ``longkit.RopeConfig(rope_type="giraffe_power" | "giraffe_truncated")`` saves that
``rope_type`` in its ``config.json``. vLLM implements neither. Without this guard (vLLM 0.32) the config is
accepted: transformers' ``validate_rope`` only warns ("Missing validation function ... for 'rope_type'=
'giraffe_power'"), ``vllm/config/model.py::_get_and_verify_max_len`` multiplies ``max_model_len`` by the Giraffe
``factor`` as if it were linear scaling, the engine core and workers start, and the worker's model build fails in
``vllm/model_executor/layers/rotary_embedding/__init__.py::get_rope`` with ``ValueError: Unknown RoPE scaling type
giraffe_power`` (or, with ``model_impl="transformers"``, ``KeyError: 'giraffe_power'`` in transformers'
``ROPE_INIT_FUNCTIONS``), which reaches the user as "Engine core initialization failed. See root cause above".

The seam: ``vllm.config.model.ModelConfig.get_and_verify_max_len``, wrapped once with
:func:`~longkit.vllm_plugins.patching.wrap_method`. It is called exactly once, in ``ModelConfig.__post_init__``,
right after ``get_config`` parsed the checkpoint's config and ``patch_rope_parameters`` standardised its
``rope_parameters`` (overrides applied); its helper is the first code after parsing that acts on ``rope_type`` (the
max-length scaling above). So every ``ModelConfig`` (``LLM``, the API server, ``EngineArgs``, a speculative draft
model, direct construction) is checked in the process the user started, before any engine process is spawned. vLLM
has no documented hook for validating a model config. Not chosen: ``get_rope`` (it runs in the worker, after the
engine has started, and each model module imports it by name); transformers'
``_validate_<rope_type>_rope_parameters`` hook (it would make transformers refuse Giraffe in the whole process, and
``longkit.register_rope_types()`` registers those names); ``register_config_parser("hf")`` (documented, but for new
config formats: it would replace vLLM's HF parser for every model); ``EngineArgs.create_model_config`` (it misses
model configs built directly, such as a draft model's).

The error is :class:`~longkit.errors.UnsupportedModelError`, as for other RoPE types a longkit feature cannot
serve; being a ``TypeError``, it also passes through ``ModelConfig``'s pydantic validation as itself (a
``ValueError`` would reach the user wrapped in a pydantic ``ValidationError``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..config import GIRAFFE_ROPE_TYPES
from ..errors import HostVersionError, UnsupportedModelError

__all__ = ["TAG", "check_model_config", "giraffe_rope_types", "install_rope_guard", "uninstall_rope_guard"]

TAG = "longkit.rope_guard"
_METHOD = "get_and_verify_max_len"


def _rope_dicts(params: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(where, dict)`` for a flat ``rope_parameters`` dict, or one per layer type for a nested one."""
    if not isinstance(params, Mapping):
        return
    if "rope_type" in params or "type" in params:
        yield where, params
        return
    for key, value in params.items():  # nested by layer type ({"full_attention": {...}, ...}); None = NoPE
        if isinstance(value, Mapping):
            yield f"{where}[{key!r}]", value


def _configs(config: Any) -> list[tuple[str, Any]]:
    """``config`` and its sub-configs (``text_config``, ...), each with the prefix that names it."""
    out = [("", config)]
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and sub is not config:
            out.append((f"{name}.", sub))
    return out


def _find(configs: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for prefix, cfg in configs:
        for where, params in _rope_dicts(getattr(cfg, "rope_parameters", None), f"{prefix}rope_parameters"):
            rope_type = params.get("rope_type", params.get("type"))
            if rope_type in GIRAFFE_ROPE_TYPES:
                found.append((where, rope_type))
    return found


def giraffe_rope_types(config: Any) -> list[tuple[str, str]]:
    """Where a transformers config (and its sub-configs) names a Giraffe RoPE type.

    Args:
        config: a ``PretrainedConfig`` (or anything with ``rope_parameters`` and optional ``sub_configs``).

    Returns:
        ``[(where, rope_type), ...]``, e.g. ``[("rope_parameters", "giraffe_power")]`` or, nested by layer type,
        ``[("text_config.rope_parameters['full_attention']", "giraffe_truncated")]``; empty if none.
    """
    return _find(_configs(config))


def check_model_config(model_config: Any) -> None:
    """Raise if a vLLM ``ModelConfig`` (its ``hf_config``, sub-configs, ``hf_text_config``) uses a Giraffe RoPE type.

    Raises:
        UnsupportedModelError: a Giraffe ``rope_type``; the message names it, says vLLM has no implementation
            and gives the two fixes.
        HostVersionError: ``model_config`` has neither ``hf_config`` nor ``hf_text_config`` (vLLM changed
            where the seam runs).
    """
    hf_config = getattr(model_config, "hf_config", None)
    text_config = getattr(model_config, "hf_text_config", None)
    if hf_config is None and text_config is None:
        raise HostVersionError(
            f"{type(model_config).__qualname__}.{_METHOD} ran before hf_config/hf_text_config were set: this vLLM "
            "builds its model config differently from the versions longkit's RoPE guard supports"
        )
    configs = _configs(hf_config) if hf_config is not None else []
    if text_config is not None and all(text_config is not c for _, c in configs):
        configs.append(("", text_config))  # a text config vLLM found outside ``sub_configs``
    found = _find(configs)
    if not found:
        return
    uses = ", ".join(f"{rope_type!r} ({where})" for where, rope_type in found)
    model = getattr(model_config, "model", None)
    raise UnsupportedModelError(
        f"{model!r} has rope_type {uses} in its config.json, a Giraffe RoPE type that vLLM has no implementation "
        "of (its workers would fail building the model: vLLM's get_rope knows no Giraffe type). Fix: (1) serve it "
        "with transformers + longkit instead of vLLM (longkit.register_rope_types() before "
        "AutoModelForCausalLM.from_pretrained), or (2) convert the checkpoint's RoPE back to a type vLLM knows, such "
        "as 'linear' or 'yarn', and fine-tune it for that type (longkit.apply_patches(model, rope=longkit.RopeConfig("
        "rope_type='linear', factor=...)), then save_pretrained writes that rope_type); editing config.json alone is "
        "not enough: the weights were trained for the Giraffe frequencies"
    )


def install_rope_guard() -> bool:
    """Wrap ``vllm.config.model.ModelConfig.get_and_verify_max_len`` with :func:`check_model_config` (idempotent).

    Returns:
        ``True`` if installed now, ``False`` if it already was.

    Raises:
        HostVersionError: vLLM is outside the supported window, or ``ModelConfig`` has no
            ``get_and_verify_max_len`` (the host changed).
    """
    from .._compat import require_host

    require_host("vllm", "longkit's vLLM RoPE guard")
    from vllm.config.model import ModelConfig

    from .patching import wrap_method

    def make(orig: Any) -> Any:
        def get_and_verify_max_len(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_model_config(self)
            return orig(self, *args, **kwargs)

        return get_and_verify_max_len

    return wrap_method(ModelConfig, _METHOD, make, TAG)


def uninstall_rope_guard() -> bool:
    """Undo :func:`install_rope_guard`; ``False`` if it was not installed."""
    from vllm.config.model import ModelConfig

    from .patching import unwrap_method

    return unwrap_method(ModelConfig, _METHOD, TAG)
