"""A bounded KV cache for LM-Infinite decoding: ``sink`` columns + a ring of the last ``n_local`` tokens.

transformers 5 removed ``SinkCache``; this is ours. Layers report the *logical* length (all tokens seen)
so transformers derives positions and mask sizes as if nothing was evicted, while memory stays
``sink + n_local`` tokens per layer, preallocated once. Keys are stored post-RoPE at their true positions
(never re-rotated in the cache): LM-Infinite's distance limit is applied at attention time.

Layout of the keys/values a layer returns to the attention:

* one new token (decode) after the ring has wrapped: ``[sinks | ring]`` *views* of the buffers, no copy.
  The ring is in slot order, not position order; every ring token is inside the query's window, so the
  order does not matter for one query;
* otherwise: position order ``[sinks | most recent tokens]`` (``[all tokens]`` before any eviction).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["LMInfiniteCache", "LMInfiniteLayer", "sink_columns"]


def sink_columns(attention_mask: torch.Tensor | None, n_global: int) -> int:
    """Leading cache columns that hold every row's first ``n_global`` real tokens.

    With left padding, row ``b`` starts after ``pad_b`` padding columns, so the sink region must span
    ``n_global + max_b pad_b`` columns to keep each row's global tokens. The attention function uses the
    same rule, so the two always agree on which columns were kept.
    """
    if attention_mask is None or n_global == 0:
        return n_global
    mask = attention_mask.bool()
    first_real = torch.where(mask.any(-1), mask.int().argmax(-1), torch.zeros_like(mask[:, 0], dtype=torch.long))
    return n_global + int(first_real.max().item())


class LMInfiniteLayer(DynamicLayer):
    """Per-layer bounded cache: ``sink_cols`` fixed slots plus a ring of ``ring`` slots (``n_local``)."""

    is_croppable = False

    def __init__(self, sink_cols: int, ring: int):
        super().__init__()
        self.sink_cols = sink_cols
        self.ring = ring
        self.n_seen = 0

    # -- storage ---------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = self.sink_cols + self.ring
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(b, h, cap, d)
        self.values = value_states.new_empty(b, value_states.shape[1], cap, value_states.shape[-1])
        self.is_initialized = True

    def _store(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Write tokens with logical indices ``start .. start + T - 1`` into their slots."""
        s, r = self.sink_cols, self.ring
        t = k.shape[-2]
        n_sink = max(0, min(s - start, t))  # leading tokens that belong to the sink region
        if n_sink:
            self.keys[:, :, start:start + n_sink] = k[:, :, :n_sink]
            self.values[:, :, start:start + n_sink] = v[:, :, :n_sink]
        first = start + n_sink  # logical index of the first ring token
        k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        if k.shape[-2] > r:  # only the last `ring` tokens can survive
            first += k.shape[-2] - r
            k, v = k[:, :, -r:], v[:, :, -r:]
        n = k.shape[-2]
        if n == 0:
            return
        slot = (first - s) % r
        head = min(n, r - slot)
        self.keys[:, :, s + slot:s + slot + head] = k[:, :, :head]
        self.values[:, :, s + slot:s + slot + head] = v[:, :, :head]
        if head < n:  # wrap around
            self.keys[:, :, s:s + n - head] = k[:, :, head:]
            self.values[:, :, s:s + n - head] = v[:, :, head:]

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored tokens in position order (a copy once the ring has wrapped)."""
        s, r, seen = self.sink_cols, self.ring, self.n_seen
        if seen <= s + r:
            return self.keys[:, :, :seen], self.values[:, :, :seen]
        slot = (seen - s) % r  # oldest ring token
        idx = torch.cat([torch.arange(s), s + (torch.arange(r) + slot) % r]).to(self.keys.device)
        return self.keys.index_select(2, idx), self.values.index_select(2, idx)

    # -- transformers' layer API -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, start = key_states.shape[-2], self.n_seen
        if t == 1 and start + 1 > self.sink_cols + self.ring:
            # Decode after the ring wrapped: overwrite the slot of the token leaving the window, return views.
            self._store(key_states, value_states, start)
            self.n_seen += 1
            return self.keys, self.values
        if start == 0:
            keys, values = key_states, value_states  # prefill: attend over the prompt itself
        else:
            old_k, old_v = self._ordered()
            keys, values = torch.cat([old_k, key_states], dim=-2), torch.cat([old_v, value_states], dim=-2)
        self._store(key_states, value_states, start)
        self.n_seen += t
        return keys, values

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "LMInfiniteCache cannot be cropped (evicted tokens are gone): assisted/speculative generation "
            "is not supported with lm_infinite bounded_cache=True; use LMInfiniteConfig(bounded_cache=False)"
        )

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.n_seen = 0

    def stored_tokens(self) -> int:
        return min(self.n_seen, self.sink_cols + self.ring)


class LMInfiniteCache(Cache):
    """KV cache whose memory stays ``n_global (+ left padding) + n_local`` tokens per layer.

    Args:
        num_layers: decoder layers of the model.
        n_global: LM-Infinite sink size. n_local: LM-Infinite window.
        attention_mask: the prompt's 2-D padding mask (needed with left padding, so each row keeps its
            own first ``n_global`` real tokens).

    ``apply_patches(model, lm_infinite=...)`` makes ``model.generate()`` build this cache automatically.
    """

    def __init__(self, num_layers: int, n_global: int, n_local: int, attention_mask: torch.Tensor | None = None):
        self.n_global, self.n_local = n_global, n_local
        sink = sink_columns(attention_mask, n_global)
        super().__init__(layers=[LMInfiniteLayer(sink, n_local) for _ in range(num_layers)])

    @property
    def sink_cols(self) -> int:
        return self.layers[0].sink_cols

    def stored_tokens(self) -> int:
        """Tokens actually held per layer (the memory bound), as opposed to ``get_seq_length()``."""
        return self.layers[0].stored_tokens()
