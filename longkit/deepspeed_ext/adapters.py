"""Which module implements each ``"longkit".sequence_parallel.mode`` of the DeepSpeed section.

An adapter module exposes ``install(model, group, rank, world, config) -> undo`` (switch this model instance
to the mode's attention over the sequence-parallel ``group``; ``config`` is the parsed
:class:`~longkit.deepspeed_ext.config.SequenceParallelConfig`) and ``uninstall(model, undo)``. Batch sharding
and loss reduction are the same for every mode and live in :mod:`.sequence_parallel`. Modules are imported on
first use.

``"lasp2"`` and ``"auto"`` share one module: it sorts the layers by type (linear attention -> LASP-2, softmax
attention -> the Ulysses path, in the same group) and, under ``"auto"``, hands a softmax-only model to
:mod:`.ulysses` whole.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

__all__ = ["SP_ADAPTERS", "sp_adapter"]

SP_ADAPTERS: dict[str, str] = {
    "ulysses": "longkit.deepspeed_ext.ulysses",
    "lasp2": "longkit.deepspeed_ext.lasp2",
    "auto": "longkit.deepspeed_ext.lasp2",  # per layer type; a softmax-only model goes to Ulysses
}


def sp_adapter(mode: str) -> ModuleType:
    """The adapter module of a sequence-parallel ``mode`` (e.g. ``"ulysses"``)."""
    try:
        return importlib.import_module(SP_ADAPTERS[mode])
    except KeyError:
        raise ConfigError(f"no sequence-parallel adapter for mode {mode!r}; built: {sorted(SP_ADAPTERS)}") from None
