"""Wrapping one host method, once: the only way longkit touches vLLM classes.

Modelled on ArcticInference's ``ArcticPatch``: a wrapper is installed at most once per process
(re-applying the same patch is a no-op, because vLLM loads plugins in every process and may load
them more than once); a *different* patch of the same attribute is refused; the original stays
reachable as ``cls._orig_<name>`` and is restored by :func:`unwrap_method`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ..errors import HostVersionError, LongkitError

__all__ = ["is_wrapped", "unwrap_method", "wrap_method"]

logger = logging.getLogger("longkit.vllm_plugins")
_TAG_ATTR = "__longkit_patch__"


def is_wrapped(cls: type, name: str, tag: str) -> bool:
    """Whether ``cls.name`` currently carries the longkit patch ``tag``."""
    return getattr(cls.__dict__.get(name), _TAG_ATTR, None) == tag


def wrap_method(
    cls: type, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]], tag: str
) -> bool:
    """Replace ``cls.name`` (defined on ``cls`` itself) with ``make_wrapper(original)``.

    Args:
        cls: the host class.
        name: method name; it must be defined in ``cls.__dict__`` (patching an inherited method on a
            subclass would silently miss sibling classes).
        make_wrapper: receives the original function and returns the replacement.
        tag: identifies this patch; applying the same tag again does nothing.

    Returns:
        ``True`` if installed now, ``False`` if it already was.

    Raises:
        HostVersionError: ``cls`` has no method ``name`` (the host changed).
        LongkitError: another longkit patch already wraps ``cls.name``.
    """
    current = cls.__dict__.get(name)
    if current is None:
        raise HostVersionError(
            f"{cls.__module__}.{cls.__qualname__}.{name} does not exist in this version of the host library; "
            "this longkit feature does not support it"
        )
    owner = getattr(current, _TAG_ATTR, None)
    if owner == tag:
        return False
    if owner is not None:
        raise LongkitError(f"{cls.__qualname__}.{name} is already wrapped by longkit patch {owner!r}; refusing {tag!r}")
    wrapper = functools.wraps(current)(make_wrapper(current))
    setattr(wrapper, _TAG_ATTR, tag)
    setattr(cls, f"_orig_{name}", current)
    setattr(cls, name, wrapper)
    logger.info("longkit: wrapped %s.%s (%s)", cls.__qualname__, name, tag)
    return True


def unwrap_method(cls: type, name: str, tag: str) -> bool:
    """Undo :func:`wrap_method`; returns ``False`` if ``cls.name`` was not wrapped by ``tag``."""
    if not is_wrapped(cls, name, tag):
        return False
    setattr(cls, name, cls.__dict__[f"_orig_{name}"])
    delattr(cls, f"_orig_{name}")
    return True
