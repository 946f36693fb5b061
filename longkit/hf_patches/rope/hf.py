"""Giraffe RoPE types in transformers: ``ROPE_INIT_FUNCTIONS`` entries and ``rope_parameters`` validators.

transformers builds a rotary embedding's frequencies with ``ROPE_INIT_FUNCTIONS[config.rope_parameters
["rope_type"]](config, device, seq_len, layer_type) -> (inv_freq [d/2], attention_scaling)`` (in the
module's ``__init__`` and again in ``PreTrainedModel._init_weights`` while loading), and validates
``rope_parameters`` with ``RotaryEmbeddingConfigMixin._validate_<rope_type>_rope_parameters`` (a missing
one only logs a warning). :func:`register` adds both for ``giraffe_power`` and ``giraffe_truncated``; it must
run before a model with such a config is built or loaded (``longkit.register_rope_types()``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..._compat import require_host
from ...config import GIRAFFE_PARAMETER_KEYS, GIRAFFE_ROPE_TYPES, check_giraffe_rope_parameters
from ...errors import HostVersionError
from .basis import power_basis, standard_inv_freq, truncated_basis

__all__ = ["register", "is_registered", "compute_giraffe_power_parameters", "compute_giraffe_truncated_parameters",
           "INIT_FUNCTIONS"]


def _parameters(config: Any, layer_type: str | None) -> dict[str, Any]:
    """This layer type's ``rope_parameters`` (flat configs: the dict itself), standardised as transformers does."""
    config.standardize_rope_params()  # fills rope_theta (and partial_rotary_factor) from older config layouts
    params = config.rope_parameters
    return params[layer_type] if layer_type is not None else params


def _standard(config: Any, params: dict[str, Any], device: torch.device | str | None) -> torch.Tensor:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return standard_inv_freq(dim, params["rope_theta"], device)


def compute_giraffe_power_parameters(config: Any, device: torch.device | str | None = None,
                                     seq_len: int | None = None,
                                     layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [d/2], attention_scaling=1.0)`` of the power basis (``power``, optional ``factor``).

    ``seq_len`` is unused: the basis does not depend on the sequence length (a static type).
    """
    params = _parameters(config, layer_type)
    p = check_giraffe_rope_parameters("rope_parameters", "giraffe_power", params)
    return power_basis(_standard(config, params, device) / p["factor"], p["power"]), 1.0


def compute_giraffe_truncated_parameters(config: Any, device: torch.device | str | None = None,
                                         seq_len: int | None = None,
                                         layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [d/2], attention_scaling=1.0)`` of the truncated basis (``a``, ``b``, ``rho``, optional
    ``factor``); static like the power basis."""
    params = _parameters(config, layer_type)
    p = check_giraffe_rope_parameters("rope_parameters", "giraffe_truncated", params)
    return truncated_basis(_standard(config, params, device) / p["factor"], p["a"], p["b"], p["rho"]), 1.0


INIT_FUNCTIONS = {
    "giraffe_power": compute_giraffe_power_parameters,
    "giraffe_truncated": compute_giraffe_truncated_parameters,
}


def _validator(rope_type: str):
    """A ``RotaryEmbeddingConfigMixin._validate_<rope_type>_rope_parameters`` method for one Giraffe type."""
    required, optional = GIRAFFE_PARAMETER_KEYS[rope_type]

    def validate(self: Any, rope_parameters: dict, ignore_keys: set | None = None) -> None:
        # Values first (ConfigError naming the key), then transformers' own key check, which warns about
        # unknown keys the way it does for its built-in types.
        check_giraffe_rope_parameters("rope_parameters", rope_type, rope_parameters)
        self._check_received_keys(rope_type, set(rope_parameters), {"rope_type", *required},
                                  optional_keys={"rope_theta", *optional}, ignore_keys=ignore_keys)

    validate.__name__ = validate.__qualname__ = f"_validate_{rope_type}_rope_parameters"
    validate.__module__ = __name__
    validate.longkit_rope_type = rope_type  # marks ours, so registering again is a no-op
    return validate


_VALIDATORS = {t: _validator(t) for t in GIRAFFE_ROPE_TYPES}


def _hooks() -> tuple[dict, type]:
    """transformers' rope-init table and validation mixin, after checking the version and their shape."""
    require_host("transformers", "the Giraffe RoPE types")
    from transformers import modeling_rope_utils as mru

    table = getattr(mru, "ROPE_INIT_FUNCTIONS", None)
    mixin = getattr(mru, "RotaryEmbeddingConfigMixin", None)
    needed = ("validate_rope", "standardize_rope_params", "_check_received_keys", "_validate_linear_rope_parameters")
    if not isinstance(table, dict) or "linear" not in table or mixin is None or \
            not all(hasattr(mixin, name) for name in needed):
        raise HostVersionError(
            "this transformers has no ROPE_INIT_FUNCTIONS table / RotaryEmbeddingConfigMixin validation hooks "
            "(transformers.modeling_rope_utils), where longkit registers the Giraffe RoPE types; install "
            "transformers>=5.17,<5.26"
        )
    return table, mixin


def _ours(obj: Any, fn: Any) -> bool:
    # The same function, or its twin from a reloaded copy of this module.
    return obj is fn or (getattr(obj, "__module__", None) == __name__
                         and getattr(obj, "__qualname__", None) == fn.__qualname__)


def register() -> None:
    """Add ``giraffe_power`` and ``giraffe_truncated`` to transformers' rope-init table and validators.

    Idempotent. Raises :class:`HostVersionError` if transformers lacks the table or hooks (or is outside the
    supported window), and if another library already registered a different function under either name.
    """
    table, mixin = _hooks()
    for rope_type in GIRAFFE_ROPE_TYPES:
        name = f"_validate_{rope_type}_rope_parameters"
        fn, validate = INIT_FUNCTIONS[rope_type], _VALIDATORS[rope_type]
        current, current_validate = table.get(rope_type), mixin.__dict__.get(name)
        if (current is not None and not _ours(current, fn)) or \
                (current_validate is not None and not _ours(current_validate, validate)):
            raise HostVersionError(
                f"rope_type {rope_type!r} is already registered in transformers by {current or current_validate!r}; "
                "longkit will not replace it (a newer transformers may ship its own: check its definition)"
            )
        table[rope_type] = fn
        setattr(mixin, name, validate)  # a new attribute on the mixin; no transformers method is replaced


def is_registered() -> bool:
    """Whether both Giraffe types are in transformers' table (without importing transformers if not loaded)."""
    import sys

    mru = sys.modules.get("transformers.modeling_rope_utils")
    table = getattr(mru, "ROPE_INIT_FUNCTIONS", {}) if mru is not None else {}
    return all(_ours(table.get(t), INIT_FUNCTIONS[t]) for t in GIRAFFE_ROPE_TYPES)
