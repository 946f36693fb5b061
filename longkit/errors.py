"""Exceptions raised by longkit. Each message says what is wrong and how to fix it."""

__all__ = ["LongkitError", "UnsupportedModelError", "HostVersionError", "ConfigError"]


class LongkitError(Exception):
    """Base class of every longkit error."""


class UnsupportedModelError(LongkitError, TypeError):
    """The model (its ``config.model_type`` or its attention layout) is not supported by a technique."""


class HostVersionError(LongkitError, ImportError):
    """An installed host library (transformers, TRL, DeepSpeed, vLLM, ...) is outside the tested range."""


class ConfigError(LongkitError, ValueError):
    """A technique option or a config section is malformed."""
