"""Find a model's decoder layers and the backbone module whose forward runs them (no host library needed)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError, UnsupportedModelError

__all__ = ["find_decoder_layers"]


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else config
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        for child_name, c in module.named_children():
            if c is child:
                return (f"{name}.{child_name}" if name else child_name), module
    return None


def find_decoder_layers(model: nn.Module, layers: Any = None) -> tuple[nn.Module, nn.ModuleList, str]:
    """``(backbone, layers, path)``: the decoder layers of ``model`` and the module that holds (and runs) them.

    Args:
        model: a Hugging Face model (``model.model.layers`` for the causal LMs; PEFT and other wrappers are
            searched through) or any ``nn.Module``.
        layers: the ``nn.ModuleList`` of decoder layers, when the search cannot tell (a plain PyTorch model
            with several lists of blocks).

    Returns:
        The backbone (the ``nn.ModuleList``'s parent, e.g. ``LlamaModel``), the list, and its dotted path.

    The search takes the ``nn.ModuleList`` of identical modules whose length is the (text) config's
    ``num_hidden_layers``; without a config, the only ``nn.ModuleList`` of identical modules. Several
    candidates raise :class:`~longkit.errors.ConfigError` naming them.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"activation offload needs an nn.Module, got {type(model).__name__}")
    if layers is not None:
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ConfigError(f"layers must be a non-empty nn.ModuleList (e.g. model.model.layers), got "
                              f"{type(layers).__name__}")
        found = _parent_of(model, layers)
        if found is None:
            raise ConfigError("layers is not a submodule of the model; pass the model's own nn.ModuleList of "
                              "decoder layers")
        return found[1], layers, found[0]
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1]
    n = _num_layers(model)
    if n is not None:
        candidates = [(name, m) for name, m in candidates if len(m) == n]
    if len(candidates) > 1:
        named = [name for name, _ in candidates if name.split(".")[-1] == "layers"]
        if len(named) == 1:
            candidates = [c for c in candidates if c[0] == named[0]]
    if not candidates:
        want = f" of {n} layers (config.num_hidden_layers)" if n is not None else ""
        raise UnsupportedModelError(f"activation offload found no nn.ModuleList of decoder layers{want} in "
                                    f"{type(model).__name__}; pass layers=<the nn.ModuleList of its blocks>")
    if len(candidates) > 1:
        raise ConfigError(f"activation offload found several lists of layers in {type(model).__name__}: "
                          f"{[name for name, _ in candidates]}; pass layers=<the decoder layers' nn.ModuleList>")
    name, found_layers = candidates[0]
    parent = _parent_of(model, found_layers)
    assert parent is not None  # found by named_modules, so it has a parent
    return parent[1], found_layers, name
