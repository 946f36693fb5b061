"""The ``"longkit"`` section of a DeepSpeed JSON config: parsing and validation.

DeepSpeed keeps unknown top-level keys untouched (they stay in ``engine.config``), so longkit's options
live next to DeepSpeed's own::

    {
      "train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {"stage": 2},
      "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2},
                  "activation_offload": {"min_tensor_bytes": 1048576, "gpu_fraction": 0.0}}
    }

``"sequence_parallel".mode`` picks the technique per layer type: ``"ulysses"`` (softmax-attention models),
``"lasp2"`` (linear-attention models: LASP-2; on a hybrid the softmax layers go through Ulysses in the same group,
i.e. LASP-2H) or ``"auto"`` (whichever of the two the model's layers need).

``"activation_offload"`` takes the fields of :class:`longkit.config.ActivationOffloadConfig` (``enabled``,
``min_tensor_bytes``, ``gpu_fraction``, ``prefetch``, ``pin_memory``); the key present means on (``{}`` = the
defaults), absent means off, ``{"enabled": false}`` keeps the section but turns it off.

Every key is checked here; a typo or a bad value raises :class:`~longkit.errors.ConfigError` naming the key,
the allowed values and an example, instead of being ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._validate import check_choice, check_int, describe
from ..config import ActivationOffloadConfig, check_activation_offload
from ..errors import ConfigError

__all__ = ["SECTION", "SequenceParallelConfig", "ActivationOffloadConfig", "LongkitDSConfig", "parse_ds_config",
           "parse_activation_offload"]

SECTION = "longkit"
_EXAMPLE = '"longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}'
_OFFLOAD_EXAMPLE = '"longkit": {"activation_offload": {"min_tensor_bytes": 1048576, "gpu_fraction": 0.0}}'
_OFFLOAD_KEYS = tuple(f.name for f in fields(ActivationOffloadConfig))  # one key per field, same order
_SP_MODES = ("ulysses", "lasp2", "auto")
_SP_MODES_LATER: tuple[str, ...] = ()  # accepted names not built yet -> NotImplementedError, not "unknown"
_ATTENTION = ("auto", "kernel", "sdpa")


def _check_keys(where: str, given: dict[str, Any], allowed: tuple[str, ...], example: str = _EXAMPLE) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed keys: {list(allowed)}. Example: {example}")


def _check_sequence_parallel(owner: str, mode: Any, size: Any, attention: Any) -> int:
    """Validate the sequence-parallel options (``owner`` names them in messages); returns ``size`` as an int."""
    if isinstance(mode, str) and mode in _SP_MODES_LATER:
        raise NotImplementedError(f"{owner}.mode={mode!r} is not built yet (see README); use one of {list(_SP_MODES)}")
    check_choice(owner, "mode", mode, _SP_MODES)
    size = check_int(owner, "size", size, min=1, want="a positive integer")
    check_choice(owner, "attention", attention, _ATTENTION)
    return size


@dataclass(frozen=True)
class SequenceParallelConfig:
    """``longkit.sequence_parallel``: how the sequence is split across ranks.

    Attributes:
        mode: ``"ulysses"`` (all-to-all: sequence shards <-> head shards around every softmax attention);
            ``"lasp2"`` (linear-attention layers pass their recurrent state between ranks: one all-gather of
            per-rank chunk summaries per layer, whose size does not depend on the sequence length; the
            softmax layers of a hybrid model go through Ulysses in the same group: LASP-2H); or ``"auto"``:
            by layer type, i.e. ``"ulysses"`` for a softmax-only model and ``"lasp2"`` for a model with
            linear-attention layers. Supported linear-attention models: see
            :data:`longkit.deepspeed_ext.lasp2.LASP2_MODEL_TYPES`.
        size: ranks per sequence-parallel group (1 turns sequence parallelism off). The world size must be
            a multiple of it; consecutive ranks form a group (keep a group inside one node: all-to-all is
            bandwidth-bound).
        attention: the softmax attention over the gathered sequence (in every mode): ``"kernel"`` (longkit's
            masked-attention kernel; its PyTorch reference on CPU), ``"sdpa"`` (``F.scaled_dot_product_attention`` with
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

    def __post_init__(self) -> None:
        size = _check_sequence_parallel("SequenceParallelConfig", self.mode, self.size, self.attention)
        object.__setattr__(self, "size", size)  # normalised (numpy int -> int) so equal configs compare equal

    @classmethod
    def from_dict(cls, d: Any) -> SequenceParallelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"longkit.sequence_parallel must be an object, got {type(d).__name__}. "
                              f"Example: {_EXAMPLE}")
        _check_keys("longkit.sequence_parallel", d, ("mode", "size", "attention"))
        mode, size, attention = d.get("mode", "ulysses"), d.get("size", 1), d.get("attention", "auto")
        # Checked here too so that a JSON user reads the JSON key path in the message.
        _check_sequence_parallel("longkit.sequence_parallel", mode, size, attention)
        return cls(mode=mode, size=size, attention=attention)


def parse_activation_offload(d: Any) -> ActivationOffloadConfig:
    """The value of ``longkit.activation_offload`` -> :class:`~longkit.config.ActivationOffloadConfig`."""
    if not isinstance(d, dict):
        raise ConfigError(f"longkit.activation_offload must be an object, got {type(d).__name__}. "
                          f"Example: {_OFFLOAD_EXAMPLE}")
    # Keys first: a misspelt "enabled" must be reported as such, not read as the default (on).
    _check_keys("longkit.activation_offload", d, _OFFLOAD_KEYS, _OFFLOAD_EXAMPLE)
    # Checked here so that a JSON user reads the JSON key path in the message.
    return ActivationOffloadConfig(**check_activation_offload("longkit.activation_offload", d))


@dataclass(frozen=True)
class LongkitDSConfig:
    """The whole ``"longkit"`` section."""

    sequence_parallel: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    activation_offload: ActivationOffloadConfig = field(
        default_factory=lambda: ActivationOffloadConfig(enabled=False))  # no key: off

    def __post_init__(self) -> None:
        parts = (("sequence_parallel", SequenceParallelConfig), ("activation_offload", ActivationOffloadConfig))
        for name, cls in parts:
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"LongkitDSConfig.{name} must be an instance of {cls.__name__}, got "
                                  f"{describe(value)}; build it with {cls.__name__}(...) or parse a dict with "
                                  "LongkitDSConfig.from_dict(...)")

    @classmethod
    def from_dict(cls, d: Any) -> LongkitDSConfig:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ConfigError(f'the "longkit" section must be an object, got {type(d).__name__}. Example: {_EXAMPLE}')
        _check_keys('the "longkit" section', d, ("sequence_parallel", "activation_offload"))
        return cls(
            sequence_parallel=SequenceParallelConfig.from_dict(d.get("sequence_parallel", {})),
            activation_offload=(parse_activation_offload(d["activation_offload"]) if "activation_offload" in d
                                else ActivationOffloadConfig(enabled=False)),
        )


def load_ds_config(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Return a DeepSpeed config as a dict (a dict is returned as is; a path is read as JSON)."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
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
