"""The ``"longkit"`` section of a DeepSpeed JSON config: parsing and validation.

DeepSpeed keeps unknown top-level keys untouched (they stay in ``engine.config``), so longkit's options
live next to DeepSpeed's own::

    {
      "train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {"stage": 2},
      "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}
    }

Every key is checked here; a typo or a bad value raises :class:`~longkit.errors.ConfigError` naming the key,
the allowed values and an example, instead of being ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["SECTION", "SequenceParallelConfig", "ActivationOffloadConfig", "LongkitDSConfig", "parse_ds_config"]

SECTION = "longkit"
_EXAMPLE = '"longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}'
_SP_MODES = ("ulysses",)
_SP_MODES_LATER = ("lasp2",)
_ATTENTION = ("auto", "kernel", "sdpa")  # accepted names that are not built yet -> NotImplementedError, not "unknown"


def _check_keys(where: str, given: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed keys: {list(allowed)}. Example: {_EXAMPLE}")


@dataclass(frozen=True)
class SequenceParallelConfig:
    """``longkit.sequence_parallel``: how the sequence is split across ranks.

    Attributes:
        mode: ``"ulysses"`` (all-to-all: sequence shards <-> head shards around every attention).
        size: ranks per sequence-parallel group (1 turns sequence parallelism off). The world size must be
            a multiple of it; consecutive ranks form a group (keep a group inside one node: all-to-all is
            bandwidth-bound).
        attention: the attention over the gathered sequence: ``"kernel"`` (longkit's masked-attention
            kernel; its PyTorch reference on CPU), ``"sdpa"`` (``F.scaled_dot_product_attention`` with
            ``is_causal``; only for rows without packing or padding), or ``"auto"``: SDPA where it applies
            (PyTorch's fastest causal backend, e.g. cuDNN/flash on Hopper), the kernel for packed documents
            and padding (which SDPA could only take as a dense T x T mask).

    Sequences whose length is not a multiple of ``size`` are padded at the end by
    :meth:`~longkit.deepspeed_ext.SequenceParallel.shard_batch` (label -100; causal attention keeps the
    padding invisible to real tokens).
    """

    mode: str = "ulysses"
    size: int = 1
    attention: str = "auto"

    @classmethod
    def from_dict(cls, d: Any) -> SequenceParallelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"longkit.sequence_parallel must be an object, got {type(d).__name__}. "
                              f"Example: {_EXAMPLE}")
        _check_keys("longkit.sequence_parallel", d, ("mode", "size", "attention"))
        mode = d.get("mode", "ulysses")
        if mode in _SP_MODES_LATER:
            raise NotImplementedError(f"longkit.sequence_parallel.mode={mode!r} is not built yet (see README); "
                                      f"use one of {list(_SP_MODES)}")
        if mode not in _SP_MODES:
            raise ConfigError(f"longkit.sequence_parallel.mode must be one of {list(_SP_MODES)}, got {mode!r}")
        size = d.get("size", 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"longkit.sequence_parallel.size must be a positive integer, got {size!r}")
        attention = d.get("attention", "auto")
        if attention not in _ATTENTION:
            raise ConfigError(f"longkit.sequence_parallel.attention must be one of {list(_ATTENTION)}, got "
                              f"{attention!r}")
        return cls(mode=mode, size=size, attention=attention)


@dataclass(frozen=True)
class ActivationOffloadConfig:
    """``longkit.activation_offload`` (not built yet: only ``{"enabled": false}`` is accepted)."""

    enabled: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> ActivationOffloadConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"longkit.activation_offload must be an object, got {type(d).__name__}")
        enabled = d.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"longkit.activation_offload.enabled must be true or false, got {enabled!r}")
        if enabled:
            raise NotImplementedError("longkit.activation_offload is not built yet (see README); remove the key or "
                                      'set {"enabled": false}')
        _check_keys("longkit.activation_offload", d, ("enabled",))
        return cls(enabled=False)


@dataclass(frozen=True)
class LongkitDSConfig:
    """The whole ``"longkit"`` section."""

    sequence_parallel: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    activation_offload: ActivationOffloadConfig = field(default_factory=ActivationOffloadConfig)

    @classmethod
    def from_dict(cls, d: Any) -> LongkitDSConfig:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ConfigError(f'the "longkit" section must be an object, got {type(d).__name__}. Example: {_EXAMPLE}')
        _check_keys('the "longkit" section', d, ("sequence_parallel", "activation_offload"))
        return cls(
            sequence_parallel=SequenceParallelConfig.from_dict(d.get("sequence_parallel", {})),
            activation_offload=ActivationOffloadConfig.from_dict(d.get("activation_offload", {"enabled": False})),
        )


def load_ds_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Return a DeepSpeed config as a dict (a dict is returned as is; a path is read as JSON)."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, got {type(data).__name__}")
        return data
    raise ConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def parse_ds_config(config: dict[str, Any] | str | Path) -> LongkitDSConfig:
    """Read and validate the ``"longkit"`` section of a DeepSpeed config (dict or JSON path).

    A config without the section gives the defaults (sequence parallelism off).
    """
    return LongkitDSConfig.from_dict(load_ds_config(config).get(SECTION))
