"""The memory cache: LM-Infinite's position-addressed static cache plus a store of the middle tokens in blocks.

:class:`MemoryCache` extends :class:`~longkit.hf_patches.lm_infinite.static_cache.LMInfiniteStaticCache` (same
sink slots and ring of the last ``n_local`` tokens per batch row, same device-side position table, same chunk and
decode updates) with, per layer:

* a block store of every token past the sinks, ``[B, Hkv, blocks, block_size, D]`` keys rotated as if their block
  started at position 0 (token ``o`` of a block at position ``o``: wherever a block is retrieved it is seen at one
  fixed place, so only its inner order is kept) and values;
  on the device (:class:`DeviceStore`) or, with ``MemoryConfig(offload=True)``, in pinned host memory with a device
  cache of recently used blocks (:class:`OffloadStore`);
* representative keys ``[B, Hkv, blocks, repr_keys, D]`` (rotated as stored, always on the device: they are what each
  selection scores);
* the attention weight each ring token has received so far (``recv``, fp32), from which the representatives are
  picked once a block is final;
* one more region of ``topk · block_size`` slots after the ring in the attention buffers: a decode step gathers the
  selected blocks there, so sinks + window + memory are one SDPA call over one buffer.

Block ``m`` of a row holds positions ``n_global + m·bs .. n_global + (m+1)·bs - 1``; it is *final* (keys,
values and representatives written to the store) once the query at position ``n_global + (m+2)·bs - 2`` has been
processed (the last query that scores its last token), and it may be retrieved by a query chunk starting at ``a``
once it has left that query's window (``n_global + (m+1)·bs - 1 <= a - n_local``). With ``n_local >= 2·bs`` a block
leaves the window after it is final, and the ring still holds its tokens when it becomes final.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch
from transformers.cache_utils import Cache

from ...config import MemoryConfig
from ...errors import ConfigError
from ..lm_infinite.static_cache import LMInfiniteStaticCache, LMInfiniteStaticLayer, _Shared

__all__ = ["MemoryCache", "MemoryLayer", "DeviceStore", "OffloadStore", "memory_layer_of", "left_padding"]

_LAYER_ATTR = "_longkit_memory_layer"  # on the keys a layer returns: weakref to the layer


def left_padding(attention_mask: torch.Tensor) -> list[int]:
    """Leading padding columns per row of a 2-D 0/1 mask; raises unless every row is ``0 … 0 1 … 1``."""
    mask = attention_mask.bool()
    real = mask.sum(-1)
    pad = mask.shape[-1] - real
    expect = torch.arange(mask.shape[-1], device=mask.device)[None, :] >= pad[:, None]
    if not torch.equal(mask, expect):
        raise ValueError("memory supports left padding only (each attention_mask row must be 0 ... 0 1 ... 1); "
                         "pad on the left, e.g. tokenizer(..., padding_side='left')")
    return [int(x) for x in pad.tolist()]


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor of host values on ``device`` without a device synchronisation (async staging copy)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- block stores
class DeviceStore:
    """Block keys (block-relative rotation) and values on the layer's device, grown by doubling."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reserve(self, n_blocks: int, like: torch.Tensor, v_like: torch.Tensor) -> None:
        """Room for blocks ``0 .. n_blocks - 1`` (``like``: a ``[n, Hkv, bs, D]`` block of keys; v_like: values)."""
        if n_blocks <= self.capacity:
            return
        cap = max(n_blocks, 2 * self.capacity)
        _, h, bs, d = like.shape
        k = like.new_zeros(self.batch, h, cap, bs, d)
        v = v_like.new_zeros(self.batch, v_like.shape[1], cap, bs, v_like.shape[-1])
        if self.k is not None:
            k[:, :, :self.capacity] = self.k
            v[:, :, :self.capacity] = self.v
        self.k, self.v = k, v

    def write(self, rows: torch.Tensor, blocks: torch.Tensor, rows_host: list[int], blocks_host: list[int],
              k_raw: torch.Tensor, v: torch.Tensor) -> None:
        """Store block ``blocks[i]`` of row ``rows[i]``: ``k_raw, v [n, Hkv, bs, D]``."""
        self.k[rows, :, blocks] = k_raw
        self.v[rows, :, blocks] = v

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected blocks ``idx [B, Hkv, k]`` as ``[B, Hkv, k·bs, D]`` keys and values (device ops only)."""
        from ...kernels.block_memory import gather_blocks

        return gather_blocks(self.k, idx), gather_blocks(self.v, idx)

    def nbytes(self) -> dict[str, int]:
        n = 0 if self.k is None else self.k.nbytes + self.v.nbytes
        return {"device": n, "host": 0}


class OffloadStore:
    """Block keys and values in host memory (pinned when the layer is on CUDA) in pages of ``page`` blocks, with
    an LRU cache of ``slots`` blocks on the device.

    A cache slot holds one block index for every batch row and KV head. :meth:`gather` reads the selected block
    ids on the host (one device-to-host copy, i.e. a synchronisation), copies the missing blocks into the least
    recently used slots (asynchronous copies from pinned memory), then gathers from the slots on the device.
    """

    def __init__(self, batch: int, slots: int, page: int = 64) -> None:
        self.batch, self.slots, self.page = batch, slots, page
        self.free = list(range(slots))
        self.pages_k: list[torch.Tensor] = []
        self.pages_v: list[torch.Tensor] = []
        self.pool_k: torch.Tensor | None = None
        self.pool_v: torch.Tensor | None = None
        self.lru: OrderedDict[int, int] = OrderedDict()  # block -> slot, least recently used first
        self.table: torch.Tensor | None = None  # device [capacity] block -> slot (-1: not on the device)
        self.table_host: list[int] = []
        self.loads = 0  # blocks copied host -> device so far

    @property
    def capacity(self) -> int:
        return len(self.pages_k) * self.page

    def reserve(self, n_blocks: int, like: torch.Tensor, v_like: torch.Tensor) -> None:
        _, h, bs, d = like.shape
        b = self.batch
        pin = like.is_cuda
        while self.capacity < n_blocks:
            self.pages_k.append(torch.zeros(self.page, b, h, bs, d, dtype=like.dtype, pin_memory=pin))
            self.pages_v.append(torch.zeros(self.page, b, v_like.shape[1], bs, v_like.shape[-1], dtype=v_like.dtype,
                                            pin_memory=pin))
            self.table_host.extend([-1] * self.page)
        if self.pool_k is None:
            self.pool_k = like.new_zeros(self.slots, b, h, bs, d)
            self.pool_v = v_like.new_zeros(self.slots, b, v_like.shape[1], bs, v_like.shape[-1])
        self.table = None  # rebuilt on the next gather

    def write(self, rows: torch.Tensor, blocks: torch.Tensor, rows_host: list[int], blocks_host: list[int],
              k_raw: torch.Tensor, v: torch.Tensor) -> None:
        for i, (r, m) in enumerate(zip(rows_host, blocks_host)):
            pk, pv = self.pages_k[m // self.page], self.pages_v[m // self.page]
            pk[m % self.page, r].copy_(k_raw[i], non_blocking=True)
            pv[m % self.page, r].copy_(v[i], non_blocking=True)
            slot = self.lru.get(m)
            if slot is not None:  # another row's copy of this block is already cached: keep the slot current
                self.pool_k[slot, r] = k_raw[i]
                self.pool_v[slot, r] = v[i]

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = torch.unique(idx).tolist()  # the one host read of this selection
        if len(needed) > self.slots:
            raise ConfigError(
                f"memory offload: this selection needs {len(needed)} distinct blocks on the device but the cache has "
                f"{self.slots} slots per layer; raise MemoryConfig(gpu_blocks=...) to at least {len(needed)}"
            )
        keep = set(needed)
        changed = self.table is None
        for m in needed:
            if m in self.lru:
                self.lru.move_to_end(m)
                continue
            if self.free:
                slot = self.free.pop(0)
            else:
                victim = next(b for b in self.lru if b not in keep)
                slot = self.lru.pop(victim)
                self.table_host[victim] = -1
            self.pool_k[slot].copy_(self.pages_k[m // self.page][m % self.page], non_blocking=True)
            self.pool_v[slot].copy_(self.pages_v[m // self.page][m % self.page], non_blocking=True)
            self.lru[m] = slot
            self.table_host[m] = slot
            self.loads += 1
            changed = True
        if changed:
            self.table = _to_device(self.table_host, idx.device)
        slots = self.table[idx]  # [B, Hkv, k]
        b, h = idx.shape[:2]
        bi = torch.arange(b, device=idx.device)[:, None, None]
        hi = torch.arange(h, device=idx.device)[None, :, None]
        k = self.pool_k[slots, bi, hi].reshape(b, h, -1, self.pool_k.shape[-1])
        v = self.pool_v[slots, bi, hi].reshape(b, h, -1, self.pool_v.shape[-1])
        return k, v

    def nbytes(self) -> dict[str, int]:
        dev = 0 if self.pool_k is None else self.pool_k.nbytes + self.pool_v.nbytes
        host = sum(t.nbytes for t in self.pages_k) + sum(t.nbytes for t in self.pages_v)
        return {"device": dev, "host": host}


# ---------------------------------------------------------------------------------------------- cache
class _MemoryShared(_Shared):
    """LM-Infinite's per-cache bookkeeping plus the host-side facts memory needs (known without device reads)."""

    def __init__(self, n_global: int, n_local: int, attention_mask: torch.Tensor | None, cfg: MemoryConfig):
        super().__init__(n_global, n_local, attention_mask)
        self.cfg = cfg
        self.pad_host: list[int] | None = left_padding(attention_mask) if attention_mask is not None else None
        self.since_select = 0  # decode steps since the blocks were last selected
        self.fwd: dict[str, Any] = {}  # this forward's host-side plan (set by layer 0, read by every layer)

    def init(self, batch: int, device: torch.device) -> None:
        super().init(batch, device)
        if self.pad_host is None:
            self.pad_host = [0] * batch

    def plan_forward(self, cols_before: int, t: int, device: torch.device) -> None:
        """Host-side facts of this forward, shared by every layer: row positions, decode re-selection."""
        decode = self.step["kind"] == "decode"
        p0 = [cols_before - pad for pad in self.pad_host]
        fwd: dict[str, Any] = {"t": t, "decode": decode, "p0": p0, "p0_dev": _to_device(p0, device)}
        if decode:
            s, bs, n_local = self.n_sink, self.cfg.block_size, self.ring
            fwd["reselect"] = self.since_select % self.cfg.reselect_every == 0
            n_elig = [max(0, (p - n_local + 1 - s) // bs) for p in p0]
            fwd["n_elig"], fwd["n_elig_dev"] = n_elig, _to_device(n_elig, device)
            self.since_select += 1
        else:
            self.since_select = 1  # the forward's last chunk selected blocks: the first decode steps keep them
        self.fwd = fwd


class MemoryLayer(LMInfiniteStaticLayer):
    """One layer of :class:`MemoryCache` (buffers allocated at the first update)."""

    def __init__(self, shared: _MemoryShared, first: bool):
        super().__init__(shared, first)
        self.shared: _MemoryShared = shared
        self.keys_all: torch.Tensor | None = None  # [B, Hkv, 2S + R + M, D] = [raw sinks | rot sinks | ring | memory]
        self.values_all: torch.Tensor | None = None  # [B, Hkv, S + R + M, D] = [sinks | ring | memory]
        self.recv: torch.Tensor | None = None  # [B, Hkv, S + R] fp32, attention received by each slot's token
        self.repr_k: torch.Tensor | None = None  # [B, Hkv, blocks, r, D]
        self.store: DeviceStore | OffloadStore | None = None
        self.selection: tuple[torch.Tensor, torch.Tensor] | None = None  # decode: (idx, valid) [B, Hkv, topk]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        sh, cfg = self.shared, self.shared.cfg
        b, h, _, d = key_states.shape
        s, r, m = sh.n_sink, sh.ring, cfg.topk * cfg.block_size
        self.dtype, self.device = key_states.dtype, key_states.device
        # Zeros, not empty: masked-out slots still enter SDPA's weighted sum with weight 0 (0·NaN = NaN).
        self.keys_all = key_states.new_zeros(b, h, 2 * s + r + m, d)
        self.values_all = value_states.new_zeros(b, value_states.shape[1], s + r + m, value_states.shape[-1])
        # LM-Infinite's static layer works on these views ([raw sinks | rot sinks | ring] and [sinks | ring]).
        self.keys = self.keys_all[:, :, :2 * s + r]
        self.values = self.values_all[:, :, :s + r]
        self.attn_keys = self.keys[:, :, s:]
        self.recv = torch.zeros(b, h, s + r, dtype=torch.float32, device=key_states.device)
        if cfg.offload:
            slots = cfg.gpu_blocks if cfg.gpu_blocks is not None else max(1, b * h * cfg.topk)
            self.store = OffloadStore(b, slots)
        else:
            self.store = DeviceStore(b)
        if self.first and sh.pos is None:
            sh.init(b, key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        sh = self.shared
        cols_before, t = sh.n_seen, key_states.shape[-2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.first:
            sh.plan_forward(cols_before, t, key_states.device)
        if sh.fwd["decode"]:
            s = sh.n_sink
            keys, values = self.keys_all[:, :, s:], self.values_all
        setattr(keys, _LAYER_ATTR, weakref.ref(self))
        return keys, values

    # -- memory ----------------------------------------------------------------------------------------------
    def reserve_blocks(self, n_blocks: int, like: torch.Tensor, v_like: torch.Tensor) -> None:
        """Room for blocks ``0 .. n_blocks - 1`` in the store and the representatives (at least ``topk``, so a
        selection of ``topk`` always has enough slots to choose from)."""
        cfg = self.shared.cfg
        n_blocks = max(n_blocks, cfg.topk, 1)
        self.store.reserve(n_blocks, like, v_like)
        cap = self.store.capacity
        if self.repr_k is None or self.repr_k.shape[2] < cap:
            b, h = self.keys_all.shape[:2]
            rk = like.new_zeros(b, h, cap, cfg.repr_keys, like.shape[-1])
            if self.repr_k is not None:
                rk[:, :, :self.repr_k.shape[2]] = self.repr_k
            self.repr_k = rk

    def write_blocks(self, rows_host: list[int], blocks_host: list[int], k_raw: torch.Tensor, v: torch.Tensor,
                     repr_k: torch.Tensor) -> None:
        """Make blocks final: ``k_raw, v [n, Hkv, bs, D]``, ``repr_k [n, Hkv, r, D]`` for ``(row, block)`` pairs."""
        self.reserve_blocks(max(blocks_host) + 1, k_raw, v)
        rows, blocks = _to_device(rows_host, k_raw.device), _to_device(blocks_host, k_raw.device)
        self.store.write(rows, blocks, rows_host, blocks_host, k_raw, v)
        self.repr_k[rows, :, blocks] = repr_k

    def nbytes(self) -> dict[str, int]:
        """Bytes held by this layer: ``{"device": ..., "host": ...}``."""
        dev = sum(t.nbytes for t in (self.keys_all, self.values_all, self.recv, self.repr_k) if t is not None)
        st = self.store.nbytes() if self.store is not None else {"device": 0, "host": 0}
        return {"device": dev + st["device"], "host": st["host"]}

    # -- refusals -------------------------------------------------------------------------------------------
    def _refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"MemoryCache cannot {what} (memory blocks are stored per batch row): beam search, "
            "num_return_sequences > 1 and cache offloading are not supported with memory; use greedy or sampling "
            "with one sequence per prompt"
        )

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._refuse("reorder its rows (reorder_cache)")

    def reset(self) -> None:
        raise NotImplementedError("MemoryCache cannot be reset; build a new one per prompt (generate() does)")


class MemoryCache(LMInfiniteStaticCache):
    """LM-Infinite's bounded cache plus memory blocks of the tokens that left the window.

    Args:
        num_layers: decoder layers of the model.
        n_global, n_local: LM-Infinite's sink count and window (the ring holds the last ``n_local`` tokens).
        attention_mask: the prompt's 2-D padding mask ``[B, T]`` (left padding only), or ``None``.
        config: the :class:`~longkit.config.MemoryConfig`.

    ``apply_patches(model, lm_infinite=..., memory=...)`` makes ``model.generate()`` build it. Without offload the
    block store grows with the input on the device (like a full cache, keys stored once more); with
    ``offload=True`` device memory stays bounded (:meth:`nbytes` reports both).
    """

    def __init__(self, num_layers: int, n_global: int, n_local: int, attention_mask: torch.Tensor | None = None,
                 config: MemoryConfig | None = None):
        config = config if config is not None else MemoryConfig()
        if n_local < 2 * config.block_size:
            raise ConfigError(f"memory needs LM-Infinite's n_local >= 2 * block_size (a block must be final before it "
                              f"leaves the window); got n_local={n_local}, block_size={config.block_size}")
        self.n_global, self.n_local, self.config = n_global, n_local, config
        self.shared = _MemoryShared(n_global, n_local, attention_mask, config)
        self._graphable = False
        Cache.__init__(self, layers=[MemoryLayer(self.shared, i == 0) for i in range(num_layers)])

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers: ``{"device": ..., "host": ...}`` (host: offloaded blocks)."""
        out = {"device": 0, "host": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                out[k] += v
        return out


def memory_layer_of(key: torch.Tensor) -> MemoryLayer | None:
    """The :class:`MemoryLayer` that returned ``key`` from its update, else ``None``."""
    ref = getattr(key, _LAYER_ATTR, None)
    return ref() if ref is not None else None
