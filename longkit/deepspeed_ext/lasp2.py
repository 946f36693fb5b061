"""LASP-2 / LASP-2H sequence parallelism for linear-attention and hybrid Hugging Face models.

Turned on by the DeepSpeed config's ``"longkit"`` section::

    "longkit": {"sequence_parallel": {"mode": "lasp2", "size": 4}}

Every linear-attention layer computes its chunk's summary, all-gathers the summaries of the group (one
collective per layer in forward, one reduce-scatter in backward, a fixed size per layer independent of the
sequence length), starts its chunk from the state the earlier ranks leave behind and so gives this rank's
rows of the one-process result (:mod:`.lasp2_core`, :mod:`.lasp2_comm`). On a hybrid model the softmax-attention
layers run Ulysses (:mod:`.ulysses`) in the same group (LASP-2H). Batch sharding, the loader and the loss are
the same as for Ulysses (:mod:`.sequence_parallel`).

Modes: ``"lasp2"`` needs a supported linear-attention model (:data:`LASP2_MODEL_TYPES`); ``"auto"`` does the
same for those and hands a softmax-only model to Ulysses whole. Other linear/SSM models raise with the list of
supported types. Packed documents (``position_ids`` restarting
inside a row) raise: transformers' PyTorch path of these layers refuses ``cu_seqlens`` and does not reset the
recurrent state between documents.

Only this model instance changes: each linear-attention module gets an instance ``forward``
(:mod:`.lasp2_models`), the softmax layers the Ulysses attention key; :func:`uninstall` restores both.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .._compat import require_host
from ..errors import UnsupportedModelError
from ..hf_patches.attention import (
    attention_modules,
    model_type,
    restore_attention,
    sliding_window,
    switch_attention,
    text_config,
)
from . import ulysses
from .all_to_all import HeadPlan
from .config import SequenceParallelConfig
from .lasp2_comm import CommStats, LASP2Comm, _all_gather
from .lasp2_models import (
    HOST_FUNCTIONS,
    LINEAR_LAYER_FORWARDS,
    REQUIRED_ATTRS,
    STATE_ATTR,
    LinearLayerState,
    host_function,
)
from .layout import LayoutCache

__all__ = ["LASP2_MODEL_TYPES", "install", "uninstall", "comm_stats", "lasp2_layers", "has_linear_layers"]

TECHNIQUE = "LASP-2"
_COMM_ATTR = "_longkit_lasp2_comm"

# model_type (of the text config) -> the linear-attention layer class LASP-2 runs; tested on tiny random configs.
LASP2_MODEL_TYPES: dict[str, str] = {
    "minimax": "MiniMaxLightningAttention",
    "qwen3_next": "Qwen3NextGatedDeltaNet",
    "qwen3_5_text": "Qwen3_5GatedDeltaNet",
    "qwen3_5_moe_text": "Qwen3_5MoeGatedDeltaNet",
    "kimi_linear": "KimiLinearDeltaAttention",
}
# Recurrent / SSM / short-convolution families: a clear "not supported" rather than "no linear layers".
_OTHER_RECURRENT = frozenset({
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "bamba", "granitemoehybrid", "nemotron_h", "jamba", "zamba",
    "zamba2", "lfm2", "lfm2_moe", "lfm3", "olmo_hybrid", "bailing_hybrid", "glm5_next", "qwen4_exp", "rwkv",
    "recurrent_gemma", "xlstm"})
_SOFTMAX_LAYER_TYPES = ("full_attention",)


def _recurrent_layer_types(config: Any) -> list[str]:  # noqa: ANN401
    return sorted({t for t in (getattr(config, "layer_types", None) or []) if t not in _SOFTMAX_LAYER_TYPES})


def has_linear_layers(model: nn.Module) -> bool:
    """Whether ``model`` has linear-attention / recurrent layers (so ``mode: "auto"`` means LASP-2 for it)."""
    mtype = model_type(model)
    if mtype in LASP2_MODEL_TYPES or mtype in _OTHER_RECURRENT:
        return True
    config = getattr(model, "config", None)
    return config is not None and bool(_recurrent_layer_types(text_config(config)))


def _supported_text() -> str:
    return f"LASP-2 supports model types {sorted(LASP2_MODEL_TYPES)}"


def _softmax_candidates(model: nn.Module, linear_cls: str) -> list[nn.Module]:
    """Attention modules of the softmax layers: the usual ones (``q_proj``, ``head_dim``), and multi-head latent
    attention (Kimi-Linear's MLA: ``kv_b_proj``, no ``head_dim``)."""
    mla = [m for m in model.modules() if type(m).__name__ != linear_cls and hasattr(m, "kv_b_proj")
           and hasattr(m, "o_proj") and isinstance(getattr(m, "layer_idx", None), int)]
    return mla or [m for m in attention_modules(model, TECHNIQUE) if type(m).__name__ != linear_cls]


def _kv_heads(model: nn.Module, softmax: list[nn.Module]) -> int:
    """KV heads the softmax layers hand to the attention function: MLA expands its latent to one key and value per
    query head; the others have ``num_key_value_heads``."""
    text = text_config(model.config)
    if any(hasattr(m, "kv_b_proj") for m in softmax):
        return text.num_attention_heads
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def lasp2_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(linear-attention modules, softmax-attention modules)`` of a supported model, or a clear error.

    Raises:
        UnsupportedModelError: not a supported linear-attention model (the message lists the supported types),
            a multimodal wrapper, a sliding window, or layers that do not match ``config.layer_types``.
        NotImplementedError: MoE router logits in the loss (their auxiliary loss would be computed per shard).
    """
    config = getattr(model, "config", None)
    mtype = model_type(model)
    if config is None or mtype is None:
        raise UnsupportedModelError(f"{TECHNIQUE}: {type(model).__name__} is not a transformers model")
    if mtype not in LASP2_MODEL_TYPES:
        recurrent = _recurrent_layer_types(text_config(config))
        if recurrent or mtype in _OTHER_RECURRENT:
            kinds = f" (layer types {recurrent})" if recurrent else ""
            raise UnsupportedModelError(f"{_supported_text()}; {mtype!r} is a linear-attention / state-space model"
                                        f"{kinds} without a LASP-2 adapter yet")
        raise UnsupportedModelError(f"{mtype!r} has no linear-attention layers, so longkit.sequence_parallel.mode="
                                    "'lasp2' does not apply; use mode 'ulysses' (or 'auto', which picks per layer "
                                    f"type). {_supported_text()}")
    text = text_config(config)
    if text is not config:
        raise UnsupportedModelError(f"{TECHNIQUE}: {type(model).__name__} is a multimodal model around a {mtype!r} "
                                    "language model; apply it to the language model alone (its ForCausalLM)")
    if getattr(text, "output_router_logits", False):
        raise NotImplementedError(f"{TECHNIQUE}: output_router_logits=True adds the MoE load-balancing loss, which "
                                  "would be computed per sequence shard; set config.output_router_logits = False")
    window = sliding_window(text)
    if window is not None:
        raise UnsupportedModelError(f"this model uses a sliding window of {window} tokens, which the Ulysses path "
                                    "of its softmax layers does not apply; set config.sliding_window = None only "
                                    "if that is intended")
    layer_types = list(getattr(text, "layer_types", None) or [])
    cls = LASP2_MODEL_TYPES[mtype]
    linear = [m for m in model.modules() if type(m).__name__ == cls]
    want = sum(t == "linear_attention" for t in layer_types)
    unknown = sorted(set(layer_types) - {"linear_attention", *_SOFTMAX_LAYER_TYPES})
    if unknown or len(linear) != want or not linear:
        raise UnsupportedModelError(f"{TECHNIQUE}: config.layer_types asks for {want} linear-attention layers "
                                    f"(other types: {unknown}), the model has {len(linear)} {cls} modules; "
                                    "this layout is not supported")
    for m in linear:
        missing = [a for a in REQUIRED_ATTRS[cls] if not hasattr(m, a)]
        if missing:
            import transformers

            raise UnsupportedModelError(f"{TECHNIQUE}: {cls} in transformers {transformers.__version__} has no "
                                        f"{missing}; this version's layer is not supported")
        for name in HOST_FUNCTIONS.get(cls, ()):
            host_function(m, name)
    softmax: list[nn.Module] = []
    if any(t in _SOFTMAX_LAYER_TYPES for t in layer_types):
        softmax = [m for m in _softmax_candidates(model, cls) if layer_types[m.layer_idx] in _SOFTMAX_LAYER_TYPES]
        if len(softmax) != sum(t in _SOFTMAX_LAYER_TYPES for t in layer_types):
            raise UnsupportedModelError(f"{TECHNIQUE}: found {len(softmax)} softmax-attention modules for "
                                        f"{sum(t in _SOFTMAX_LAYER_TYPES for t in layer_types)} full-attention layers")
    return linear, softmax


def _pre_forward(comm: LASP2Comm, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: position ids are given, no row restarts them (packed documents), no per-shard MoE loss.

    The document check is collective (one ``[world, B, 5]`` integer all-gather per forward) so that every rank
    raises together: a rank that raised alone would leave the others waiting in the first layer's all-gather.
    """
    if kwargs.get("output_router_logits"):
        raise NotImplementedError(f"{TECHNIQUE}: output_router_logits=True adds the MoE load-balancing loss, which "
                                  "would be computed per sequence shard; do not pass it under sequence parallelism")
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError("under LASP-2 sequence parallelism the model must get position_ids for its shard; pass "
                         "the batch through SequenceParallel.shard_batch(...)")
    if pos.dim() == 3:  # Qwen3.5's multimodal rope: [3 or 4, B, T]; the first row is the text position
        pos = pos[0]
    mask = kwargs.get("attention_mask")
    B = max(pos.shape[0], mask.shape[0] if isinstance(mask, torch.Tensor) else 1)
    pos = pos.long().expand(B, -1)
    real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(pos, dtype=torch.bool)
    inner = (real[:, 1:] & real[:, :-1] & (pos[:, 1:] != pos[:, :-1] + 1)).any(dim=1)
    mine = torch.stack([inner.long(), pos[:, 0], real[:, 0].long(), pos[:, -1], real[:, -1].long()], dim=1)
    every = mine.new_empty(comm.world * mine.numel())
    _all_gather(every, mine.reshape(-1), comm.group)
    comm.stats.record(-1, "all_gather", "forward", mine.numel() * mine.element_size())
    every = every.view(comm.world, B, 5)
    restart = every[:, :, 0].bool().any(dim=0)
    for r in range(1, comm.world):  # across the shard boundary r-1 | r
        prev, cur = every[r - 1], every[r]
        restart |= prev[:, 4].bool() & cur[:, 2].bool() & (cur[:, 1] != prev[:, 3] + 1)
    if bool(restart.any()):
        rows = restart.nonzero().flatten().tolist()
        raise UnsupportedModelError(
            f"packed documents (position_ids restart inside rows {rows}) are not supported by LASP-2 on "
            f"{model_type(model)!r}: transformers' PyTorch path of its linear-attention layers refuses cu_seqlens "
            "and does not reset the recurrent state between documents, so documents would leak into each other; "
            "put one document per row (pad instead of packing)")


def install(model: nn.Module, group: Any, rank: int, world: int, config: SequenceParallelConfig) -> dict[str, Any]:  # noqa: ANN401
    """Switch this model instance to LASP-2 (linear layers) + Ulysses (softmax layers) over ``group``.

    Under ``config.mode == "auto"`` a model without linear-attention layers gets plain Ulysses.
    """
    if config.mode == "auto" and not has_linear_layers(model):
        undo = ulysses.install(model, group, rank, world, config)
        undo["delegate"] = "ulysses"
        return undo
    require_host("transformers", f"{TECHNIQUE} sequence parallelism")
    linear, softmax = lasp2_layers(model)
    comm = LASP2Comm(group, rank, world, CommStats())
    undo: dict[str, Any] = {"linear": [], "ulysses": None}
    if softmax:
        text = text_config(model.config)
        plan = HeadPlan.build(text.num_attention_heads, _kv_heads(model, softmax), world)
        state = ulysses._UlyssesState(plan, rank, group, LayoutCache(group, world), plan.local_kv_index(rank),
                                      config.attention)
        undo["ulysses"] = switch_attention(model, ulysses.ATTN_KEY, ulysses.ulysses_attention, ulysses.ulysses_mask,
                                           softmax, ulysses._STATE_ATTR, lambda m: state)
    layer_state = LinearLayerState(comm)
    for m in linear:
        # Instance attribute: only this module changes; "forward" in __dict__ tells uninstall what to restore.
        undo["linear"].append((m, m.__dict__.get("forward")))
        setattr(m, STATE_ATTR, layer_state)
        m.forward = types.MethodType(LINEAR_LAYER_FORWARDS[type(m).__name__], m)
    setattr(model, _COMM_ATTR, comm)
    undo["hook"] = model.register_forward_pre_hook(
        lambda mod, args, kwargs: _pre_forward(comm, mod, args, kwargs), with_kwargs=True)
    undo["touched"] = len(linear) + len(softmax)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install` on this instance."""
    if undo.get("delegate") == "ulysses":
        ulysses.uninstall(model, undo)
        return
    undo["hook"].remove()
    for m, previous in undo["linear"]:
        del m.forward
        if previous is not None:
            m.forward = previous
        if hasattr(m, STATE_ATTR):
            delattr(m, STATE_ATTR)
    if undo["ulysses"] is not None:
        restore_attention(model, undo["ulysses"])
    model.__dict__.pop(_COMM_ATTR, None)


def comm_stats(model: nn.Module) -> CommStats:
    """The byte counter of a model prepared for LASP-2 (``stats.reset()`` before a step, ``stats.per_layer()``
    after it)."""
    comm = getattr(model, _COMM_ATTR, None)
    if comm is None:
        raise ValueError("this model is not prepared for LASP-2 sequence parallelism (mode 'lasp2' or 'auto' with "
                         "linear-attention layers, size > 1)")
    return comm.stats

