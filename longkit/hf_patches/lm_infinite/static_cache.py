"""A static-shape LM-Infinite cache and decode step: fixed buffers, device-side bookkeeping, graph-capturable.

``LMInfiniteConfig(decode="static" | "cuda_graph")`` makes ``generate()`` use :class:`LMInfiniteStaticCache`.
Unlike :class:`~longkit.hf_patches.lm_infinite.cache.LMInfiniteCache` (column layout, Python-side write
index, data-dependent shapes), every one-token decode step here runs the same kernels on the same buffers
with no host synchronisation, so the whole decode forward can be captured in a CUDA graph.

Layout: tokens are addressed by their *position*, per batch row, so left padding is never stored:

* ``n_global`` sink slots: position ``j < n_global`` lives in slot ``j`` (the global branch);
* ``n_local`` ring slots: position ``q >= n_global`` lives in ring slot ``(q - n_global) % n_local``, so the
  ring always holds each row's last ``n_local`` tokens, i.e. exactly its local window.

Per layer, ``keys`` is ``[B, Hkv, 2·S + R, D]`` = ``[raw sinks | rotated sinks | ring]`` (S = n_global,
R = n_local) and ``values`` is ``[B, Hkv, S + R, D]`` = ``[sinks | ring]``. The attention reads the view
``keys[:, :, S:]``: each step it re-rotates the raw sink keys into the middle block in place (the distance
limit depends on the query position), so no per-step concatenation copies the ring. Shared by all layers
(identical for every layer): ``pos`` ``[B, S + R]`` (position held by each attention slot, -1 = empty) and
``cols`` (columns written, a device scalar; a row's next position is ``cols - pad[b]``).

The one-query attention step (:func:`static_decode_attention`) is the same math as
``lm_infinite.attention._decode_path``: sink keys rotated by ``p - limit - s`` (global branch) or kept (inside the
window), ring keys at their true distance, one softmax. Once every row's ring is full (its position
``>= n_global + n_local - 1``) all slots are visible and the step passes no mask (SDPA may use its flash
kernel); before that a ``[B, 1, 1, S + R]`` visibility mask is built on the device. The host knows which of
the two phases a step is in without reading the device (it counts steps), so a graph is captured per phase.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ...kernels.rope import rope_angles, rotate_with

__all__ = ["LMInfiniteStaticCache", "LMInfiniteStaticLayer", "chunk_key_positions", "static_decode_attention",
           "static_layer_of"]

_LAYER_ATTR = "_longkit_static_layer"  # on the attention view of a layer's keys: weakref to the layer
_KPOS_ATTR = "_longkit_kpos"  # on keys returned for a multi-token update: their positions [B, Tk]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Shared:
    """Bookkeeping shared by every layer of one cache (all layers write the same slots at the same step)."""

    def __init__(self, n_global: int, n_local: int, attention_mask: torch.Tensor | None):
        self.n_sink, self.ring = n_global, n_local
        if attention_mask is not None:
            mask = attention_mask.bool()
            # Leading padding columns per row (a row that is all padding counts as unpadded: it has no tokens).
            first = torch.where(mask.any(-1), mask.int().argmax(-1), torch.zeros_like(mask[:, 0], dtype=torch.long))
            self.pad: torch.Tensor | None = first.long()
            self.max_pad = int(first.max().item()) if first.numel() else 0  # one sync, at construction
        else:
            self.pad, self.max_pad = None, 0
        self.n_seen = 0  # host: columns written (incl. left padding); advanced without reading the device
        self.pos: torch.Tensor | None = None  # [B, S + R] position held by each attention slot, -1 = empty
        self.cols: torch.Tensor | None = None  # device scalar: columns written
        self.forward_id = 0  # host: bumped by layer 0 at every forward (memo key for per-forward tables)
        self.step: dict[str, Any] = {}  # per-forward index tensors, computed by layer 0, reused by the others
        self.tables: tuple[Any, ...] | None = None  # (forward_id, (n_local, limit), cos, sin, mask) of the step

    def init(self, batch: int, device: torch.device) -> None:
        self.pos = torch.full((batch, self.n_sink + self.ring), -1, dtype=torch.long, device=device)
        self.cols = torch.zeros((), dtype=torch.long, device=device)
        self.pad = (self.pad.to(device) if self.pad is not None
                    else torch.zeros(batch, dtype=torch.long, device=device))
        if self.pad.shape[0] != batch:
            raise ValueError(f"LMInfiniteStaticCache was built for batch {self.pad.shape[0]}, got {batch}")

    def reorder(self, idx: torch.Tensor) -> None:
        """Beam search reordered the rows (``idx`` on the device): reorder the per-row bookkeeping in place."""
        if self.pos is not None:
            self.pos.copy_(self.pos.index_select(0, idx))
            self.pad.copy_(self.pad.index_select(0, idx))

    def full_after(self, n_seen: int) -> bool:
        """Whether, once ``n_seen`` columns are written, every row's window fills the ring (no mask needed)."""
        return n_seen - 1 - self.max_pad >= self.n_sink + self.ring - 1

    # -- per-forward plans (layer 0 computes them, every layer applies them) ------------------------------
    def plan_decode(self) -> None:
        """One new token per row: its position, slot indices, and the shared position table update."""
        s, r = self.n_sink, self.ring
        q = self.cols - self.pad  # [B] position of the new token
        ring_slot = torch.remainder(q - s, r)
        raw = torch.where(q < s, q, 2 * s + ring_slot)  # index into keys [raw sinks | rot sinks | ring]
        attn = torch.where(q < s, q, s + ring_slot)  # index into values / pos / the attention view
        self.pos.scatter_(1, attn[:, None], q[:, None])
        self.cols.add_(1)
        self.step = {"kind": "decode", "q": q, "raw": raw, "attn": attn, "full": self.full_after(self.n_seen + 1)}

    def plan_chunk(self, t: int) -> None:
        """``t`` new columns: for each slot, the chunk column that now owns it (the latest such position)."""
        s, r = self.n_sink, self.ring
        dev = self.pos.device
        p0 = self.cols - self.pad  # [B] position of the chunk's first column (negative = padding)
        hi = p0 + (t - 1)  # [B] position of its last column
        j = torch.arange(s, device=dev)
        sink_ok = (j[None] >= p0[:, None]) & (j[None] <= hi[:, None])
        rr = torch.arange(r, device=dev)
        qq = hi[:, None] - torch.remainder(hi[:, None] - s - rr[None], r)  # latest position <= hi in ring slot rr
        ring_ok = (qq >= s) & (qq >= p0[:, None])
        new_pos = torch.cat([j.expand(qq.shape[0], s), qq], dim=1)
        ok = torch.cat([sink_ok, ring_ok], dim=1)  # [B, S + R]
        src = (new_pos - p0[:, None]).clamp(0, t - 1)  # chunk column of each slot's new token
        self.step = {"kind": "chunk", "ok": ok, "src": src, "first": self.n_seen == 0}
        if self.n_seen:  # a later chunk attends to the earlier tokens too: hand them over in position order
            order = torch.sort(self.pos, dim=1, stable=True).indices  # -1 (empty) first, then positions
            chunk_pos = p0[:, None] + torch.arange(t, device=dev)[None]
            self.step["order"] = order
            self.step["kpos"] = torch.cat([self.pos.gather(1, order), torch.where(chunk_pos >= 0, chunk_pos, -1)], 1)
        self.pos.copy_(torch.where(ok, new_pos, self.pos))
        self.cols.add_(t)


class LMInfiniteStaticLayer(CacheLayerMixin):
    """One layer of :class:`LMInfiniteStaticCache` (buffers preallocated at the first update)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, shared: _Shared, first: bool):
        super().__init__()
        self.shared = shared
        self.first = first  # layer 0: plans each forward's writes for all layers
        self.attn_keys: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        s, r = self.shared.n_sink, self.shared.ring
        self.dtype, self.device = key_states.dtype, key_states.device
        # Zeros, not empty: masked-out slots still enter SDPA's weighted sum with weight 0 (0·NaN = NaN).
        self.keys = key_states.new_zeros(b, h, 2 * s + r, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], s + r, value_states.shape[-1])
        self.attn_keys = self.keys[:, :, s:]  # [rotated sinks | ring]: what the attention reads
        setattr(self.attn_keys, _LAYER_ATTR, weakref.ref(self))
        if self.first and self.shared.pos is None:
            self.shared.init(b, key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        sh = self.shared
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self.first:
            sh.forward_id += 1
            if t == 1 and sh.n_seen > 0:
                sh.plan_decode()
            else:
                sh.plan_chunk(t)
            if not _capturing():  # a captured step advances the host count when it is replayed
                sh.n_seen += t
        step = sh.step
        if step["kind"] == "decode":
            self._write_decode(key_states, value_states, step)
            return self.attn_keys, self.values
        return self._update_chunk(key_states, value_states, step)

    def _write_decode(self, key_states: torch.Tensor, value_states: torch.Tensor, step: dict[str, Any]) -> None:
        """Write a decode step's token into its slot (sink or ring) of every row, in place."""
        b, h, _, d = key_states.shape
        self.keys.scatter_(2, step["raw"].view(b, 1, 1, 1).expand(b, h, 1, d), key_states)
        self.values.scatter_(2, step["attn"].view(b, 1, 1, 1).expand(b, self.values.shape[1], 1,
                                                                       self.values.shape[-1]), value_states)

    def _update_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor, step: dict[str, Any]):
        s = self.shared.n_sink
        raw_k = torch.cat([self.keys[:, :, :s], self.keys[:, :, 2 * s:]], dim=2)  # [B, H, S + R, D] stored keys
        old = None
        if not step["first"]:  # earlier tokens, in position order, before the chunk overwrites ring slots
            order = step["order"][:, None, :, None]
            old = (raw_k.gather(2, order.expand_as(raw_k)), self.values.gather(2, order.expand_as(self.values)))
        ok = step["ok"][:, None, :, None]
        src = step["src"][:, None, :, None]
        new_k = torch.where(ok, key_states.gather(2, src.expand(-1, key_states.shape[1], -1, key_states.shape[-1])),
                            raw_k)
        new_v = torch.where(ok, value_states.gather(2, src.expand(-1, value_states.shape[1], -1,
                                                                  value_states.shape[-1])), self.values)
        self.keys[:, :, :s] = new_k[:, :, :s]
        self.keys[:, :, 2 * s:] = new_k[:, :, s:]
        self.values.copy_(new_v)
        if old is None:  # first chunk (the prompt): it attends to itself, as with the other caches
            return key_states, value_states
        keys = torch.cat([old[0], key_states], dim=2)
        setattr(keys, _KPOS_ATTR, step["kpos"])
        return keys, torch.cat([old[1], value_states], dim=2)

    def get_seq_length(self) -> int:
        return self.shared.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.shared.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # no bound on the logical length: memory is bounded, positions are not

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "LMInfiniteStaticCache cannot be cropped (evicted tokens are gone): assisted/speculative generation "
            "is not supported with lm_infinite's bounded cache"
        )

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: reorder the rows *in place*. The attention reads a view of ``keys`` and captured CUDA
        graphs read these very buffers, so they must keep their addresses (transformers' default replaces them)."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.keys.device)
        self.keys.copy_(self.keys.index_select(0, idx))
        self.values.copy_(self.values.index_select(0, idx))
        if self.first:
            self.shared.reorder(idx)

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"LMInfiniteStaticCache cannot {what}: its buffers are fixed (the attention and CUDA graphs read them in "
            "place). Use LMInfiniteConfig(decode='eager') for this generation mode"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("change its batch size (batch_repeat_interleave)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("change its batch size (batch_select_indices)")

    def offload(self) -> None:
        self._refuse("be offloaded")

    def prefetch(self) -> None:
        self._refuse("be offloaded")

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses; the prompt's padding is kept)."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        if self.first and self.shared.pos is not None:
            self.shared.pos.fill_(-1)
            self.shared.cols.zero_()
            self.shared.n_seen = 0

    def stored_tokens(self) -> int:
        """Slots filled in the most-padded row (each row holds at most ``n_global + n_local`` tokens)."""
        return max(0, min(self.shared.n_seen - self.shared.max_pad, self.shared.n_sink + self.shared.ring))


class LMInfiniteStaticCache(Cache):
    """Fixed-size LM-Infinite cache: ``n_global + n_local`` slots per row and layer, preallocated.

    Args:
        num_layers: decoder layers of the model.
        n_global: LM-Infinite sink size. n_local: LM-Infinite window (ring slots).
        attention_mask: the prompt's 2-D padding mask ``[B, T]`` (left padding), or ``None``.
        graphable: report ``is_compileable`` so ``generate()`` routes one-token steps through the model's
            ``get_compiled_call`` (which ``decode="cuda_graph"`` replaces by a CUDA-graph runner).

    ``apply_patches(model, lm_infinite=LMInfiniteConfig(decode="static" | "cuda_graph"))`` makes
    ``model.generate()`` build it.
    """

    def __init__(self, num_layers: int, n_global: int, n_local: int, attention_mask: torch.Tensor | None = None,
                 *, graphable: bool = False):
        self.n_global, self.n_local = n_global, n_local
        self.shared = _Shared(n_global, n_local, attention_mask)
        self._graphable = graphable
        super().__init__(layers=[LMInfiniteStaticLayer(self.shared, i == 0) for i in range(num_layers)])

    @property
    def is_compileable(self) -> bool:
        return self._graphable

    def stored_tokens(self) -> int:
        """Tokens actually held per row and layer (the memory bound), as opposed to ``get_seq_length()``."""
        return self.layers[0].stored_tokens()

    # -- the CUDA-graph runner's protocol (see decode_graph.DecodeGraphRunner) ------------------------
    def graph_ready(self) -> bool:
        """A one-token forward now would take the static decode step (the prompt is in)."""
        return self.shared.n_seen > 0 and self.shared.pos is not None

    def graph_phase(self) -> str:
        """Which captured graph the next one-token step needs: ``"full"`` (no mask) or ``"fill"``."""
        return "full" if self.shared.full_after(self.shared.n_seen + 1) else "fill"

    def graph_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Drop the attention mask: it grows every step (2-D, or a dict of them per layer type), and the static
        decode step never reads it (this cache holds each row's padding and positions on the device)."""
        return {**kwargs, "attention_mask": None}

    def graph_step_done(self) -> None:
        """A replayed step wrote one column on the device: advance the host count to match."""
        self.shared.n_seen += 1


def static_layer_of(key: torch.Tensor) -> LMInfiniteStaticLayer | None:
    """The static layer whose attention view ``key`` is (decode step), else ``None``."""
    ref = getattr(key, _LAYER_ATTR, None)
    return ref() if ref is not None else None


def chunk_key_positions(key: torch.Tensor) -> torch.Tensor | None:
    """Positions ``[B, Tk]`` attached to keys returned by a multi-token update after the prompt, else ``None``."""
    return getattr(key, _KPOS_ATTR, None)


def step_tables(sh: _Shared, n_local: int, limit: int, inv_freq: torch.Tensor, device: torch.device):
    """A decode step's rotation of the sinks (``cos, sin [B, 1, S, D/2]`` or ``None``) and visibility mask (bool
    ``[B, 1, 1, S + R]``, ``None`` once every slot is visible): identical for all layers, computed once per step."""
    memo = sh.tables
    if memo is not None and memo[0] == sh.forward_id and memo[1] == (n_local, limit):
        return memo[2:]
    s = sh.n_sink
    q = sh.step["q"][:, None]  # [B, 1]
    cos = sin = None
    if s:
        sp = sh.pos[:, :s]
        delta = torch.where(q - sp >= n_local, q - limit - sp, torch.zeros_like(sp))
        cos, sin = rope_angles(delta, inv_freq, device)  # [B, 1, S, D/2]
    mask = None
    if not sh.step["full"]:
        sp = sh.pos
        visible = (sp >= 0) & ((q - sp < n_local) | (sp < s))
        mask = visible[:, None, None, :]
    sh.tables = (sh.forward_id, (n_local, limit), cos, sin, mask)
    return cos, sin, mask


def static_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layer: LMInfiniteStaticLayer, n_local: int, limit: int, inv_freq: torch.Tensor,
                            scaling: float | None) -> torch.Tensor:
    """One query per row against a static layer: ``query [B, Hq, 1, D]`` -> ``[B, Hq, 1, D]``.

    Fixed shapes, no host reads: the sink keys are re-rotated into the attention view in place, the GQA
    groups are packed into the query-length axis (``[B, Hkv, Hq/Hkv, D]``, no repeated K/V), and one SDPA call
    scores sinks and ring together.
    """
    sh = layer.shared
    cos, sin, mask = step_tables(sh, n_local, limit, inv_freq, query.device)
    s = sh.n_sink
    if s:
        key[:, :, :s].copy_(rotate_with(layer.keys[:, :, :s], cos, sin))
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    out = F.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), key, value, attn_mask=mask,
                                         scale=scaling)
    return out.reshape(b, hq, 1, value.shape[-1])
