"""Ulysses sequence-parallel attention for Hugging Face models (registered through ``AttentionInterface``).

The model keeps its own projections, RoPE (applied on each rank's shard with the true global positions)
and MLPs; only the core attention call changes: all-to-all to head shards, attention over the whole
sequence with longkit's masked-attention kernel (plain-PyTorch reference on CPU), all-to-all back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..hf_patches.attention import (
    attention_modules,
    check_model,
    restore_attention,
    sliding_window,
    switch_attention,
)
from ..kernels import masked_attention
from .all_to_all import HeadPlan, heads_to_seq, seq_to_heads
from .config import SequenceParallelConfig
from .layout import LayoutCache

__all__ = ["ATTN_KEY", "ulysses_attention", "ulysses_mask", "install", "uninstall"]

ATTN_KEY = "longkit_ulysses"
_STATE_ATTR = "_longkit_ulysses"
TECHNIQUE = "Ulysses"


@dataclass
class _UlyssesState:
    plan: HeadPlan
    rank: int
    group: Any
    layouts: LayoutCache
    kv_index: torch.Tensor | None
    attention: str  # "auto" | "kernel" | "sdpa"


def ulysses_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Mask builder for ``AttentionMaskInterface``: this shard's 2-D padding mask, or ``None``.

    The full-sequence mask is derived once per forward from positions + padding (``layout.py``); no
    ``T x T`` mask is ever built. An all-ones mask is kept (not dropped to ``None``): every rank of the group
    must take part in the same gathers, whether or not its own shard holds padding.
    """
    if attention_mask is None:
        return None
    return attention_mask.bool()


def ulysses_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention function: ``query [B, H, T/P, D]``, ``key/value [B, Hkv, T/P, D]`` (this rank's shard)
    -> ``([B, T/P, H, D], None)``."""
    state: _UlyssesState | None = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"attn_implementation '{ATTN_KEY}' is set but this layer was not prepared; use "
                           "longkit.deepspeed_ext.initialize(...) or SequenceParallel.prepare_model(model)")
    if dropout:
        raise NotImplementedError("attention dropout is not supported under Ulysses sequence parallelism; set "
                                  "config.attention_dropout = 0")
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError("Ulysses sequence parallelism is for training/prefill without a KV cache; "
                                  "pass use_cache=False (generation is not sequence-parallel)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise UnsupportedModelError(f"Ulysses got a {attention_mask.dim()}-D attention mask; only 2-D padding "
                                    "masks are supported (packed documents are read from position_ids)")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise UnsupportedModelError("Ulysses needs position_ids in the attention kwargs; this model's attention "
                                    "does not pass them")
    B = query.shape[0]
    layout = state.layouts.get(position_ids, attention_mask, B)
    q, k, v = seq_to_heads(query, key, value, state.plan, state.rank, state.group)
    if state.kv_index is not None:  # this rank's query heads cut a GQA group unevenly: index KV per query head
        idx = state.kv_index.to(k.device)
        k, v = k.index_select(1, idx), v.index_select(1, idx)
    _, h, T, D = q.shape
    if not layout.flatten and state.attention in ("auto", "sdpa"):
        out = _sdpa_causal(q, k, v, scaling)
    elif state.attention == "sdpa":
        raise UnsupportedModelError("longkit.sequence_parallel.attention='sdpa' takes plain causal rows only; "
                                    "packed documents or padding need 'kernel' or 'auto'")
    else:
        Dv = v.shape[-1]
        if Dv != D:  # multi-head latent attention: the kernel takes one head dim, and zero channels change nothing
            scaling = scaling if scaling is not None else D ** -0.5
            q, k, v = F.pad(q, (0, max(D, Dv) - D)), F.pad(k, (0, max(D, Dv) - D)), F.pad(v, (0, max(D, Dv) - Dv))
        if layout.flatten:  # rows -> one packed row (documents mask is single-row)
            q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], B * T, x.shape[-1]) for x in (q, k, v))
        out = masked_attention(q, k, v, mask=layout.mask, scale=scaling)
        if layout.flatten:
            out = out.reshape(h, B, T, out.shape[-1]).transpose(0, 1)
        out = out[..., :Dv]
    out = heads_to_seq(out, state.plan, state.rank, state.group)
    return out.transpose(1, 2).contiguous(), None


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal SDPA; KV heads are repeated to the query heads first (as HF's sdpa path does), because not
    every fused backend takes grouped heads and the fallback would be the O(T^2)-memory math kernel."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    check_model(model, TECHNIQUE)
    window = sliding_window(model.config)
    if window is not None:
        raise UnsupportedModelError(f"this model uses a sliding window of {window} tokens, which the Ulysses "
                                    "adapter does not apply; set config.sliding_window = None only if that is "
                                    "intended")
    return attention_modules(model, TECHNIQUE)


def _require_position_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Without explicit position ids every rank would rotate its shard as if it started at 0: wrong silently.
    if kwargs.get("position_ids") is None:
        raise ValueError("under Ulysses sequence parallelism the model must get position_ids for its shard; "
                         "pass the batch through SequenceParallel.shard_batch(...)")


def install(model: nn.Module, group: Any, rank: int, world: int, config: SequenceParallelConfig) -> dict[str, Any]:
    """Switch this model instance to Ulysses attention over ``group`` (``world`` ranks, this one ``rank``).

    ``config.attention``: ``"auto"``, ``"kernel"`` or ``"sdpa"`` (see :class:`SequenceParallelConfig`).
    """
    attns = _attention_modules(model)
    text = model.config.get_text_config()
    plan = HeadPlan.build(text.num_attention_heads, getattr(text, "num_key_value_heads", None)
                          or text.num_attention_heads, world)
    state = _UlyssesState(plan, rank, group, LayoutCache(group, world), plan.local_kv_index(rank), config.attention)
    undo = switch_attention(model, ATTN_KEY, ulysses_attention, ulysses_mask, attns, _STATE_ATTR, lambda m: state)
    undo["hook"] = model.register_forward_pre_hook(_require_position_ids, with_kwargs=True)
    undo["touched"] = len(attns)
    return undo


def uninstall(model: nn.Module, undo: dict[str, Any]) -> None:
    """Undo :func:`install` on this instance."""
    undo["hook"].remove()
    restore_attention(model, undo)
