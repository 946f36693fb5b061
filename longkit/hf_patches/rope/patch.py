"""Install / uninstall a RoPE type on a loaded model (what ``apply_patches(model, rope=RopeConfig(...))`` calls).

The model's ``config.rope_parameters`` is replaced (so ``save_pretrained`` records the new type) and every
rotary embedding module recomputes ``inv_freq`` / ``original_inv_freq`` / ``attention_scaling`` with the
type's init function, exactly as a model built from that config would; uninstall puts all of it back.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...config import RopeConfig
from ...errors import UnsupportedModelError
from ..attention import check_model, text_config
from .hf import register

__all__ = ["install", "uninstall", "rotary_modules"]

TECHNIQUE = "rope"


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model's rotary embeddings: modules with ``inv_freq``, ``original_inv_freq``, ``rope_type``, ``config``."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
             and isinstance(getattr(m, "original_inv_freq", None), torch.Tensor) and hasattr(m, "rope_type")
             and hasattr(m, "config")]
    if not found:
        raise UnsupportedModelError(f"{TECHNIQUE}: found no rotary embedding (a module with inv_freq, "
                                    f"original_inv_freq and rope_type) in {type(model).__name__}")
    for m in found:
        if not isinstance(m.rope_type, str):
            raise UnsupportedModelError(f"{TECHNIQUE}: {type(m).__name__} has per-layer-type RoPE ({m.rope_type!r}); "
                                        "only one rope_type per model is supported")
    return found


def _new_parameters(config: Any, cfg: RopeConfig) -> dict[str, Any]:
    """``rope_parameters`` for ``cfg``, keeping the model's base and partial rotary factor."""
    old = getattr(config, "rope_parameters", None) or {}
    if not isinstance(old, dict) or "rope_theta" not in old or any(isinstance(v, dict) for v in old.values()):
        raise UnsupportedModelError(f"{TECHNIQUE}: needs a flat config.rope_parameters with rope_theta, got {old!r}")
    new = {"rope_theta": old["rope_theta"]}
    if "partial_rotary_factor" in old:
        new["partial_rotary_factor"] = old["partial_rotary_factor"]
    new.update(cfg.rope_parameters(getattr(config, "max_position_embeddings", None)))
    return new


@torch.no_grad()
def _recompute(module: nn.Module) -> None:
    """Refill the module's frequency buffers from its config's current rope_parameters (in place)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = module.config.rope_parameters["rope_type"]
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](module.config, device=module.inv_freq.device)
    if inv_freq.shape != module.inv_freq.shape:
        raise UnsupportedModelError(f"{TECHNIQUE}: {rope_type} gives {tuple(inv_freq.shape)} frequencies, the "
                                    f"module holds {tuple(module.inv_freq.shape)}")
    module.inv_freq.copy_(inv_freq)
    module.original_inv_freq.copy_(inv_freq)
    module.attention_scaling = scaling
    module.rope_type = rope_type


def install(model: nn.Module, cfg: RopeConfig) -> dict[str, Any]:
    """Switch this model instance to ``cfg``'s RoPE type. Returns what :func:`uninstall` needs to undo it."""
    register()
    check_model(model, TECHNIQUE)
    modules = rotary_modules(model)
    # The model's config and any distinct one a rotary module holds (in Llama-like models they are one object).
    configs = list({id(c): c for c in [text_config(model.config), *(m.config for m in modules)]}.values())
    new = _new_parameters(configs[0], cfg)
    undo: dict[str, Any] = {
        "configs": [(c, copy.deepcopy(c.rope_parameters)) for c in configs],
        "modules": [(m, m.rope_type, m.inv_freq.clone(), m.original_inv_freq.clone(), m.attention_scaling)
                    for m in modules],
        "touched": len(modules),
    }
    try:
        for c in configs:
            c.rope_parameters = copy.deepcopy(new)
            c.validate_rope()  # transformers' check with longkit's validators: a bad combination fails here
        for m in modules:
            _recompute(m)
    except BaseException:
        uninstall(model, undo)
        raise
    return undo


@torch.no_grad()
def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install`: the configs' rope_parameters and each module's buffers, type and scaling."""
    for c, params in undo["configs"]:
        c.rope_parameters = copy.deepcopy(params)
    for m, rope_type, inv_freq, original, scaling in undo["modules"]:
        m.inv_freq.copy_(inv_freq)
        m.original_inv_freq.copy_(original)
        m.attention_scaling = scaling
        m.rope_type = rope_type
