"""A quantized KV cache for transformers 5: packed 2/3/4-bit records plus a full-precision recent window.

Per layer (:class:`QuantizedKVLayer`, a ``DynamicLayer`` subclass) the tokens seen so far are split in two:

* the **packed part**: the older tokens, written by :func:`~longkit.kernels.kv_quant.quantize_kv` into a
  :class:`~longkit.kernels.kv_quant.PackedKV` (one byte record per token and KV head), preallocated from
  ``generate()``'s length and grown by doubling when a longer run needs more slots;
* the **window**: the newest ``residual_length`` tokens, full precision (``self.keys`` / ``self.values``, as in a
  ``DynamicLayer``). A token is quantized when it leaves the window (KIVI and TurboQuant keep such a window: the
  newest tokens get the most attention). With ``key_axis="channel"`` (KIVI) keys are quantized over whole groups of
  ``group_size`` tokens, so the window holds ``residual_length`` to ``residual_length + group_size - 1`` tokens.

``update()`` only appends the new tokens to the window and returns it; the attention function of this technique
(:mod:`.attention`, switched on by ``apply_patches(model, kv_cache=...)``) finds the layer from the returned tensor,
attends to the packed part with :func:`~longkit.kernels.kv_quant.quantized_decode_attention` and to the window in
full precision, merges the two softmax states, and then calls :meth:`QuantizedKVLayer.flush`, which quantizes what
left the window. Quantizing *after* the attention means a token is always attended in full precision by its own
forward (prefill included), and the full-precision copy of a long prompt exists for one layer at a time.

Padding: columns are the model's columns (left padding included, so ``get_seq_length()`` is what ``generate()``
expects), but padding is never quantized: each row's real tokens are packed contiguously (a per-row write position
``lengths``), so the decode kernel masks nothing but the tail. The window keeps the columns as they are and the
attention mask hides its padding.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ...config import KVCacheConfig
from ...errors import ConfigError, UnsupportedModelError
from ...kernels.kv_quant import KVQuantSpec, KVQuantState, PackedKV, bytes_per_token, quantize_kv
from ..attention import text_config

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "layer_of", "as_config", "model_head_dim"]

_LAYER_ATTR = "_longkit_kv_layer"  # on the keys update() returns: a weakref to the layer
_RAW_DTYPES = (torch.bfloat16, torch.float16)


def layer_of(key: torch.Tensor) -> QuantizedKVLayer | None:
    """The :class:`QuantizedKVLayer` whose ``update()`` returned ``key``, or ``None`` (no cache, another cache)."""
    ref = getattr(key, _LAYER_ATTR, None)
    return ref() if ref is not None else None


def as_config(kv_cache: Any) -> KVCacheConfig:  # noqa: ANN401
    """``True``/``None`` (defaults), a dict of options or a :class:`~longkit.KVCacheConfig` -> the config."""
    if kv_cache is None or kv_cache is True:
        return KVCacheConfig()
    if isinstance(kv_cache, KVCacheConfig):
        return kv_cache
    if isinstance(kv_cache, dict):
        try:
            return KVCacheConfig(**kv_cache)
        except TypeError as e:
            raise ConfigError(f"bad options for kv_cache: {e}. Valid options: "
                              f"{list(KVCacheConfig.__dataclass_fields__)}") from e
    raise ConfigError(f"kv_cache must be True, a dict of options or a KVCacheConfig, got {kv_cache!r}")


def model_head_dim(config: Any) -> int:  # noqa: ANN401
    """The attention head dim of a transformers (text) config."""
    config = text_config(config)
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def check_spec_fits(spec: KVQuantSpec, head_dim: int) -> None:
    """Raise :class:`ConfigError` if ``spec`` cannot store heads of ``head_dim`` channels (group size, powers of 2)."""
    try:
        spec.check_head_dim(head_dim)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kv_cache: this model's head dim is {head_dim}: {e}") from None


def summed_memory(layers: list[Any]) -> dict[str, float]:
    """The layers' ``memory()`` dicts (``packed_used``, ``packed_allocated``, ``window``) summed."""
    total = {"packed_used": 0.0, "packed_allocated": 0.0, "window": 0.0}
    for layer in layers:
        for k, v in layer.memory().items():
            total[k] += v
    return total


class QuantizedKVLayer(DynamicLayer):
    """One layer of :class:`QuantizedKVCache`: a packed part and a full-precision window (see the module docstring).

    Attributes:
        spec: the :class:`~longkit.kernels.kv_quant.KVQuantSpec`; residual_length: the window; layer_idx.
        state: the layer's :class:`~longkit.kernels.kv_quant.KVQuantState` (rotation signs seeded by the layer
            index, QJL matrix, kept key channels), created at the first update.
        packed: the :class:`~longkit.kernels.kv_quant.PackedKV` (``None`` until the first token is quantized).
        n_packed: columns moved out of the window so far (padding columns included).
        lengths: int64 ``[B]`` real tokens packed per row, or ``None`` while every row has ``n_packed`` of them
            (no padding among the packed columns).
        keys, values: the window, ``[B, Hkv, W, D]`` in the model's dtype.
    """

    is_croppable = False  # crop() works, but a rollback cannot restore full precision to tokens already quantized
    is_compileable = False
    is_sliding = False

    def __init__(self, cfg: KVCacheConfig, spec: KVQuantSpec, layer_idx: int, capacity: int | None = None):
        super().__init__()
        self.cfg, self.spec, self.layer_idx = cfg, spec, layer_idx
        self.residual_length = cfg.residual_length
        self.capacity_hint = capacity  # packed slots to allocate at the first flush (generate() knows the length)
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.state: KVQuantState | None = None
        self.packed: PackedKV | None = None
        self.n_packed = 0
        self.lengths: torch.Tensor | None = None
        self.n_seen = 0
        self.pending = False  # update() ran, the attention (which flushes) not yet

    # -- transformers' layer API ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.state = KVQuantState.create(self.spec, d, h, key_states.device, layer_idx=self.layer_idx)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the window; return the window (the attention reads the packed part itself)."""
        if self.pending:
            self.pending = False  # so a caught error is not repeated forever
            raise RuntimeError(
                "QuantizedKVCache: the previous forward's attention did not run the kv_cache attention, so nothing "
                "was quantized and the cache is inconsistent. Patch the model first: "
                "longkit.apply_patches(model, kv_cache=...) (then pass the cache, or let generate() build it)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.n_seen += key_states.shape[-2]
        self.pending = True
        setattr(self.keys, _LAYER_ATTR, weakref.ref(self))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        raise NotImplementedError("QuantizedKVCache does not support cache offloading (offloading=True)")

    # -- the attention's side ----------------------------------------------------------------------------------
    def packed_view(self) -> tuple[PackedKV | None, torch.Tensor | None]:
        """``(packed, lengths)`` for the attention: the packed slots in use (``n_packed`` of them) and the per-row
        valid counts (``None`` = all ``n_packed``); ``(None, None)`` while nothing is packed."""
        if self.packed is None or self.n_packed == 0:
            return None, None
        return self.packed.narrow_tokens(0, self.n_packed), self.lengths

    @property
    def needs_calibration(self) -> bool:
        """ThinK pruning (``keep_channels < 1``) whose kept channels are not chosen yet."""
        return self.state is not None and self.state.prunes and self.state.key_channels is None

    def calibrate(self, q: torch.Tensor, k: torch.Tensor, real: torch.Tensor | None) -> None:
        """Choose the kept key channels from the first forward's post-RoPE queries and keys (ThinK's criterion:
        per channel, ``||k|| · Σ ||q||`` over the real tokens). ``real``: bool ``[B, T]`` or ``None`` (all real)."""
        if real is not None:
            w = real[:, None, :, None].to(q.dtype)
            q, k = q * w, k * w  # padding adds nothing to the norms
        self.state.calibrate(q, k)

    def flush(self, real: torch.Tensor | None) -> None:
        """Quantize the tokens that left the window into the packed part (called by the attention, after it ran).

        Args:
            real: bool ``[B, W]``: which window columns hold real tokens (``None`` = all), from the attention mask.
        """
        self.pending = False
        width = self.keys.shape[2]
        out = width - self.residual_length
        g = self.spec.group_size
        if self.spec.key_axis == "channel":
            out = out // g * g  # KIVI: whole token groups only
        if out <= 0:
            return
        k, v = self.keys[:, :, :out], self.values[:, :, :out]
        blk = None if real is None else real[:, :out]
        if blk is not None and bool(blk.all()):
            blk = None
        self._ensure_capacity(self.n_packed + out, k)
        if blk is None and self.lengths is None:
            start: int | torch.Tensor = self.n_packed
        else:
            if self.spec.key_axis == "channel":
                raise NotImplementedError(
                    "kv_cache with key_axis='channel' (KIVI) does not support padded batches (each row's real tokens "
                    "are packed contiguously, and channel groups span one token range for every row): generate the "
                    "rows separately, or use key_axis='token'"
                )
            if self.lengths is None:
                self.lengths = torch.full((k.shape[0],), self.n_packed, dtype=torch.long, device=k.device)
            start = self.lengths  # replaced below, never written in place (the attention may hold it)
            if blk is not None:  # real tokens first, in order; the padding after them lands past `lengths`
                order = torch.sort((~blk).to(torch.int8), dim=1, stable=True).indices
                idx = order[:, None, :, None]
                k = k.gather(2, idx.expand_as(k))
                v = v.gather(2, idx.expand_as(v))
                self.lengths = self.lengths + blk.sum(1)
            else:
                self.lengths = self.lengths + out
        quantize_kv(k, v, self.spec, self.state, out=self.packed, start=start)
        self.n_packed += out
        # Copies, not views: a view would keep the whole (e.g. prompt-long) full-precision block alive.
        self.keys = self.keys[:, :, out:].clone()
        self.values = self.values[:, :, out:].clone()

    def _ensure_capacity(self, need: int, like: torch.Tensor) -> None:
        g = self.spec.group_size
        if self.packed is not None and self.packed.num_tokens >= need:
            return
        old = self.packed
        cap = max(need, self.capacity_hint or 0, 2 * old.num_tokens if old is not None else 0)
        cap = -(-cap // g) * g  # whole groups: KIVI's key scales are per group of g slots
        raw = like.dtype if like.dtype in _RAW_DTYPES else torch.float16
        b, h, _, d = like.shape
        new = PackedKV.allocate(self.spec, b, h, cap, d, device=like.device, raw_dtype=raw)
        if old is not None:
            new.buffer[:, :, :old.num_tokens].copy_(old.buffer)
            if old.layout.side_bytes:  # KIVI key scales live outside the records
                rows = old.k_scale.shape[2]
                new.k_scale[:, :, :rows].copy_(old.k_scale)
                new.k_zero[:, :, :rows].copy_(old.k_zero)
        self.packed = new

    # -- batch reordering (beam search), crop ----------------------------------------------------------------------
    def _select_rows(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, idx)
        if self.packed is not None:
            p = self.packed
            side = p.key_scales.index_select(1, idx) if p.layout.side_bytes else None
            self.packed = PackedKV.from_buffer(self.spec, p.buffer.index_select(0, idx), p.layout.head_dim,
                                               raw_dtype=p.raw_dtype, key_scales=side)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the rows (beam search): window, packed records and per-row lengths alike."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.as_tensor(indices, device=self.keys.device if self.keys is not None else None))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._select_rows(torch.arange(b, device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value is the length to keep, as in
        ``DynamicLayer``). Exact inside the window; below it the packed length shrinks (tokens quantized earlier
        stay quantized). Not supported with padding in the packed part or inside a KIVI token group."""
        keep = tokens_to_remove if tokens_to_remove > 0 else self.n_seen + tokens_to_remove
        keep = max(0, min(keep, self.n_seen))
        if keep == self.n_seen or not self.is_initialized:
            return
        if keep >= self.n_packed:
            w = keep - self.n_packed
            self.keys, self.values = self.keys[:, :, :w], self.values[:, :, :w]
        else:
            if self.lengths is not None:
                raise NotImplementedError("QuantizedKVCache.crop below the full-precision window is not supported "
                                          "when the packed part holds padded rows")
            if self.spec.key_axis == "channel" and keep % self.spec.group_size:
                raise NotImplementedError(f"QuantizedKVCache.crop with key_axis='channel' (KIVI) can only cut the "
                                          f"packed part at a multiple of group_size={self.spec.group_size} tokens, "
                                          f"not at {keep}")
            self.n_packed = keep
            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        self.n_seen = keep

    # -- memory -------------------------------------------------------------------------------------------------------
    def memory(self) -> dict[str, float]:
        """Bytes of this layer: ``packed_used`` (records of the packed tokens, as :func:`bytes_per_token` counts them),
        ``packed_allocated`` (the whole preallocated buffer), ``window`` (the full-precision tokens)."""
        used = alloc = 0.0
        if self.packed is not None:
            per = bytes_per_token(self.spec, self.packed.layout.head_dim, self.packed.num_kv_heads)
            rows = self.lengths.sum().item() if self.lengths is not None else self.n_packed * self.packed.batch
            used, alloc = per * rows, float(self.packed.nbytes())
        window = 0.0 if self.keys is None else float(self.keys.nbytes + self.values.nbytes)
        return {"packed_used": used, "packed_allocated": alloc, "window": window}


class QuantizedKVCache(Cache):
    """A transformers 5 ``Cache`` storing keys and values quantized (longkit's packed format) with a full-precision
    window of the newest ``residual_length`` tokens.

    Needs the model patched with ``longkit.apply_patches(model, kv_cache=...)`` (the attention reads the packed part
    directly); ``generate()`` then builds this cache itself, or takes one passed as ``past_key_values``.

    Args:
        config: the model's config (its text config is read: layers, head dim, layer types).
        kv_cache: a :class:`~longkit.KVCacheConfig`, a dict of its options, or ``None``/``True`` (defaults).
        max_cache_len: expected total length (prompt + new tokens); the packed buffers are preallocated for it
            (they grow by doubling beyond it). ``None``: allocated at the first quantization, grown as needed.

    Examples::

        >>> cache = QuantizedKVCache(model.config, KVCacheConfig(key_bits=3, value_bits=3))  # doctest: +SKIP
        >>> model.generate(ids, past_key_values=cache, max_new_tokens=32)                    # doctest: +SKIP
    """

    def __init__(self, config: Any, kv_cache: KVCacheConfig | dict | bool | None = None, *,  # noqa: ANN401
                 max_cache_len: int | None = None):
        cfg = as_config(kv_cache)
        tcfg = text_config(config)
        layer_types = getattr(tcfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(f"QuantizedKVCache needs full-attention layers only; config.layer_types has "
                                        f"{sorted(set(layer_types))}")
        spec = cfg.spec()
        check_spec_fits(spec, model_head_dim(tcfg))
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool)
                                          or max_cache_len < 0):
            raise ConfigError(f"QuantizedKVCache: max_cache_len must be None or an int >= 0, got {max_cache_len!r}")
        packed_slots = None if max_cache_len is None else max(0, max_cache_len - cfg.residual_length)
        self.kv_config, self.spec = cfg, spec
        super().__init__(layers=[QuantizedKVLayer(cfg, spec, i, packed_slots)
                                 for i in range(tcfg.num_hidden_layers)])

    def bytes_per_token(self) -> float:
        """Exact packed bytes per token of one layer (keys and values, every KV head; scales and sketches included);
        ``0`` before the first update (the KV-head count is read from the model's tensors)."""
        return packed_bytes_per_token(self)

    def memory(self) -> dict[str, float]:
        """Bytes summed over the layers: ``packed_used``, ``packed_allocated``, ``window`` (see
        :meth:`QuantizedKVLayer.memory`)."""
        return summed_memory(self.layers)

    def packed_tokens(self) -> int:
        """Columns quantized so far (per layer; padding columns included)."""
        return self.layers[0].n_packed


def packed_bytes_per_token(cache: Any) -> float:  # noqa: ANN401
    """Exact packed bytes per token of one layer of a longkit quantized cache (``0`` before its first update)."""
    state = cache.layers[0].state
    return 0 if state is None else bytes_per_token(cache.spec, state.head_dim, state.num_kv_heads)
