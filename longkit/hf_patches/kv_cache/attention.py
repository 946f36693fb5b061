"""The attention function of the quantized KV cache (registered under ``longkit_kv_cache``).

With a :class:`~.cache.QuantizedKVCache`, ``update()`` hands the attention the full-precision window (the newest
tokens, this forward's among them) and the attention finds the layer from it. Then, per layer and forward:

1. ThinK calibration (``keep_channels < 1``), once: the kept key channels are chosen from this first forward's
   post-RoPE queries and keys (the prompt), before any token is quantized;
2. nothing packed yet (the prompt, short runs): transformers' own SDPA attention over the window, so the output
   is exactly the stock model's;
3. otherwise: the packed part through :func:`~longkit.kernels.kv_quant.quantized_decode_attention` (``causal=False``:
   every packed token precedes every query; per-row ``lengths`` skip padding) and the window in full precision
   (fp32, the mask's columns), each returning its log-sum-exp, merged by
   :func:`~longkit.kernels.kv_quant.merge_attention_states`. A chunk of several new tokens (chunked prefill,
   speculative verification) is handled the same way: its tokens attend to each other in full precision;
4. the layer quantizes what left the window (:meth:`~.cache.QuantizedKVLayer.flush`).

The mask builder is transformers' ``sdpa_mask`` (causal + padding, ``None`` when nothing needs masking), so the
attention sees the stock mask. Without a quantized cache (training, ``use_cache=False``, evaluation forwards) the
function is transformers' SDPA attention unchanged: quantization concerns the cache only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import sdpa_mask

from ...errors import UnsupportedModelError
from ...kernels.kv_quant import merge_attention_states, quantized_decode_attention
from .cache import QuantizedKVLayer, layer_of

ATTN_KEY = "longkit_kv_cache"
STATE_ATTR = "_longkit_kv_cache"
_SCORE_ELEMS = 1 << 24  # fp32 scores per query chunk of the full-precision part (64 MiB)

__all__ = ["ATTN_KEY", "STATE_ATTR", "kv_cache_attention", "kv_cache_mask", "dense_attention_lse"]


# The mask builder registered for ATTN_KEY: transformers' own (bool ``[B, 1, Tq, Tk]``, or ``None`` when nothing
# needs masking), so the attention sees exactly the stock mask.
kv_cache_mask = sdpa_mask


def dense_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision attention with its log-sum-exp, fp32 math, query chunks of bounded memory.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` (GQA: ``Hq`` a multiple of ``Hkv``).
        visible: bool ``[B or 1, 1, Tq, Tk]`` (True = attend), or ``None`` for causal attention of the queries as
            the last ``Tq`` of the ``Tk`` keys.
        scale: softmax scale.

    Returns:
        ``(out [B, Hq, Tq, D] fp32, lse [B, Hq, Tq] fp32)``; a query that sees no key gets 0 and ``-inf``.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # GQA without copies: the query heads of one KV head form one axis ([B, Hkv, group, Tq, D]; head h = kv·group + j).
    qf = q.float().reshape(B, Hkv, group, Tq, D)
    kt = k.float()[:, :, None].transpose(-1, -2)
    vf = v.float()[:, :, None]
    step = max(1, _SCORE_ELEMS // max(1, B * Hq * Tk))
    outs, lses = [], []
    for s in range(0, Tq, step):
        e = min(Tq, s + step)
        scores = (qf[:, :, :, s:e] @ kt) * scale  # [B, Hkv, group, e - s, Tk]
        if visible is None:
            i = torch.arange(s, e, device=q.device)[:, None]
            j = torch.arange(Tk, device=q.device)[None, :]
            scores = scores.masked_fill(j > Tk - Tq + i, float("-inf"))
        else:
            scores = scores.masked_fill(~visible[:, :, None, s:e], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        outs.append((probs @ vf).reshape(B, Hq, e - s, D))
        lses.append(lse.reshape(B, Hq, e - s))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _bool_mask(mask: torch.Tensor | None, q: torch.Tensor, n_cols: int) -> torch.Tensor | None:
    """The 4-D mask as bool ``[B, 1, Tq, n_cols]`` (True = attend), checked against the cache's columns."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise UnsupportedModelError(f"kv_cache attention expects a 4-D attention mask (transformers' sdpa_mask), got "
                                    f"shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:  # an additive float mask: 0 where visible
        mask = mask == 0
    if mask.shape[-1] != n_cols or mask.shape[-2] != q.shape[2]:
        raise ValueError(f"kv_cache attention: the mask covers {mask.shape[-1]} key columns for {mask.shape[-2]} "
                         f"queries, but the quantized cache holds {n_cols} columns for {q.shape[2]} queries; pass "
                         "attention_mask for every column (prompt and generated tokens), as generate() does")
    return mask.expand(q.shape[0], 1, -1, -1)


def _attend(layer: QuantizedKVLayer, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
            kwargs: dict[str, Any]) -> torch.Tensor:
    """One layer's attention over the quantized cache (packed part + window) and the flush after it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    P, W, Tq = layer.n_packed, key.shape[2], query.shape[2]
    mask = _bool_mask(attention_mask, query, P + W)
    # What the last query sees = the real (non-padding) columns: every earlier column, causally.
    real = None if mask is None else mask[:, 0, -1, P:]
    if layer.needs_calibration:
        layer.calibrate(query, key[:, :, W - Tq:], None if real is None else real[:, W - Tq:])
    packed, lengths = layer.packed_view()
    if packed is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    else:
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        dense, dense_lse = dense_attention_lse(query, key, value, None if mask is None else mask[..., P:], scale)
        past, past_lse = quantized_decode_attention(query, packed, layer.spec, layer.state, scale, lengths,
                                                    causal=False, return_lse=True)
        out, _ = merge_attention_states(dense, dense_lse, past.float(), past_lse)
        out = out.to(query.dtype).transpose(1, 2).contiguous()
    layer.flush(real)
    return out


def kv_cache_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query [B, Hq, Tq, D]``, ``key/value [B, Hkv, Tk, D]`` (post-RoPE; with a
    quantized cache, its full-precision window) -> ``([B, Tq, Hq, D], None)``."""
    if getattr(module, STATE_ATTR, None) is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} was switched to '{ATTN_KEY}' without longkit.apply_patches(model, "
            "kv_cache=...); call apply_patches instead of set_attn_implementation"
        )
    layer = layer_of(key)
    if layer is None:  # no cache (training, use_cache=False) or not a quantized one: stock SDPA attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise NotImplementedError("kv_cache attention over a quantized cache does not implement attention dropout; "
                                  "call model.eval() for generation")
    return _attend(layer, module, query, key, value, attention_mask, scaling, kwargs), None
