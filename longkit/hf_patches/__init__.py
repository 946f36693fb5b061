"""Adapters that switch a Hugging Face model instance to longkit techniques.

``longkit.apply_patches(model, lm_infinite=...)`` is the entry point; every technique registers through
transformers' public registries (``AttentionInterface``, ``AttentionMaskInterface``, ...) under a
``longkit_*`` key and switches only the given model to it. Built: LM-Infinite, Giraffe RoPE types
(``rope=``), prefix sharing (``prefix_sharing=``; TRL trainers in :mod:`.prefix_sharing`); PIE's editable cache
lives in :mod:`.pie` (a cache holder, not a patch).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from .._compat import require_host
from ..errors import ConfigError, UnsupportedModelError
from .attention import check_model
from .handle import HANDLE_ATTR, PatchHandle
from .registry import TECHNIQUES

__all__ = ["apply_patches", "remove_patches", "patched", "get_patches"]


def _as_config(name: str, value: Any):
    cls = TECHNIQUES[name].config_cls
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as e:
            raise ConfigError(f"bad options for {name}: {e}. Valid options: {list(cls.__dataclass_fields__)}") from e
    raise ConfigError(f"{name} must be True, a dict of options or a {cls.__name__}, got {value!r}")


def apply_patches(model: Any, **features: Any) -> Any:
    """Switch ``model`` (this instance only) to the given longkit techniques and return it.

    Args:
        model: a transformers ``PreTrainedModel`` (Llama, Qwen2, Qwen3 or Mistral family).
        **features: technique name -> ``True`` (defaults), a dict of options or its config dataclass,
            e.g. ``lm_infinite=LMInfiniteConfig(n_global=10, n_local=4096)``. ``False``/``None`` skips it.

    Returns:
        The same model. Idempotent: applying the same configuration again changes nothing; a different
        configuration for an already applied technique replaces it. Undo with :func:`remove_patches`.

    Raises:
        ConfigError: unknown technique name or bad options.
        UnsupportedModelError: model type or architecture the technique cannot handle.
        HostVersionError: transformers outside the tested range.

    Examples::

        >>> model = longkit.apply_patches(model, lm_infinite=True)       # doctest: +SKIP
        >>> out = model.generate(ids, max_new_tokens=64)                  # bounded cache, Λ attention
    """
    unknown = sorted(set(features) - set(TECHNIQUES))
    if unknown:
        raise ConfigError(f"unknown longkit feature(s) {unknown}; available: {sorted(TECHNIQUES)}")
    wanted = {k: _as_config(k, v) for k, v in features.items() if v is not None and v is not False}
    if not wanted:
        raise ConfigError(f"apply_patches got no feature to apply; available: {sorted(TECHNIQUES)}")
    require_host("transformers", "longkit.apply_patches")
    for name in wanted:
        check_model(model, name, TECHNIQUES[name].model_types)
    handle: PatchHandle = getattr(model, HANDLE_ATTR, None) or PatchHandle(model)
    try:
        _install_all(model, handle, wanted)
    finally:  # also after a refused technique: what was installed stays recorded, so remove_patches undoes it
        if handle.undo:
            setattr(model, HANDLE_ATTR, handle)
    return model


def _install_all(model: Any, handle: PatchHandle, wanted: dict[str, Any]) -> None:
    for name, cfg in wanted.items():
        if handle.configs.get(name) == cfg:
            continue  # idempotent
        later: list[tuple[str, Any]] = []
        if name in handle.undo:
            # Techniques applied after this one may build on it (memory and kv_cache stack on lm_infinite): take
            # them off first, newest first, and put them back on top of the new configuration.
            names = list(handle.undo)
            for other in reversed(names[names.index(name) + 1:]):
                TECHNIQUES[other].uninstall(model, handle.undo.pop(other))
                later.insert(0, (other, handle.configs.pop(other)))
            TECHNIQUES[name].uninstall(model, handle.undo.pop(name))
            handle.configs.pop(name, None)
        for tech, tech_cfg in [(name, cfg), *later]:
            undo = TECHNIQUES[tech].install(model, tech_cfg)
            if not undo.get("touched"):
                raise UnsupportedModelError(f"{tech}: patch touched nothing in {type(model).__name__}")
            handle.configs[tech], handle.undo[tech] = tech_cfg, undo


def remove_patches(model: Any) -> Any:
    """Undo every longkit patch on ``model`` (no-op if none) and return it."""
    handle: PatchHandle | None = getattr(model, HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
    return model


def get_patches(model: Any) -> PatchHandle | None:
    """The :class:`PatchHandle` of a patched model, or ``None``."""
    return getattr(model, HANDLE_ATTR, None)


@contextmanager
def patched(model: Any, **features: Any):
    """Context manager: ``with longkit.patched(model, lm_infinite=True): ...`` patches, then restores."""
    already = get_patches(model)
    before = dict(already.configs) if already else {}
    apply_patches(model, **features)
    try:
        yield model
    finally:
        handle = get_patches(model)
        if handle is not None:
            for name in reversed(list(handle.undo)):  # newest first: a technique may sit on an earlier one
                if name not in before:
                    TECHNIQUES[name].uninstall(model, handle.undo.pop(name))
                    handle.configs.pop(name)
            if before:
                apply_patches(model, **before)
            elif not handle.undo:
                remove_patches(model)

