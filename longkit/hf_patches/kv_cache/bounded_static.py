"""The quantized bounded cache with fixed buffers and device-side bookkeeping: graph-capturable decode steps.

``apply_patches(model, lm_infinite=LMInfiniteConfig(decode="static" | "cuda_graph"), kv_cache=KVCacheConfig(...))``
makes ``generate()`` build :class:`StaticBoundedQuantizedKVCache`. It keeps what
:class:`~.bounded.BoundedQuantizedKVCache` keeps (LM-Infinite's sinks, the newest ``residual_length + 1`` tokens in
full precision, the ``C = n_local - residual_length - 1`` positions before them packed) with the same results, but
every one-token decode step runs the same kernels on the same buffers with no host synchronisation, so
``decode="cuda_graph"`` can replay it from a CUDA graph.

Layout per row and layer, addressed by position (left padding is never stored):

* the full-precision part is LM-Infinite's static layer (:class:`~..lm_infinite.static_cache.LMInfiniteStaticLayer`)
  with a ring of ``W = residual_length + 1`` slots: ``[raw sinks | rotated sinks | window ring]``, positions and
  visibility shared by the layers on the device;
* the packed ring holds ``C`` records plus one spare slot: position ``e >= n_global`` in slot
  ``(e - n_global) % C``. A decode step at position ``q`` first moves the window slot's previous token (position
  ``q - W``) into the packed ring, quantized (rows with nothing to move write the spare slot, which is never read),
  then writes the new token into the window. The valid packed slots of a row are a prefix, ``lengths[b] =
  clamp(q - W - n_global + 1, 0, C)``, computed on the device.

A step's attention: the sinks (LM-Infinite's rotation rule) and the window in fp32 with their log-sum-exp, the packed
ring through :func:`~longkit.kernels.kv_quant.quantized_decode_attention` (fixed ``C + 1`` slots, device lengths),
merged. The prompt runs through LM-Infinite's attention in full precision and is then written to the three parts.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ...config import KVCacheConfig
from ...kernels.kv_quant import (
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    bytes_per_token,
    merge_attention_states,
    quantize_kv,
    quantized_decode_attention,
)
from ...kernels.rope import rotate_with
from ..attention import text_config
from ..lm_infinite.static_cache import LMInfiniteStaticCache, LMInfiniteStaticLayer, _Shared, step_tables
from .attention import dense_attention_lse
from .bounded import _LAYER_ATTR, _RAW_DTYPES, check_bounded_options, ring_plan
from .cache import as_config, check_spec_fits, model_head_dim, packed_bytes_per_token, summed_memory

__all__ = ["StaticBoundedQuantizedKVCache", "StaticBoundedQuantizedLayer"]


class StaticBoundedQuantizedLayer(LMInfiniteStaticLayer):
    """One layer of :class:`StaticBoundedQuantizedKVCache`: LM-Infinite's static layer (sinks + a window ring of
    ``residual_length + 1`` slots) plus a packed ring of ``n_local - residual_length - 1`` records."""

    is_compileable = True

    def __init__(self, shared: _Shared, first: bool, cfg: KVCacheConfig, spec: KVQuantSpec, layer_idx: int,
                 n_local: int):
        super().__init__(shared, first)
        self.cfg, self.spec, self.layer_idx = cfg, spec, layer_idx
        self.ring = check_bounded_options(cfg, n_local)  # packed slots C
        self.window = cfg.residual_length + 1  # == shared.ring
        self.state: KVQuantState | None = None
        self.packed: PackedKV | None = None
        self.lengths: torch.Tensor | None = None  # [B] valid packed slots per row (device)
        self.mode = "prefill"
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        dev = key_states.device
        self.state = KVQuantState.create(self.spec, d, h, dev, layer_idx=self.layer_idx)
        raw = key_states.dtype if key_states.dtype in _RAW_DTYPES else torch.float16
        # Slot C is the spare one: rows with no token to move write there, and lengths never reach it.
        self.packed = PackedKV.allocate(self.spec, b, h, self.ring + 1, d, device=dev, raw_dtype=raw)
        self.lengths = torch.zeros(b, dtype=torch.long, device=dev)
        self._all_visible = torch.ones(1, 1, 1, self.shared.n_sink + self.window, dtype=torch.bool, device=dev)
        setattr(self.attn_keys, _LAYER_ATTR, weakref.ref(self))  # what a decode step returns: the attention finds us

    @property
    def needs_calibration(self) -> bool:
        return self.state is not None and self.state.prunes and self.state.key_channels is None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt: returned whole (LM-Infinite's attention runs on it, then :meth:`flush_prompt` fills the
        packed ring). A decode step: the window slot's previous token moves to the packed ring, the new token takes
        its slot, and the attention view is returned."""
        if self.pending:
            self.pending = False
            raise RuntimeError(
                "StaticBoundedQuantizedKVCache: the previous forward's attention did not run longkit's kv_cache + "
                "lm_infinite attention, so nothing was stored. Patch the model first: "
                "longkit.apply_patches(model, lm_infinite=..., kv_cache=...)"
            )
        sh = self.shared
        t = key_states.shape[-2]
        if self.first and sh.n_seen > 0 and t != 1:
            raise NotImplementedError(
                f"lm_infinite + kv_cache handles the prompt and then one token per forward; this forward has {t} new "
                "tokens after the prompt (chunked prefill / speculative verification). Feed the whole prompt at once"
            )
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.pending = True
        if sh.step["kind"] == "decode":
            self.mode = "decode"
        else:
            self.mode = "prefill"
            setattr(keys, _LAYER_ATTR, weakref.ref(self))
        return keys, values

    def _write_decode(self, key_states: torch.Tensor, value_states: torch.Tensor, step: dict[str, Any]) -> None:
        """Move the window slot's previous token to the packed ring, then write the new token (no host reads)."""
        packed = step.get("packed")
        if packed is None:  # per step, the same for every layer: computed by the first layer that needs it
            s, w, c = self.shared.n_sink, self.window, self.ring
            e = step["q"] - w  # [B] position leaving the window
            into = e >= s
            slot = torch.where(into, torch.remainder(e - s, c), torch.full_like(e, c))
            packed = step["packed"] = (slot, (e - s + 1).clamp(0, c))
        slot, lengths = packed
        b, h, _, d = key_states.shape
        raw = step["raw"].view(b, 1, 1, 1)
        attn = step["attn"].view(b, 1, 1, 1)
        old_k = self.keys.gather(2, raw.expand(b, h, 1, d))
        old_v = self.values.gather(2, attn.expand(b, self.values.shape[1], 1, self.values.shape[-1]))
        quantize_kv(old_k, old_v, self.spec, self.state, out=self.packed, start=slot)
        self.lengths.copy_(lengths)
        super()._write_decode(key_states, value_states, step)

    def flush_prompt(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """After the prompt's attention: its positions before the window, quantized into the packed ring (the sinks
        and the window were written by :meth:`update`)."""
        self.pending = False
        t = key.shape[2]
        last = t - self.window  # columns before the window
        if last <= 0:
            return
        cols, lengths = ring_plan(self.shared.pad, last, self.shared.n_sink, self.ring)
        idx = cols[:, None, :, None]
        ring_k = key.gather(2, idx.expand(-1, key.shape[1], -1, key.shape[-1]))
        ring_v = value.gather(2, idx.expand(-1, value.shape[1], -1, value.shape[-1]))
        quantize_kv(ring_k, ring_v, self.spec, self.state, out=self.packed, start=0)
        self.lengths.copy_(lengths)

    def decode_step(self, query: torch.Tensor, n_local: int, limit: int, inv_freq: torch.Tensor, scale: float
                    ) -> torch.Tensor:
        """One query per row over sinks + window (fp32) and the packed ring, merged: ``[B, Hq, 1, D]``."""
        self.pending = False
        sh = self.shared
        cos, sin, mask = step_tables(sh, n_local, limit, inv_freq, query.device)
        s = sh.n_sink
        if s:
            self.attn_keys[:, :, :s].copy_(rotate_with(self.keys[:, :, :s], cos, sin))
        vis = mask if mask is not None else self._all_visible
        out, lse = dense_attention_lse(query, self.attn_keys, self.values, vis, scale)
        past, past_lse = quantized_decode_attention(query, self.packed, self.spec, self.state, scale, self.lengths,
                                                    causal=False, return_lse=True)
        out, _ = merge_attention_states(out, lse, past.float(), past_lse)
        return out.to(query.dtype)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("lm_infinite + kv_cache cannot reorder rows (beam search): use greedy decoding or "
                                  "sampling")

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses, as captured graphs need)."""
        super().reset()
        if self.is_initialized:
            self.packed.buffer.zero_()
            self.lengths.zero_()
        self.mode, self.pending = "prefill", False

    def memory(self) -> dict[str, float]:
        """Bytes of this layer: ``packed_used`` (records of the valid packed slots), ``packed_allocated`` (the ring
        and its spare slot), ``window`` (full-precision sinks and window)."""
        if not self.is_initialized:
            return {"packed_used": 0.0, "packed_allocated": 0.0, "window": 0.0}
        per = bytes_per_token(self.spec, self.packed.layout.head_dim, self.packed.num_kv_heads)
        fp = float(self.keys.nbytes + self.values.nbytes)
        return {"packed_used": per * float(self.lengths.sum().item()), "packed_allocated": float(self.packed.nbytes()),
                "window": fp}


class StaticBoundedQuantizedKVCache(LMInfiniteStaticCache):
    """:class:`~.bounded.BoundedQuantizedKVCache` with fixed buffers: same tokens kept, same attention, no host
    synchronisation in a decode step (``LMInfiniteConfig(decode="static" | "cuda_graph")``).

    Args:
        config: the model's config (layers and head dim are read).
        kv_cache: a :class:`~longkit.KVCacheConfig`, a dict of its options, or ``None``/``True`` (defaults).
        n_global, n_local: LM-Infinite's sink count and window.
        attention_mask: the prompt's 2-D padding mask ``[B, T]`` (left padding), or ``None``.
        graphable: report ``is_compileable`` so ``generate()`` routes decode steps through the CUDA-graph runner.
    """

    def __init__(self, config: Any, kv_cache: KVCacheConfig | dict | bool | None, n_global: int,  # noqa: ANN401
                 n_local: int, attention_mask: torch.Tensor | None = None, *, graphable: bool = False):
        cfg = as_config(kv_cache)
        tcfg = text_config(config)
        spec = cfg.spec()
        check_spec_fits(spec, model_head_dim(tcfg))
        check_bounded_options(cfg, n_local)
        self.kv_config, self.spec = cfg, spec
        self.n_global, self.n_local = n_global, n_local
        self.shared = _Shared(n_global, cfg.residual_length + 1, attention_mask)
        pad = self.shared.pad
        self._min_pad = int(pad.min().item()) if pad is not None and pad.numel() else 0  # at construction only
        self._graphable = graphable
        layers = [StaticBoundedQuantizedLayer(self.shared, i == 0, cfg, spec, i, n_local)
                  for i in range(tcfg.num_hidden_layers)]
        super(LMInfiniteStaticCache, self).__init__(layers=layers)

    def memory(self) -> dict[str, float]:
        """Bytes summed over the layers (see :meth:`StaticBoundedQuantizedLayer.memory`)."""
        return summed_memory(self.layers)

    def bytes_per_token(self) -> float:
        """Exact packed bytes per token of one layer (scales and sketches included); ``0`` before the first update."""
        return packed_bytes_per_token(self)

    def packed_tokens(self) -> int:
        """Packed slots in use in the least-padded row (at most ``n_local - residual_length - 1``), from the host's
        count of columns written (no device read)."""
        layer = self.layers[0]
        newest = self.shared.n_seen - 1 - self._min_pad  # that row's newest position
        return max(0, min(newest - layer.window - self.n_global + 1, layer.ring))

    def stored_tokens(self) -> int:
        """Tokens held per layer in the most-padded row: sinks, window and packed ring together (at most
        ``n_global + n_local``, LM-Infinite's bound)."""
        return max(0, min(self.shared.n_seen - self.shared.max_pad, self.n_global + self.n_local))
