"""``apply_patches(model, tiled_mlp=...)``: every decoder layer's MLP runs ``chunk_size`` tokens at a time.

One piece per decoder layer, on this model instance only: ``layer.mlp.forward`` becomes
``tiled_apply(original_forward, x, trainable_parameters, chunk_size)`` (:mod:`.function`): the output is the same,
the MLP's intermediates exist for one tile at a time, and the backward recomputes each tile. Worth it for long
sequences, where the MLP's intermediates (``4 × intermediate_size`` values per token in a Llama MLP) are the largest
tensors a layer keeps, most of all under gradient checkpointing + activation offload (the layer being recomputed
holds them all); it costs one more MLP forward per step (the backward recomputes each tile).

The trainable parameters are read at every call, so LoRA adapters added to the MLP after the patch (PEFT) get
their gradients. Refused with the reason: model types other than Llama, Qwen2, Qwen3, Mistral; a decoder layer
without an ``mlp`` module; MLP weights partitioned by DeepSpeed ZeRO-3 (the backward takes the parameters'
gradients itself and does not gather them: use ZeRO stage <= 2); dropout inside the MLP in training mode (the
recomputed tile would draw another mask).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...config import TiledMLPConfig
from ...errors import UnsupportedModelError
from ...offload.layers import find_decoder_layers
from ..attention import SUPPORTED_MODEL_TYPES, check_model
from .function import tiled_apply

__all__ = ["TECHNIQUE", "MODEL_TYPES", "install", "uninstall", "config_of"]

TECHNIQUE = "tiled_mlp"
MODEL_TYPES = SUPPORTED_MODEL_TYPES
_STATE_ATTR = "_longkit_tiled_mlp"


def _mlps(model: nn.Module) -> list[nn.Module]:
    check_model(model, TECHNIQUE, MODEL_TYPES)
    _, layers, _ = find_decoder_layers(model)
    mlps = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise UnsupportedModelError(f"{TECHNIQUE}: decoder layer {i} ({type(layer).__name__}) has no .mlp module")
        if _STATE_ATTR in vars(mlp):
            raise UnsupportedModelError(f"{TECHNIQUE} is already installed on this model; uninstall it first (or use "
                                        "longkit.apply_patches, which replaces it)")
        mlps.append(mlp)
    return mlps


def _check_call(mlp: nn.Module, params: list[nn.Parameter]) -> None:
    if any(hasattr(p, "ds_id") for p in mlp.parameters()):
        raise NotImplementedError(f"{TECHNIQUE}: the MLP weights are partitioned by DeepSpeed ZeRO-3; the tiled "
                                  "backward computes their gradients itself and does not gather them. Use ZeRO stage "
                                  "<= 2, or remove tiled_mlp")
    if mlp.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in mlp.modules()):
        raise NotImplementedError(f"{TECHNIQUE}: the MLP has dropout in training mode; a recomputed tile would draw "
                                  "another mask. Set the dropout probability to 0 or remove tiled_mlp")


def _tiled_forward(mlp: nn.Module, original: Callable[..., torch.Tensor], chunk: int) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401
        if args or kwargs:  # the stock MLPs take the hidden states only
            raise TypeError(f"{TECHNIQUE}: {type(mlp).__name__}.forward got extra arguments; the tiled MLP supports "
                            "forward(hidden_states) only")
        if not torch.is_grad_enabled() or x.shape[:-1].numel() <= chunk:
            return original(x)  # nothing to save (inference) or a single tile: the stock call is the same
        params = [p for p in mlp.parameters() if p.requires_grad]
        _check_call(mlp, params)
        return tiled_apply(original, x, params, chunk)

    return forward


def install(model: nn.Module, cfg: TiledMLPConfig) -> dict[str, Any]:
    """Tile every decoder layer's MLP (see the module docstring). Returns the undo record."""
    if not isinstance(cfg, TiledMLPConfig):
        raise TypeError(f"{TECHNIQUE}: cfg must be a TiledMLPConfig, got {type(cfg).__name__}")
    mlps = _mlps(model)
    undo = []
    for mlp in mlps:
        had = "forward" in vars(mlp)
        original = mlp.forward
        mlp.forward = _tiled_forward(mlp, original, cfg.chunk_size)
        setattr(mlp, _STATE_ATTR, cfg)
        undo.append((mlp, had, original))
    setattr(model, _STATE_ATTR, cfg)
    return {"touched": len(mlps), "mlps": undo}


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install`."""
    for mlp, had, original in undo["mlps"]:
        if had:
            mlp.forward = original
        else:
            vars(mlp).pop("forward", None)
        vars(mlp).pop(_STATE_ATTR, None)
    vars(model).pop(_STATE_ATTR, None)


def config_of(model: nn.Module) -> TiledMLPConfig | None:
    """The :class:`TiledMLPConfig` installed on ``model``, or ``None``."""
    return vars(model).get(_STATE_ATTR)
