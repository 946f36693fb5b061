"""LM-Infinite's bounded cache with the older part of its window quantized (``lm_infinite=...`` + ``kv_cache=...``).

``apply_patches(model, lm_infinite=LMInfiniteConfig(...), kv_cache=KVCacheConfig(...))`` keeps what LM-Infinite keeps
(the first ``n_global`` tokens and the last ``n_local``), and quantizes what leaves the full-precision window of the
newest ``residual_length`` tokens. Per row and layer, addressed by *position* (left padding is never stored):

* **sinks**: positions ``s < n_global``, full precision (post-RoPE at ``s``; LM-Infinite's distance limit is applied
  at read time, as its own caches do);
* **window**: the newest ``residual_length`` tokens, full precision (the model's last columns);
* **ring**: packed records (:mod:`longkit.kernels.kv_quant`) of the ``C = n_local - residual_length - 1`` positions
  just before the window: position ``s >= n_global`` in slot ``(s - n_global) % C``. A ring fills its slots in order
  before it wraps, so a row's valid slots are always a prefix (``lengths[b]``), which is what the decode kernel reads.

A decode query at ``p`` sees the sinks (true distance inside the window, else ``limit_distance``: LM-Infinite's rule),
the ring and the window (positions ``p - n_local + 1 .. p``, all at their true distance): exactly LM-Infinite's keys,
those of the ring read from their packed records. One softmax: the sinks and the window in fp32, the ring through
:func:`~longkit.kernels.kv_quant.quantized_decode_attention`, merged by their log-sum-exps. The prompt runs through
LM-Infinite's own attention in full precision, then its keys are written to the three parts (the ring gets the ``C``
positions before the window, quantized once). Memory is fixed per row: ``n_global + residual_length`` full-precision
tokens and ``C`` packed records per layer, whatever the length.

Not supported (errors say so): KIVI's per-channel keys (its groups span tokens, the ring overwrites single slots),
a multi-token forward after the prompt (chunked prefill), beam search, cropping, the CUDA-graph decode runner.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ...config import KVCacheConfig
from ...errors import ConfigError, UnsupportedModelError
from ...kernels.kv_quant import (
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    bytes_per_token,
    merge_attention_states,
    quantize_kv,
    quantized_decode_attention,
)
from ...kernels.rope import rope_angles, rotate_with
from ..attention import text_config
from ..lm_infinite.attention import STATE_ATTR as LMI_STATE
from ..lm_infinite.attention import lm_infinite_attention
from .attention import STATE_ATTR, dense_attention_lse
from .cache import as_config, check_spec_fits, model_head_dim, packed_bytes_per_token, summed_memory

__all__ = ["BoundedQuantizedKVCache", "BoundedQuantizedLayer", "bounded_attention", "check_bounded_options",
           "ring_plan", "BOUNDED_ATTN_KEY"]

BOUNDED_ATTN_KEY = "longkit_kv_cache_lm_infinite"
_LAYER_ATTR = "_longkit_bounded_kv_layer"  # on the keys update() returns: a weakref to the layer
_RAW_DTYPES = (torch.bfloat16, torch.float16)


def check_bounded_options(cfg: KVCacheConfig, n_local: int) -> int:
    """Check a :class:`KVCacheConfig` against LM-Infinite's window; returns the ring size ``C``."""
    if cfg.key_axis == "channel":
        raise NotImplementedError(
            "kv_cache with key_axis='channel' (KIVI) cannot be combined with lm_infinite: KIVI's key groups span "
            "group_size tokens, while LM-Infinite's ring overwrites one slot per step; use key_axis='token'"
        )
    ring = n_local - cfg.residual_length - 1
    if ring < 1:
        raise ConfigError(
            f"kv_cache residual_length={cfg.residual_length} leaves nothing to quantize inside LM-Infinite's window "
            f"n_local={n_local} (the packed ring holds n_local - residual_length - 1 tokens); use "
            f"KVCacheConfig(residual_length<={n_local - 2})"
        )
    return ring


def ring_plan(pad: torch.Tensor, last: int, n_global: int, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed ring after the prompt columns ``< last`` (the full-precision window excluded): per row and ring
    slot the column whose token it holds (position ``s >= n_global`` in slot ``(s - n_global) % ring``, the latest
    such position), and each row's valid length (its valid slots are a prefix)."""
    hi = (last - 1) - pad  # [B] position of the newest column before the window
    slots = torch.arange(ring, device=pad.device)
    owner = hi[:, None] - torch.remainder(hi[:, None] - n_global - slots[None], ring)  # latest position per slot
    cols = (owner + pad[:, None]).clamp(0, max(last - 1, 0))
    return cols, (hi - n_global + 1).clamp(0, ring)


class _Rows:
    """Per-row bookkeeping shared by the layers: left padding of the prompt (device) and its host minimum."""

    def __init__(self, attention_mask: torch.Tensor | None):
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            first = torch.where(mask.any(-1), mask.int().argmax(-1), torch.zeros_like(mask[:, 0], dtype=torch.long))
            self.pad: torch.Tensor | None = first.long()
            self.min_pad = int(first.min().item())  # one sync, at construction
        else:
            self.pad, self.min_pad = None, 0

    def padding(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.pad is None:
            self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        if self.pad.shape[0] != batch:
            raise ValueError(f"BoundedQuantizedKVCache was built for batch {self.pad.shape[0]}, got {batch}")
        if self.pad.device != device:
            self.pad = self.pad.to(device)
        return self.pad


class BoundedQuantizedLayer(CacheLayerMixin):
    """One layer of :class:`BoundedQuantizedKVCache`: sinks, a packed ring and a full-precision window."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, rows: _Rows, cfg: KVCacheConfig, spec: KVQuantSpec, layer_idx: int, n_global: int,
                 n_local: int):
        super().__init__()
        self.rows, self.cfg, self.spec, self.layer_idx = rows, cfg, spec, layer_idx
        self.n_global, self.n_local = n_global, n_local
        self.residual_length = cfg.residual_length
        self.ring = check_bounded_options(cfg, n_local)
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        self.state: KVQuantState | None = None
        self.packed: PackedKV | None = None
        self.lengths: torch.Tensor | None = None  # [B] valid ring slots per row
        self.ring_used = 0  # host: the largest lengths[b] (0 = skip the packed part)
        self.n_seen = 0  # columns written (left padding included)
        self.mode = "prefill"
        self.pending = False
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.rows.padding(b, key_states.device)
        self.sink_keys = key_states.new_zeros(b, h, self.n_global, d)
        self.sink_values = value_states.new_zeros(b, h, self.n_global, value_states.shape[-1])
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.state = KVQuantState.create(self.spec, d, h, key_states.device, layer_idx=self.layer_idx)
        raw = key_states.dtype if key_states.dtype in _RAW_DTYPES else torch.float16
        self.packed = PackedKV.allocate(self.spec, b, h, self.ring, d, device=key_states.device, raw_dtype=raw)
        self.lengths = torch.zeros(b, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt: returned whole (LM-Infinite's attention runs on it, then :meth:`flush` stores it). A decode
        step: its token is appended to the window (and to the sinks if its position is below ``n_global``)."""
        if self.pending:
            self.pending = False
            raise RuntimeError(
                "BoundedQuantizedKVCache: the previous forward's attention did not run longkit's kv_cache + "
                "lm_infinite attention, so nothing was stored. Patch the model first: "
                "longkit.apply_patches(model, lm_infinite=..., kv_cache=...)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self.pending = True
        if self.n_seen == 0:
            self.mode = "prefill"
            self.n_seen = t
            setattr(key_states, _LAYER_ATTR, weakref.ref(self))
            return key_states, value_states
        if t != 1:
            self.pending = False
            raise NotImplementedError(
                f"lm_infinite + kv_cache handles the prompt and then one token per forward; this forward has {t} new "
                "tokens after the prompt (chunked prefill / speculative verification). Feed the whole prompt at once"
            )
        self.mode = "decode"
        if self.n_global:
            pos = self.n_seen - self.rows.pad  # [B] position of the new token
            is_sink = (pos >= 0) & (pos < self.n_global)
            slot = pos.clamp(0, self.n_global - 1).view(-1, 1, 1, 1)
            for store, new in ((self.sink_keys, key_states), (self.sink_values, value_states)):
                idx = slot.expand(-1, store.shape[1], 1, store.shape[-1])
                cur = store.gather(2, idx)
                store.scatter_(2, idx, torch.where(is_sink.view(-1, 1, 1, 1), new, cur))
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.n_seen += 1
        setattr(self.keys, _LAYER_ATTR, weakref.ref(self))
        return self.keys, self.values

    # -- the attention's side ----------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return self.state is not None and self.state.prunes and self.state.key_channels is None

    def flush_prompt(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """After the prompt's attention: sinks, the ring (quantized) and the window from its ``T`` columns."""
        self.pending = False
        b, h, t, d = key.shape
        pad = self.rows.pad
        if self.n_global:
            cols = (pad[:, None] + torch.arange(self.n_global, device=pad.device)[None]).clamp(max=t - 1)
            idx = cols[:, None, :, None]
            self.sink_keys.copy_(key.gather(2, idx.expand(-1, h, -1, d)))
            self.sink_values.copy_(value.gather(2, idx.expand(-1, h, -1, value.shape[-1])))
        w = min(t, self.residual_length)
        self.ring_used = max(0, min(t - w - self.rows.min_pad - self.n_global, self.ring))
        if self.ring_used:
            cols, self.lengths = ring_plan(self.rows.pad, t - w, self.n_global, self.ring)
            idx = cols[:, None, :, None]
            ring_k = key.gather(2, idx.expand(-1, h, -1, d))
            ring_v = value.gather(2, idx.expand(-1, h, -1, value.shape[-1]))
            quantize_kv(ring_k, ring_v, self.spec, self.state, out=self.packed, start=0)
        self.keys = key[:, :, t - w:].clone()
        self.values = value[:, :, t - w:].clone()

    def decode_step(self, query: torch.Tensor, n_local: int, limit: int, inv_freq: torch.Tensor, scale: float
                    ) -> torch.Tensor:
        """A decode step's attention ``[B, Hq, 1, D]`` (see the module docstring); then the window's oldest token
        moves to the ring."""
        out = _decode(self, query, n_local, limit, inv_freq, scale)
        self.flush_step()
        return out

    def flush_step(self) -> None:
        """After a decode step's attention: the window's oldest token (if it is full) moves to its ring slot."""
        self.pending = False
        if self.keys.shape[2] <= self.residual_length:
            return
        col = self.n_seen - self.keys.shape[2]  # the column leaving the window
        pos = col - self.rows.pad  # [B]
        into_ring = pos >= self.n_global  # below: a sink or padding, nothing to store (that row's ring is empty)
        slot = torch.where(into_ring, torch.remainder(pos - self.n_global, self.ring), torch.zeros_like(pos))
        quantize_kv(self.keys[:, :, :1], self.values[:, :, :1], self.spec, self.state, out=self.packed, start=slot)
        self.lengths = torch.where(into_ring, (pos - self.n_global + 1).clamp(max=self.ring), self.lengths)
        self.ring_used = max(0, min(col - self.rows.min_pad - self.n_global + 1, self.ring))
        self.keys = self.keys[:, :, 1:].clone()
        self.values = self.values[:, :, 1:].clone()

    # -- transformers' layer API ---------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # memory is bounded, positions are not

    def reset(self) -> None:
        self._clear()

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(f"lm_infinite + kv_cache cannot {what} (evicted tokens are gone and the ring is "
                                  "per row); use greedy decoding or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop the cache (assisted/speculative generation)")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._refuse("reorder rows (beam search)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("repeat rows")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("select rows")

    def offload(self) -> None:
        raise NotImplementedError("BoundedQuantizedKVCache does not support cache offloading")

    def memory(self) -> dict[str, float]:
        """Bytes of this layer: ``packed_used`` (records of the ring's valid slots), ``packed_allocated`` (the ring),
        ``window`` (full-precision newest tokens and the sinks)."""
        if not self.is_initialized:
            return {"packed_used": 0.0, "packed_allocated": 0.0, "window": 0.0}
        per = bytes_per_token(self.spec, self.packed.layout.head_dim, self.packed.num_kv_heads)
        fp = sum(float(x.nbytes) for x in (self.keys, self.values, self.sink_keys, self.sink_values))
        return {"packed_used": per * float(self.lengths.sum().item()), "packed_allocated": float(self.packed.nbytes()),
                "window": fp}


class BoundedQuantizedKVCache(Cache):
    """LM-Infinite's bounded cache (sinks + window) whose older window tokens are stored quantized.

    Args:
        config: the model's config (layers and head dim are read).
        kv_cache: a :class:`~longkit.KVCacheConfig`, a dict of its options, or ``None``/``True`` (defaults).
        n_global, n_local: LM-Infinite's sink count and window (``apply_patches`` passes the resolved values).
        attention_mask: the prompt's 2-D padding mask ``[B, T]`` (left padding), or ``None``.

    ``apply_patches(model, lm_infinite=..., kv_cache=...)`` makes ``generate()`` build it.
    """

    def __init__(self, config: Any, kv_cache: KVCacheConfig | dict | bool | None, n_global: int,  # noqa: ANN401
                 n_local: int, attention_mask: torch.Tensor | None = None):
        cfg = as_config(kv_cache)
        tcfg = text_config(config)
        spec = cfg.spec()
        check_spec_fits(spec, model_head_dim(tcfg))
        check_bounded_options(cfg, n_local)
        self.kv_config, self.spec = cfg, spec
        self.n_global, self.n_local = n_global, n_local
        rows = _Rows(attention_mask)
        super().__init__(layers=[BoundedQuantizedLayer(rows, cfg, spec, i, n_global, n_local)
                                 for i in range(tcfg.num_hidden_layers)])

    def memory(self) -> dict[str, float]:
        """Bytes summed over the layers (see :meth:`BoundedQuantizedLayer.memory`)."""
        return summed_memory(self.layers)

    def bytes_per_token(self) -> float:
        """Exact packed bytes per token of one layer (scales and sketches included); ``0`` before the first update."""
        return packed_bytes_per_token(self)

    def packed_tokens(self) -> int:
        """Ring slots in use in the fullest row (at most ``n_local - residual_length - 1``)."""
        return self.layers[0].ring_used


def bounded_layer_of(key: torch.Tensor) -> BoundedQuantizedLayer | None:
    ref = getattr(key, _LAYER_ATTR, None)
    return ref() if ref is not None else None


def _decode(layer: BoundedQuantizedLayer, query: torch.Tensor, n_local: int, limit: int, inv_freq: torch.Tensor,
            scale: float) -> torch.Tensor:
    """One query per row over sinks + ring + window (see the module docstring); ``[B, Hq, 1, D]``."""
    pad, s = layer.rows.pad, layer.n_global
    p = (layer.n_seen - 1) - pad  # [B] query positions
    w = layer.keys.shape[2]
    keys, values, visible = [layer.keys], [layer.values], []
    wpos = (layer.n_seen - w + torch.arange(w, device=pad.device))[None] - pad[:, None]
    if s:
        sp = torch.arange(s, device=pad.device)[None]
        delta = torch.where(p[:, None] - sp >= n_local, p[:, None] - limit - sp, torch.zeros_like(sp))
        cos, sin = rope_angles(delta, inv_freq, query.device)
        keys.insert(0, rotate_with(layer.sink_keys, cos, sin))
        values.insert(0, layer.sink_values)
        visible.append(sp <= p[:, None])
    visible.append(wpos >= s)  # window tokens below n_global are the sinks, counted once
    vis = torch.cat(visible, dim=1)[:, None, None, :]
    out, lse = dense_attention_lse(query, torch.cat(keys, dim=2), torch.cat(values, dim=2), vis, scale)
    if layer.ring_used:
        ring = layer.packed.narrow_tokens(0, layer.ring_used)
        past, past_lse = quantized_decode_attention(query, ring, layer.spec, layer.state, scale, layer.lengths,
                                                    causal=False, return_lse=True)
        out, _ = merge_attention_states(out, lse, past.float(), past_lse)
    return out.to(query.dtype)


def bounded_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function of ``lm_infinite + kv_cache``: LM-Infinite's attention for the prompt and for
    forwards without this cache, the quantized bounded cache for decode steps."""
    lmi = getattr(module, LMI_STATE, None)
    if getattr(module, STATE_ATTR, None) is None or lmi is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} was switched to '{BOUNDED_ATTN_KEY}' without longkit.apply_patches(model, "
            "lm_infinite=..., kv_cache=...); call apply_patches instead of set_attn_implementation"
        )
    layer = bounded_layer_of(key)
    if layer is None or layer.mode == "prefill":
        out = lm_infinite_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
        if layer is not None:
            if layer.needs_calibration:
                real = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask.bool()
                if real is not None:
                    w = real[:, None, :, None].to(query.dtype)
                    layer.state.calibrate(query * w, key * w)
                else:
                    layer.state.calibrate(query, key)
            layer.flush_prompt(key, value)
        return out
    if dropout and module.training:
        raise NotImplementedError("lm_infinite + kv_cache attention does not implement attention dropout")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = layer.decode_step(query, lmi.cfg.n_local, lmi.cfg.limit_distance, lmi.rotary.inv_freq, scale)
    return out.transpose(1, 2).contiguous(), None
