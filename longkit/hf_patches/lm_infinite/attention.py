"""LM-Infinite's attention function and mask builder (registered under ``longkit_lm_infinite``).

* the mask builder returns only the 2-D padding mask (or ``None``): the Λ pattern is applied inside the
  attention from positions, so no T×T mask is ever built;
* CUDA tensors without padding go to the shared Triton kernel (:func:`longkit.kernels.masked_attention` with a
  ``sink_window`` mask and the rotated ``q_global``/``k_global`` pair); one-query decode steps to one fused SDPA
  call with the distance limit folded into the sink keys; steps of the static cache to
  :func:`~.static_cache.static_decode_attention`; everything else to the chunked PyTorch path
  (:func:`longkit.kernels.lambda_attn.chunked_lambda_attention`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import LMInfiniteConfig
from ...errors import UnsupportedModelError
from ...kernels.lambda_attn import LambdaPositions, chunked_lambda_attention
from ...kernels.rope import naive_rope_rotate, rope_angles, rotate_with
from .cache import sink_columns
from .static_cache import chunk_key_positions, static_decode_attention, static_layer_of

ATTN_KEY = "longkit_lm_infinite"
STATE_ATTR = "_longkit_lm_infinite"

__all__ = ["ATTN_KEY", "STATE_ATTR", "LayerState", "lm_infinite_attention", "lm_infinite_mask"]


@dataclass
class LayerState:
    cfg: LMInfiniteConfig  # resolved: n_local and limit_distance are ints
    rotary: nn.Module  # the model's rotary embedding (inv_freq read at call time: device moves follow)


# ---------------------------------------------------------------------------------------------- mask
def lm_infinite_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function: Any = None, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Mask builder for ``AttentionMaskInterface``: the 2-D padding mask ``[B, kv_length]`` or ``None``.

    Returning only padding keeps memory O(T); the attention applies the Λ rule from positions.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


# ---------------------------------------------------------------------------------------------- attention
_LAST_POS: list = [None, 0]  # (weakref to the position_ids tensor of the current forward, its last value)


def _last_position(position_ids: torch.Tensor) -> int:
    """``position_ids[0, -1]`` as an int, read from the device once per forward (not once per layer)."""
    ref = _LAST_POS[0]
    if ref is None or ref() is not position_ids:
        _LAST_POS[0] = weakref.ref(position_ids)
        _LAST_POS[1] = int(position_ids.reshape(-1)[-1].item())
    return _LAST_POS[1]


def _mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, L]`` of the logical columns of a 2-D padding mask (``cumsum - 1``; -1 = padding)."""
    return torch.where(mask, mask.long().cumsum(-1) - 1, torch.full_like(mask, -1, dtype=torch.long))


def _positions(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, n_global: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query positions ``[B, Tq]``, key positions ``[B, Tk]`` (-1 = padding) and the sink column count."""
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise UnsupportedModelError(
            f"lm_infinite received a {attention_mask.dim()}-D attention mask; only 2-D padding masks are "
            "supported (custom 4-D masks cannot be combined with the Λ pattern)"
        )
    if position_ids is None:
        raise UnsupportedModelError(
            "lm_infinite needs `position_ids` in the attention kwargs; this model's attention does not pass them"
        )
    q_pos = position_ids.to(query.device).long().expand(b, tq)
    if attention_mask is None:
        if tk == tq:  # no cache: the keys are these very tokens
            if tq > 1 and bool((q_pos[:, 1:] < q_pos[:, :-1]).any()):
                raise UnsupportedModelError(
                    "lm_infinite does not support packed sequences (position_ids that restart inside a row)"
                )
            return q_pos, q_pos, n_global
        logical = _last_position(position_ids) + 1
        k_all = torch.arange(logical, device=query.device).expand(b, logical)
        sink = n_global
    else:
        mask = attention_mask.to(query.device).bool()
        logical = mask.shape[-1]
        k_all = _mask_positions(mask)
        expected = k_all[:, logical - tq:]
        real = expected >= 0
        if not torch.equal(q_pos[real], expected[real]):
            raise ValueError(
                "lm_infinite with padding needs position_ids = attention_mask.cumsum(-1) - 1 for real tokens "
                "(generate() does this; for a plain forward pass them explicitly)"
            )
        sink = sink_columns(mask, n_global)
    if tk == logical:
        return q_pos, k_all, sink
    if sink < tk < logical:  # bounded cache: sink columns + the most recent columns
        k_pos = torch.cat([k_all[:, :sink], k_all[:, logical - (tk - sink):]], dim=1)
        return q_pos, k_pos, sink
    raise ValueError(
        f"lm_infinite got {tk} cached keys for {logical} tokens with {sink} sink columns: the cache does not "
        "match the LM-Infinite layout (build LMInfiniteCache with the prompt's attention_mask, or let "
        "generate() create it)"
    )


def _kernel_path(query, key, value, q_pos, k_pos, sink, cfg, inv_freq, scaling):
    """Shared Triton kernel (CUDA, no padding): index mask ``sink_window`` + rotated global pair."""
    from ...kernels import masked_attention, sink_window

    tq, tk = query.shape[2], key.shape[2]
    n_g = min(sink, tk)
    q_global = naive_rope_rotate(query, cfg.limit_distance - q_pos, inv_freq) if n_g else None
    k_global = naive_rope_rotate(key[:, :, :n_g], -k_pos[:, :n_g], inv_freq) if n_g else None
    # With eviction the index distance to sink columns is always >= n_local, as the true distance is,
    # and window columns keep their relative index distances: the index-based mask is exact.
    mask = sink_window(n_g, cfg.n_local, q_offset=tk - tq)
    return masked_attention(query, key, value, mask=mask, scale=scaling, q_global=q_global, k_global=k_global)


_DECODE_MEMO: dict = {"key": None}


def _decode_tables(query, key, attention_mask, position_ids, cfg, inv_freq):
    """Per-forward tables for the one-query path (identical for every layer, so computed once).

    Returns ``(n_sink, cos, sin, attn_mask)``: the sink columns, the rotation folding the distance limit
    into them, and a bool mask ``[B, 1, 1, K]`` (or ``None`` when every key is visible).
    """
    b, k_len = query.shape[0], key.shape[2]
    memo_key = (id(cfg), k_len, b, attention_mask.data_ptr() if attention_mask is not None else None)
    ref = _DECODE_MEMO.get("pos_ref")
    if _DECODE_MEMO["key"] == memo_key and ref is not None and ref() is position_ids:
        return _DECODE_MEMO["tables"]
    dev = query.device
    p = position_ids.to(dev).long().expand(b, 1)  # [B, 1]
    if attention_mask is None:
        logical = _last_position(position_ids) + 1
        k_all = None
        sink = cfg.n_global
    else:
        mask = attention_mask.to(dev).bool()
        logical = mask.shape[-1]
        k_all = _mask_positions(mask)
        sink = sink_columns(mask, cfg.n_global)
    n_s = min(sink, k_len)
    visible = torch.ones(b, k_len, dtype=torch.bool, device=dev)
    need_mask = False
    s_pos = (torch.arange(n_s, device=dev).expand(b, n_s) if k_all is None else k_all[:, :n_s])
    if k_all is not None:
        # With left padding the sink region of a less-padded row also holds ordinary tokens (position >=
        # n_global): those are visible only inside the window.
        visible[:, :n_s] = (s_pos >= 0) & ((s_pos < cfg.n_global) | (p - s_pos < cfg.n_local))
        need_mask = True
    if k_len == logical:  # nothing evicted: window keys in position order, possibly farther than n_local
        w_pos = (torch.arange(n_s, k_len, device=dev).expand(b, -1) if k_all is None else k_all[:, n_s:])
        visible[:, n_s:] = (w_pos >= 0) & (p - w_pos < cfg.n_local)
        need_mask = need_mask or (k_len - n_s > cfg.n_local) or k_all is not None
    elif k_all is not None and not bool(attention_mask[:, logical - (k_len - n_s):].all()):
        raise ValueError("lm_infinite's bounded cache needs padding only on the left (found padding in the window)")
    delta = torch.where(p - s_pos >= cfg.n_local, p - cfg.limit_distance - s_pos, torch.zeros_like(s_pos))
    cos, sin = rope_angles(delta, inv_freq, dev)  # [B, 1, n_s, D/2]
    tables = (n_s, cos, sin, visible[:, None, None, :] if need_mask else None)
    _DECODE_MEMO.update(key=memo_key, pos_ref=weakref.ref(position_ids), tables=tables)
    return tables


def _decode_path(query, key, value, attention_mask, position_ids, cfg, inv_freq, scaling):
    """One query per row: fold the distance limit into the few sink keys, then one fused SDPA call.

    ``q'·k'`` of the global branch equals ``q · R(p - limit - s) k`` for the stored post-RoPE key at
    position ``s``, so rotating only the sink keys lets one attention call score both branches. Every
    other cached key is either inside the window (the bounded cache keeps exactly those) or masked.
    """
    import torch.nn.functional as F

    n_s, cos, sin, mask = _decode_tables(query, key, attention_mask, position_ids, cfg, inv_freq)
    if n_s:
        key = torch.cat([rotate_with(key[:, :, :n_s], cos, sin), key[:, :, n_s:]], dim=2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def lm_infinite_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None,
                          dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query [B,Hq,Tq,D]``, ``key/value [B,Hkv,Tk,D]`` (post-RoPE)
    -> ``([B, Tq, Hq, D], None)``."""
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} was switched to '{ATTN_KEY}' without longkit.apply_patches(model, "
            "lm_infinite=...); call apply_patches instead of set_attn_implementation"
        )
    if dropout and module.training:
        raise NotImplementedError("lm_infinite attention does not implement attention dropout")
    cfg = state.cfg
    inv_freq = state.rotary.inv_freq
    position_ids = kwargs.get("position_ids")
    static = static_layer_of(key)
    if static is not None:  # LMInfiniteStaticCache decode step: fixed shapes, positions on the device
        out = static_decode_attention(query, key, value, static, cfg.n_local, cfg.limit_distance, inv_freq, scaling)
        return out.transpose(1, 2).contiguous(), None
    k_pos = chunk_key_positions(key)
    if k_pos is not None:  # LMInfiniteStaticCache, several new tokens after the prompt: explicit positions
        if position_ids is None:
            raise UnsupportedModelError("lm_infinite needs `position_ids` in the attention kwargs")
        q_pos = position_ids.to(query.device).long().expand(query.shape[0], query.shape[2])
        out = chunked_lambda_attention(
            query, key, value, LambdaPositions(q_pos, k_pos), n_global=cfg.n_global, n_local=cfg.n_local,
            limit=cfg.limit_distance, inv_freq=inv_freq, scale=scaling, chunk=cfg.query_chunk,
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[2] == 1 and position_ids is not None:
        out = _decode_path(query, key, value, attention_mask, position_ids, cfg, inv_freq, scaling)
        return out.transpose(1, 2).contiguous(), None
    q_pos, k_pos, sink = _positions(query, key, attention_mask, position_ids, cfg.n_global)
    if query.is_cuda and attention_mask is None and _kernel_available():
        out = _kernel_path(query, key, value, q_pos, k_pos, sink, cfg, inv_freq, scaling)
    else:
        out = chunked_lambda_attention(
            query, key, value, LambdaPositions(q_pos, k_pos), n_global=cfg.n_global, n_local=cfg.n_local,
            limit=cfg.limit_distance, inv_freq=inv_freq, scale=scaling, chunk=cfg.query_chunk,
        )
    return out.transpose(1, 2).contiguous(), None


def _kernel_available() -> bool:
    try:
        import triton  # noqa: F401

        from ...kernels import masked_attention  # noqa: F401
    except ImportError:
        return False
    return True


