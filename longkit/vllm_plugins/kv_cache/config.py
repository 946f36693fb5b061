"""How a user turns the packed KV cache on in vLLM, and the checks of its options (no vLLM import here).

The options go in vLLM's field for plugins, ``additional_config["longkit_kv_cache"]``: ``LLM(...,
additional_config={"longkit_kv_cache": {"key_bits": 4, "value_bits": 4}})`` or ``--additional-config
'{"longkit_kv_cache": {...}}'``. ``additional_config`` is part of ``VllmConfig``, which vLLM hands to its engine
core and worker processes, so every process reads the same options (nothing travels through the environment).

The keys are the fields of :class:`longkit.config.KVCacheConfig`, the options every longkit host shares (the
transformers cache reads the same class): ``key_bits``, ``value_bits``, ``group_size``, ``rotate``, ``qjl``,
``qjl_dim``, ``seed``; ``key_axis`` and ``keep_channels`` are accepted only at their defaults, and
``residual_length`` only as 0, which is its default here (see :func:`spec_from_additional_config`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ..._validate import describe
from ...config import KVCacheConfig
from ...errors import ConfigError
from ...kernels.kv_quant.spec import KVQuantSpec, record_layout

__all__ = ["ADDITIONAL_CONFIG_KEY", "OPTION_NAMES", "PageLayout", "page_layout", "spec_from_additional_config"]

ADDITIONAL_CONFIG_KEY = "longkit_kv_cache"

# KVCacheConfig's fields: KVQuantSpec's plus residual_length (a full-precision window of recent tokens, which the
# vLLM backend does not have: only 0, also its default here, where the transformers cache defaults to 128).
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(KVCacheConfig))


def _where(key: str | None = None) -> str:
    base = f"additional_config['{ADDITIONAL_CONFIG_KEY}']"
    return f"{base}['{key}']" if key is not None else base


def spec_from_additional_config(additional_config: Any) -> KVQuantSpec | None:  # noqa: ANN401
    """The :class:`KVQuantSpec` that ``additional_config`` asks for, or ``None`` when the packed cache is off.

    Args:
        additional_config: ``VllmConfig.additional_config`` (a dict; ``None`` or a dict without
            ``"longkit_kv_cache"`` means off). ``{"longkit_kv_cache": {}}`` turns it on with
            :class:`~longkit.config.KVCacheConfig`'s defaults (4-bit keys and values, groups of 32, rotation on, no
            QJL), except ``residual_length``, which is 0. ``dataclasses.asdict(KVCacheConfig(...,
            residual_length=0))`` is a valid section.

    Returns:
        The validated spec, or ``None``.

    Raises:
        ConfigError: ``additional_config`` or its section is not a JSON object, a key is unknown (the message names
            the closest valid key), or a value is invalid (KVCacheConfig's own message).
        NotImplementedError: an option the vLLM backend does not build: ``key_axis="channel"`` (KIVI key scales
            span groups of tokens, the paged layout stores one record per token), ``keep_channels < 1`` (the kept
            channels must be calibrated per layer before the first write), ``residual_length > 0`` (no
            full-precision window in vLLM's pages).
    """
    if additional_config is None:
        return None
    if not isinstance(additional_config, Mapping):
        # vLLM also allows a SupportsHash object here; only a dict can carry longkit's section
        if hasattr(additional_config, ADDITIONAL_CONFIG_KEY):
            raise ConfigError(f"{ADDITIONAL_CONFIG_KEY} must be given in a dict additional_config "
                              f"({{'{ADDITIONAL_CONFIG_KEY}': {{...}}}}), got {type(additional_config).__name__}")
        return None
    if ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    section = additional_config[ADDITIONAL_CONFIG_KEY]
    if not isinstance(section, Mapping):
        raise ConfigError(f"{_where()} must be a JSON object of KV-cache options such as {{\"key_bits\": 4, "
                          f"\"value_bits\": 4}} ({{}} for the defaults), got {describe(section)}")
    for key in section:
        if key not in OPTION_NAMES:
            near = difflib.get_close_matches(str(key), OPTION_NAMES, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key {_where(key)} (valid: {list(OPTION_NAMES)}){hint}")
    try:
        cfg = KVCacheConfig(**{"residual_length": 0, **section})
    except ConfigError as e:
        raise ConfigError(f"{_where()}: {e}") from None
    if cfg.residual_length:
        raise NotImplementedError(
            f"{_where('residual_length')}={cfg.residual_length}: a full-precision window of recent tokens is not "
            "built in the vLLM backend (every token is packed when written; a prefill chunk attends to its own "
            "tokens in full precision). Use residual_length=0 (the default in vLLM)")
    spec = cfg.spec()
    if spec.key_axis != "token":
        raise NotImplementedError(
            f"{_where('key_axis')}={spec.key_axis!r} (KIVI per-channel key scales) is not built in the vLLM backend: "
            "its key scales span groups of tokens and live outside the per-token records vLLM's pages hold. "
            "Use key_axis='token' (the default)")
    if spec.keep_channels != 1.0:
        raise NotImplementedError(
            f"{_where('keep_channels')}={spec.keep_channels} (key-channel pruning) is not built in the vLLM backend: "
            "the kept channels must be calibrated per layer on real queries and keys before the first write, "
            "which vLLM offers no step for. Use keep_channels=1.0 (the default)")
    return spec


class PageLayout(dict):
    """What one token costs in vLLM's pages (a dict, so it prints and serialises as JSON):

    ``record_bytes`` (one KV head's packed record, :func:`~longkit.kernels.kv_quant.record_layout`),
    ``slot_bytes`` (the record padded to a multiple of the cache dtype's size, which vLLM requires),
    ``pad_bytes`` (= slot - record), ``bytes_per_token`` (one layer, all KV heads, padding included),
    ``dense_bytes_per_token`` (vLLM's own ``(D + D) · dtype size · heads``) and ``ratio`` (dense / packed).
    """


def page_layout(spec: KVQuantSpec, head_dim: int, num_kv_heads: int, dtype_size: int) -> PageLayout:
    """Bytes per token and layer of the packed cache in vLLM's pages, and the ratio to vLLM's dense cache.

    Args:
        spec: the options.
        head_dim: ``D`` (keys and values alike).
        num_kv_heads: KV heads of one worker.
        dtype_size: bytes of vLLM's cache dtype (the model dtype with ``kv_cache_dtype="auto"``: 2 for
            bf16/fp16, 4 for fp32); a page cell must be a whole number of that dtype.
    """
    record = record_layout(spec, head_dim).record_bytes
    slot = -(-record // dtype_size) * dtype_size
    dense = 2 * head_dim * dtype_size * num_kv_heads
    return PageLayout(record_bytes=record, slot_bytes=slot, pad_bytes=slot - record,
                      bytes_per_token=slot * num_kv_heads, dense_bytes_per_token=dense,
                      ratio=dense / (slot * num_kv_heads))
