"""A bounded KV cache for LM-Infinite decoding: ``sink`` columns + the last ``n_local - 1`` columns.

transformers 5 removed ``SinkCache``; this is ours. Layers report the *logical* length (all tokens
seen) so transformers derives positions and mask sizes as if nothing was evicted, while memory stays
``O(sink + n_local)`` per layer. Keys are stored post-RoPE at their true positions (never
re-rotated): LM-Infinite's distance limit is applied at attention time.
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
    """Per-layer bounded cache. After each update it keeps ``sink_cols`` leading columns and the last
    ``n_keep`` columns (``n_local - 1``: what the next query needs besides itself)."""

    is_croppable = False

    def __init__(self, sink_cols: int, n_keep: int):
        super().__init__()
        self.sink_cols = sink_cols
        self.n_keep = n_keep
        self.n_seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        self.n_seen += key_states.shape[-2]
        if self.keys.shape[-2] > self.sink_cols + self.n_keep:
            s, w = self.sink_cols, self.n_keep
            tail = slice(self.keys.shape[-2] - w, None)
            # Copy so the evicted middle can be freed (slices would keep the whole tensor alive).
            self.keys = torch.cat([self.keys[..., :s, :], self.keys[..., tail, :]], dim=-2)
            self.values = torch.cat([self.values[..., :s, :], self.values[..., tail, :]], dim=-2)
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
        super().reset()
        self.n_seen = 0


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
        super().__init__(layers=[LMInfiniteLayer(sink, max(n_local - 1, 0)) for _ in range(num_layers)])

    @property
    def sink_cols(self) -> int:
        return self.layers[0].sink_cols

    def stored_tokens(self) -> int:
        """Tokens actually held per layer (the memory bound), as opposed to ``get_seq_length()``."""
        layer = self.layers[0]
        return 0 if layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2]
