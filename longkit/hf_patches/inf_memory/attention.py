"""The memory attention function (registered under ``longkit_inf_memory``): LM-Infinite + retrieved blocks.

Positional rule (per batch row; query at position ``p``, post-RoPE): the window keys (``n_global <= s``,
``p - s < n_local``) at their true distance; the sinks at their true distance inside the window, else at
LM-Infinite's ``limit_distance``; every retrieved block at the same place, its token ``o`` at distance
``MemoryConfig.distance - o`` (default ``limit_distance - o``); one softmax over the three
(:func:`longkit.kernels.block_memory.naive_memory_attention`).

A multi-token forward (prefill) runs its queries in chunks of ``chunk_size`` counted back from its last token (so
each row of a left-padded batch is cut exactly as it would be alone). Per chunk and KV head the ``topk`` blocks
that scored highest against the chunk's mean memory-branch query are gathered into one contiguous buffer and
attended to together with the sinks and the window:

* CUDA, no padding: one call of the shared kernel :func:`longkit.kernels.masked_attention` over
  ``[sinks | retrieved blocks | window]`` with ``sink_window(n_global = sinks + blocks, n_local)``: every sink and
  memory column is at least ``n_local`` columns before every query, so the kernel scores all of them through its
  global branch (``q_global · k_global``), with ``k_global`` the sink keys turned to position 0 and the stored memory
  keys turned by ``limit - distance``; window columns keep their true distances. The kernel reads keys through
  strides, not a block table, hence the gather (``topk · block_size`` tokens per chunk and layer, small next to the
  window);
* otherwise: on CPU the same rule through torch's fused CPU attention kernel (three softmax groups merged by
  their log-sum-exps, :mod:`longkit.kernels.block_memory.cpu`), on CUDA with padding its PyTorch reference.

A one-token decode step is one SDPA call over the cache's ``[rotated sinks | ring | memory]`` buffer, with the
selected blocks gathered into the memory region and turned to distance ``distance`` from the query: re-selection
(every ``reselect_every`` steps), the gather and the mask are device ops, so a step reads nothing back to the host
(except the block ids with ``offload=True``).

After a chunk's attention, each query adds its band-softmax weights to the attention its last ``block_size`` keys
have received; a block whose last token has been scored by ``block_size`` queries is written to the store with its
``repr_keys`` most-attended keys as representatives (:mod:`.cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LMInfiniteConfig, MemoryConfig
from ...errors import UnsupportedModelError
from ...kernels.block_memory import (
    block_representatives,
    naive_memory_attention,
    received_attention,
    score_blocks,
    select_blocks,
    sink_scores,
)
from ...kernels.block_memory.cpu import fused_cpu_memory_attention
from ...kernels.rope import naive_rope_rotate, rope_angles, rotate_with
from ..lm_infinite.attention import _kernel_available
from ..lm_infinite.static_cache import chunk_key_positions, step_tables
from .cache import MemoryCache, MemoryLayer, _to_device, memory_layer_of

ATTN_KEY = "longkit_inf_memory"
STATE_ATTR = "_longkit_inf_memory"

__all__ = ["ATTN_KEY", "STATE_ATTR", "MemoryState", "memory_attention", "chunk_bounds"]


@dataclass
class MemoryState:
    cfg: MemoryConfig
    lm: LMInfiniteConfig  # resolved: n_local and limit_distance are ints
    distance: int  # resolved MemoryConfig.distance
    rotary: nn.Module  # the model's rotary embedding (inv_freq read at call time)
    # CUDA without padding: the shared Triton kernel; CPU: torch's fused CPU attention. False: the plain reference
    # (naive_memory_attention) everywhere; tests switch it off to compare.
    use_kernel: bool = True
    # Tests: the CUDA path's layout (one masked-attention call over sinks + blocks + window) on CPU too, through the
    # masked-attention reference, so the layout is checked in fp32 without a GPU.
    kernel_layout_on_cpu: bool = False


def chunk_bounds(t: int, chunk: int) -> list[tuple[int, int]]:
    """Query chunks ``[u0, u1)`` of a ``t``-token forward, cut every ``chunk`` tokens back from its end."""
    bounds, u1 = [], t
    while u1 > 0:
        u0 = max(0, u1 - chunk)
        bounds.append((u0, u1))
        u1 = u0
    return bounds[::-1]


# ---------------------------------------------------------------------------------------------- finalising blocks
def _finalize(layer: MemoryLayer, rows: list[int], blocks: list[int], k_post: torch.Tensor, v: torch.Tensor,
              recv: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Write blocks ``(rows[i], blocks[i])`` to the store: ``k_post, v [n, Hkv, bs, D]`` (post-RoPE keys at
    positions ``n_global + m·bs + 0 .. bs-1``), ``recv [n, Hkv, bs]`` the attention their tokens received."""
    sh = layer.shared
    bs = sh.cfg.block_size
    start = torch.tensor([sh.n_sink + m * bs for m in blocks], dtype=torch.long)
    pos = (start[:, None] + torch.arange(bs)[None]).to(k_post.device, non_blocking=True)  # [n, bs]
    # Stored as if the block started at position 0 (its token o at position o): scored from a query at `distance`,
    # token o is at distance `distance - o`, so a block keeps its inner order wherever it is retrieved.
    k_raw = naive_rope_rotate(k_post, -(pos[:, :1]).expand_as(pos), inv_freq)
    reps = block_representatives(k_raw, recv, sh.cfg.repr_keys)
    layer.write_blocks(rows, blocks, k_raw, v, reps)


def _final_blocks(p_first: int, p_last: int, n_global: int, bs: int) -> range:
    """Blocks that become final while queries at positions ``p_first .. p_last`` are processed: block ``m`` is
    final once position ``n_global + (m + 2)·bs - 2`` (the last query that scores its last token) is done."""
    lo = max(0, -((n_global - 2 - p_first) // bs) - 2)  # ceil((p_first - n_global + 2) / bs) - 2
    hi = (p_last - n_global + 2) // bs - 2
    return range(lo, hi + 1)


# ---------------------------------------------------------------------------------------------- prefill
def _check_positions(position_ids: torch.Tensor | None, kpos_new: torch.Tensor) -> None:
    if position_ids is None:
        raise UnsupportedModelError("memory needs `position_ids` in the attention kwargs; this model's attention "
                                    "does not pass them")
    pos = position_ids.to(kpos_new.device).long().expand_as(kpos_new)
    real = kpos_new >= 0
    if not torch.equal(pos[real], kpos_new[real]):
        raise ValueError(
            "memory with padding needs position_ids = attention_mask.cumsum(-1) - 1 for real tokens, matching the "
            "cache (generate() does this; for a plain forward pass them explicitly, and build MemoryCache with the "
            "prompt's attention_mask)"
        )


def _kernel_chunk(layer: MemoryLayer, qc: torch.Tensor, qpos: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  a: int, col0: int, mem: tuple[torch.Tensor, torch.Tensor] | None, st: MemoryState,
                  inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """One chunk through the shared Triton kernel (no padding: every row has the same positions).

    ``a``: position of the chunk's first query; ``col0``: column of position 0 in ``key`` (``col = col0 + pos``).
    """
    from ...kernels import masked_attention, sink_window

    sh, lm = layer.shared, st.lm
    s, n_local, tc = sh.n_sink, lm.n_local, qc.shape[2]
    end = a + tc
    start = max(s, a - n_local + 1)  # first window position past the sinks
    n_s = min(s, end)
    sink_k, sink_v = layer.keys_all[:, :, :n_s], layer.values_all[:, :, :n_s]
    win_k, win_v = key[:, :, col0 + start:col0 + end], value[:, :, col0 + start:col0 + end]
    if mem is None:
        # Sinks + window: when the window reaches the sinks the keys are positions 0 .. end-1 in order, else the
        # index distance to every sink is >= n_local as the true one is; the index mask is exact either way.
        k, v, n_g = torch.cat([sink_k, win_k], 2), torch.cat([sink_v, win_v], 2), n_s
        k_glob = naive_rope_rotate(sink_k, -torch.arange(n_s, device=qc.device), inv_freq) if n_g else None
    else:
        mk, mv = mem  # as stored; turned by limit - distance, the kernel's global pair sees token o at distance - o
        mk = naive_rope_rotate(mk, torch.full((mk.shape[2],), lm.limit_distance - st.distance, device=qc.device),
                               inv_freq) if lm.limit_distance != st.distance else mk
        k_sg = naive_rope_rotate(sink_k, -torch.arange(n_s, device=qc.device), inv_freq)
        k_glob = torch.cat([k_sg, mk], 2)
        k, v, n_g = torch.cat([sink_k, mk, win_k], 2), torch.cat([sink_v, mv, win_v], 2), n_s + mk.shape[2]
    mask = sink_window(n_g, n_local, q_offset=k.shape[2] - tc)
    q_glob = naive_rope_rotate(qc, lm.limit_distance - qpos, inv_freq) if n_g else None
    return masked_attention(qc, k, v, mask=mask, scale=scale, q_global=q_glob, k_global=k_glob)


def _prefill(layer: MemoryLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, st: MemoryState,
             scale: float, position_ids: torch.Tensor | None) -> torch.Tensor:
    sh, cfg, lm = layer.shared, st.cfg, st.lm
    s, n_local, bs, r = sh.n_sink, lm.n_local, cfg.block_size, sh.ring
    inv_freq = st.rotary.inv_freq
    b, _, t, _ = query.shape
    hkv = key.shape[1]
    dev = query.device
    base = key.shape[2] - t  # earlier tokens handed over by the cache, in position order
    p0, p0_dev = sh.fwd["p0"], sh.fwd["p0_dev"]
    kpos = chunk_key_positions(key)
    if kpos is None:
        kpos = p0_dev[:, None] + torch.arange(t, device=dev)[None]
    _check_positions(position_ids, kpos[:, base:])
    step = sh.step
    recv = torch.zeros(b, hkv, base + t, dtype=torch.float32, device=dev)
    if base:
        order = step["order"][:, None, :].expand(b, hkv, base)
        recv[:, :, :base] = layer.recv.gather(2, order)
    kernel = (st.use_kernel and not any(sh.pad_host)
              and ((query.is_cuda and _kernel_available()) or (st.kernel_layout_on_cpu and not query.is_cuda)))
    out = torch.empty_like(query)
    for u0, u1 in chunk_bounds(t, cfg.chunk_size):
        qc, qpos = query[:, :, u0:u1], kpos[:, base + u0:base + u1]
        # Blocks this chunk may retrieve: those out of the window of its first real query, per row.
        n_elig = [0 if p + u1 - 1 < 0 else max(0, (max(p + u0, 0) - n_local + 1 - s) // bs) for p in p0]
        k_eff = min(cfg.topk, max(n_elig))
        mem = valid = None
        if k_eff:
            q_mem = naive_rope_rotate(qc, st.distance - qpos, inv_freq).float()
            real = (qpos >= 0).float()[:, None, :, None]
            q_bar = (q_mem * real).sum(2) / real.sum(2).clamp(min=1.0)
            scores = score_blocks(q_bar, layer.repr_k, _to_device(n_elig, dev), scale)
            idx, valid = select_blocks(scores, k_eff)
            mem = layer.store.gather(idx)
        if kernel:
            oc = _kernel_chunk(layer, qc, qpos, key, value, p0[0] + u0, base - p0[0], mem, st, inv_freq, scale)
        else:
            lo, hi = max(0, base + u0 - n_local + 1), base + u1
            fused_cpu = st.use_kernel and not query.is_cuda
            oc = (fused_cpu_memory_attention if fused_cpu else naive_memory_attention)(
                qc, qpos, k_win=key[:, :, lo:hi], v_win=value[:, :, lo:hi], win_pos=kpos[:, lo:hi],
                k_sink=layer.keys_all[:, :, :s], v_sink=layer.values_all[:, :, :s], sink_pos=sh.pos[:, :s],
                k_mem=mem[0] if mem else None, v_mem=mem[1] if mem else None,
                mem_valid=valid.repeat_interleave(bs, dim=-1) if mem else None, n_global=s, n_local=n_local,
                limit=lm.limit_distance, distance=st.distance, inv_freq=inv_freq, scale=scale)
        out[:, :, u0:u1] = oc
        # Representatives: what the chunk's queries give their last `bs` keys; then the blocks now final.
        rlo, hi = max(0, base + u0 - bs + 1), base + u1
        sinks = sink_scores(qc, qpos, layer.keys_all[:, :, :s], sh.pos[:, :s], n_local=n_local,
                            limit=lm.limit_distance, inv_freq=inv_freq)
        recv[:, :, rlo:hi] += received_attention(qc, key[:, :, rlo:hi], qpos, kpos[:, rlo:hi], band=bs,
                                                  n_global=s, scale=scale, sink_logits=sinks)
        rows, blocks = [], []
        for row, p in enumerate(p0):
            for m in _final_blocks(p + u0, p + u1 - 1, s, bs):
                rows.append(row)
                blocks.append(m)
        if rows:
            cols = torch.tensor([[base + s + m * bs - p0[row] + o for o in range(bs)]
                                 for row, m in zip(rows, blocks)]).to(dev, non_blocking=True)  # [n, bs]
            ri = _to_device(rows, dev)[:, None]
            k_blk = key[ri, :, cols].permute(0, 2, 1, 3)  # [n, Hkv, bs, D]
            v_blk = value[ri, :, cols].permute(0, 2, 1, 3)
            _finalize(layer, rows, blocks, k_blk, v_blk, recv[ri, :, cols].permute(0, 2, 1), inv_freq)
    # Hand the received weights back to the ring: old tokens where they were, new ones in their new slots.
    if base:
        layer.recv.scatter_(2, order, recv[:, :, :base])
    ok, src = step["ok"][:, None, :], step["src"][:, None, :].expand(b, hkv, s + r)
    layer.recv.copy_(torch.where(ok, recv[:, :, base:].gather(2, src), layer.recv))
    # Decode steps start from the last chunk's blocks (re-selected after `reselect_every` steps), padded to topk.
    layer.selection = None
    if valid is not None:
        pad = cfg.topk - idx.shape[-1]
        layer.selection = (F.pad(idx, (0, pad)), F.pad(valid, (0, pad)))
    return out


# ---------------------------------------------------------------------------------------------- decode
def _decode_tables(sh: Any, st: MemoryState, inv_freq: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """This step's tables, identical for every layer, computed by the first layer that asks (device ops only):
    the sinks' and the memory's rotations, the query's memory-branch rotation, the attention mask of the sinks and
    ring, and the band of the representatives' softmax."""
    memo = sh.fwd.get("tables")
    if memo is not None:
        return memo
    s, r, bs, lm = sh.n_sink, sh.ring, st.cfg.block_size, st.lm
    pc = sh.step["q"][:, None]  # [B, 1] position of the new token
    sp = sh.pos[:, :s]
    # LM-Infinite's own tables: the sinks' rotation (distance limit outside the window) and the visibility of the ring
    cos, sin, visible = step_tables(sh, lm.n_local, lm.limit_distance, inv_freq, device)
    t: dict[str, Any] = {"sink": (cos, sin), "q_mem": rope_angles(st.distance - pc, inv_freq, device),
                         "mem": rope_angles(pc - st.distance, inv_freq, device)}  # [B, 1, 1, D/2]
    t["seen"] = (visible[:, :, 0] if visible is not None
                 else torch.ones(pc.shape[0], 1, s + r, dtype=torch.bool, device=device))  # [B, 1, S + R]
    # the band of the representatives' softmax: the sinks (as attended) and the last `bs` positions, in ring slots
    x = pc - torch.arange(bs, device=device)[None]  # [B, bs]
    t["band_slot"] = s + torch.remainder(x - s, r)  # slot in [sinks | ring] (meaningful where x >= s)
    band_ok = (x >= s) & (pc >= s)
    t["band_ok"] = band_ok[:, None, None, :]  # [B, 1, 1, bs]
    t["band_cols_ok"] = torch.cat([(sp >= 0) & (sp <= pc), band_ok], dim=1)[:, None, None, :]  # [B, 1, 1, S + bs]
    sh.fwd["tables"] = t
    return t


def _decode_step(layer: MemoryLayer, query: torch.Tensor, st: MemoryState, scale: float) -> torch.Tensor:
    """One query per row over ``[rotated sinks | ring | selected blocks]`` of the cache's buffers (device ops)."""
    sh, cfg = layer.shared, st.cfg
    s, r, bs = sh.n_sink, sh.ring, cfg.block_size
    inv_freq = st.rotary.inv_freq
    b, hq, _, d = query.shape
    keys, values = layer.keys_all, layer.values_all
    hkv, dev = keys.shape[1], query.device
    t = _decode_tables(sh, st, inv_freq, dev)
    if s:
        keys[:, :, s:2 * s] = rotate_with(keys[:, :, :s], *t["sink"])
    # memory: (re)select, gather, turn to distance `distance` from the query
    mem_valid = torch.zeros(b, hkv, cfg.topk * bs, dtype=torch.bool, device=dev)
    if cfg.topk and layer.repr_k is not None and max(sh.fwd["n_elig"]) > 0:
        if sh.fwd["reselect"] or layer.selection is None:
            q_mem = rotate_with(query, *t["q_mem"])[:, :, 0]
            layer.selection = select_blocks(score_blocks(q_mem, layer.repr_k, sh.fwd["n_elig_dev"], scale), cfg.topk)
        idx, valid = layer.selection
        mk, mv = layer.store.gather(idx)
        keys[:, :, 2 * s + r:] = rotate_with(mk, *t["mem"])
        values[:, :, s + r:] = mv
        mem_valid = valid.repeat_interleave(bs, dim=-1)
    mask = torch.cat([t["seen"].expand(b, hkv, s + r), mem_valid], dim=2)[:, :, None, :]
    qg = query.reshape(b, hkv, hq // hkv, d)
    out = F.scaled_dot_product_attention(qg, keys[:, :, s:], values, attn_mask=mask, scale=scale)
    # representatives: the new query's softmax over the sinks (as attended above) and its last `bs` keys; the
    # band keys receive their weights (received_attention's rule, the sink scores read from the rotated sinks)
    slot = t["band_slot"]
    k_band = keys.gather(2, (slot + s)[:, None, :, None].expand(b, hkv, bs, d))
    logits = torch.matmul(qg.float(), torch.cat([keys[:, :, s:2 * s], k_band], 2).float().transpose(-1, -2)) * scale
    w = torch.softmax(logits.masked_fill(~t["band_cols_ok"], float("-inf")), dim=-1).nan_to_num(0.0)[..., s:]
    w = w.masked_fill(~t["band_ok"], 0.0).sum(dim=2)  # [B, Hkv, bs]
    attn_slot = sh.step["attn"][:, None, None].expand(b, hkv, 1)
    layer.recv.scatter_(2, attn_slot, 0.0)  # the new token's slot held an evicted token
    layer.recv.scatter_add_(2, slot[:, None, :].expand(b, hkv, bs), w)
    rows, blocks = [], []
    for row, pr in enumerate(sh.fwd["p0"]):
        for m in _final_blocks(pr, pr, s, bs):
            rows.append(row)
            blocks.append(m)
    if rows:
        ri = _to_device(rows, dev)[:, None]
        bpos = torch.tensor([[s + m * bs + o for o in range(bs)] for m in blocks]).to(dev, non_blocking=True)
        bslot = s + torch.remainder(bpos - s, r)
        _finalize(layer, rows, blocks, keys[ri, :, bslot + s].permute(0, 2, 1, 3),
                  values[ri, :, bslot].permute(0, 2, 1, 3), layer.recv[ri, :, bslot].permute(0, 2, 1), inv_freq)
    return out.reshape(b, hq, 1, d)


# ---------------------------------------------------------------------------------------------- entry point
def memory_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query [B,Hq,Tq,D]``, ``key/value [B,Hkv,Tk,D]`` (post-RoPE)
    -> ``([B, Tq, Hq, D], None)``."""
    st: MemoryState | None = getattr(module, STATE_ATTR, None)
    if st is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} was switched to '{ATTN_KEY}' without longkit.apply_patches(model, "
            "lm_infinite=..., memory=...); call apply_patches instead of set_attn_implementation"
        )
    if dropout and module.training:
        raise NotImplementedError("memory attention does not implement attention dropout")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise UnsupportedModelError(f"memory received a {attention_mask.dim()}-D attention mask; only 2-D padding "
                                    "masks are supported")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    layer = memory_layer_of(key)
    if layer is None:
        if key.shape[2] != query.shape[2]:
            raise NotImplementedError(
                "memory needs its own MemoryCache to continue from earlier tokens (it keeps the memory blocks and "
                f"the attention their tokens received); this forward got {key.shape[2] - query.shape[2]} cached "
                "tokens from another cache. generate() builds a MemoryCache; in a manual loop pass "
                "past_key_values=longkit.hf_patches.inf_memory.MemoryCache(...)"
            )
        # No memory cache (a plain forward): run this forward as the first one of a fresh single-layer cache.
        cache = MemoryCache(1, st.lm.n_global, st.lm.n_local, attention_mask, st.cfg)
        key, value = cache.layers[0].update(key, value)
        layer = cache.layers[0]
    if layer.shared.fwd["decode"]:
        out = _decode_step(layer, query, st, scale)
    else:
        out = _prefill(layer, query, key, value, st, scale, kwargs.get("position_ids"))
    return out.transpose(1, 2).contiguous(), None
