"""The packed KV-cache attention backend for vLLM's CPU platform (imports vLLM; loaded in the worker).

:class:`PackedKVBackend` subclasses vLLM's ``CPUAttentionBackend`` and keeps its name (``CPU_ATTN``), metadata
builder and kernel; it changes three things:

* ``customize_spec``: a page cell holds one packed record per (token, KV head) instead of ``2·D`` dense values,
  so vLLM sizes its pages, and therefore its token capacity, from longkit's exact record size
  (:func:`~longkit.kernels.kv_quant.bytes_per_token`), padded to a multiple of the cache dtype's size.
* ``do_kv_cache_update``: the step's new keys and values are quantized (longkit's reference quantizer,
  :func:`~longkit.kernels.kv_quant.naive_quantize_kv`) and each record is written at the slot vLLM's
  ``slot_mapping`` gives it.
* ``forward``: the stock CPU kernel reads dense pages only. Without QJL, the blocks holding this step's sequences
  (each once, also when sequences share a prefix block) are dequantized in the basis they are stored in (rotated)
  into a scratch dense cache written by vLLM's own cache writer, the step's new tokens overwrite their slots with
  their exact values, and vLLM's kernel runs on the scratch pages with a remapped block table; the query is rotated
  like the keys and the output rotated back. With QJL (a score correction the dense kernel cannot add), longkit's
  :func:`~longkit.kernels.kv_quant.quantized_prefill_attention` runs per sequence.

Either way a step's new tokens attend to each other in full precision and to earlier tokens through the packed
cache, the semantics of :func:`~longkit.kernels.kv_quant.quantized_prefill_attention`. At the identity setting
(16-bit keys and values, no rotation) the scratch pages hold exactly what vLLM's dense pages would, so the output
is vLLM's bit for bit.

Cost: every step dequantizes the blocks of its sequences once per layer (``O(context · D)`` work and a scratch
buffer of ``2·D`` model-dtype values per token), on top of vLLM's kernel; see ``docs/vllm_kv_cache.md``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from ...errors import UnsupportedModelError
from ...kernels.kv_quant import (
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    quantized_prefill_attention,
    record_layout,
)
from ...kernels.kv_quant.naive import default_raw_dtype, naive_quantize_kv, rotate, unrotate
from . import runtime
from .config import page_layout
from .cpu_dequant import dequantize_records
from .paging import BatchIndex, BlockPlan, batch_index, block_plan, gather_records, scatter_records

__all__ = ["BACKEND_PATH", "PackedKVBackend", "PackedKVImpl", "packed_attention_reference"]

BACKEND_PATH = f"{__name__}.PackedKVBackend"


class PackedKVBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend storing longkit's packed KV records (see the module docstring)."""

    longkit_packed_kv: ClassVar[bool] = True  # tests and the runner check this marker
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One page cell per (token, KV head) of ``record_bytes`` rounded up to the cache dtype's size."""
        kv_spec = runtime.active_spec()
        if not isinstance(spec, FullAttentionSpec) or spec.sliding_window is not None:
            raise UnsupportedModelError(
                f"longkit's packed KV cache stores full-attention layers only, got {type(spec).__name__} "
                f"(sliding_window={getattr(spec, 'sliding_window', None)})")
        if spec.head_size_v != spec.head_size:
            raise UnsupportedModelError(f"longkit's packed KV cache needs equal key and value head sizes, got "
                                        f"{spec.head_size} and {spec.head_size_v}")
        lay = page_layout(kv_spec, spec.head_size, spec.num_kv_heads, spec.dtype.itemsize)
        return replace(spec, state_content_bytes=lay["slot_bytes"])

    @staticmethod
    def get_impl_cls() -> type[PackedKVImpl]:
        return PackedKVImpl


def _layer_index(name: str) -> int:
    """The layer number in a module name (``model.layers.7.self_attn.attn`` -> 7), 0 if there is none: it only
    seeds the layer's rotation signs, which the same layer uses for writing and reading."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else 0


class PackedKVImpl(CPUAttentionBackendImpl):
    """Per-layer attention over packed pages (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kv_spec: KVQuantSpec = runtime.active_spec()
        if self.attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"longkit's packed KV cache is built for decoder self-attention, not "
                                      f"{self.attn_type!r} layers")
        if self.kv_sharing_target_layer_name is not None:
            raise NotImplementedError("longkit's packed KV cache does not support cross-layer KV sharing "
                                      f"(this layer reads {self.kv_sharing_target_layer_name!r}'s cache)")
        if self.sliding_window != -1:
            raise UnsupportedModelError(f"longkit's packed KV cache does not support sliding-window layers "
                                        f"(window {self.sliding_window})")
        if self.kv_spec.qjl and (self.alibi_slopes is not None or self.logits_soft_cap or self.sinks is not None):
            raise NotImplementedError("longkit's packed KV cache with qjl=True supports plain softmax attention "
                                      "only (no ALiBi, logit soft-capping or attention sinks); use qjl=False")
        self.kv_spec.check_head_dim(self.head_size)
        self.layout = record_layout(self.kv_spec, self.head_size)
        self._state: KVQuantState | None = None
        self.stats = {"records_written": 0, "forward_calls": 0, "context_tokens_read": 0}

    # ------------------------------------------------------------------ helpers
    def _state_for(self, layer: Any, device: torch.device) -> KVQuantState:
        if self._state is None:
            self._state = KVQuantState.create(self.kv_spec, self.head_size, self.num_kv_heads, device,
                                              layer_idx=_layer_index(getattr(layer, "layer_name", "")))
        return self._state

    def _pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's cache as records: ``uint8 [num_blocks, Hkv, block_size, record_bytes]``."""
        return kv_cache.view(torch.uint8)[..., :self.layout.record_bytes]

    # ------------------------------------------------------------------ vLLM hooks
    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Quantize the step's keys and values ``[N, Hkv, D]`` and write one record per token and head at
        ``slot_mapping`` (vLLM calls this before :meth:`forward`)."""
        n = min(key.shape[0], slot_mapping.shape[0])
        if n == 0:
            return
        state = self._state_for(layer, key.device)
        k = key[:n].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
        v = value[:n].transpose(0, 1).unsqueeze(0)
        # The reference quantizer directly (quantize_kv's checks hold by construction; its compiler/grad-mode
        # wrappers cost about a millisecond per call, i.e. per layer and step).
        packed = naive_quantize_kv(k, v, self.kv_spec, state)  # a new [1, Hkv, n, record_bytes] buffer
        records = packed.buffer[0].transpose(0, 1)  # [n, Hkv, record_bytes]
        self.stats["records_written"] += scatter_records(self._pages(kv_cache), slot_mapping[:n], records)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Attention of the step's queries ``[N, Hq, D]`` over packed pages; writes ``output [N, Hq, D]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by longkit's packed KV cache")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self.stats["forward_calls"] += 1
        n = attn_metadata.num_actual_tokens
        block_size = kv_cache.shape[2]
        state = self._state_for(layer, query.device)
        spec = self.kv_spec
        if spec.qjl:
            idx = batch_index(attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table,
                              block_size)
            ctx = gather_records(self._pages(kv_cache), idx.ctx_block, idx.ctx_offset)  # [C, Hkv, record_bytes]
            self.stats["context_tokens_read"] += ctx.shape[0]
            out = packed_attention_reference(query[:n], key[:n], value[:n], ctx, idx, spec, state, self.scale,
                                             raw_dtype=default_raw_dtype(query.dtype))
            output[:n].copy_(out)
            return output
        plan, meta = _step_plan(attn_metadata, block_size)
        # The step's blocks, dequantized in the stored (rotated) basis into a scratch dense cache that vLLM's own
        # cache writer fills in the layout its kernel reads; then the step's new tokens overwrite their slots with
        # their exact (rotated) values.
        blocks = self._pages(kv_cache).index_select(0, plan.blocks)  # [U, Hkv, block_size, record_bytes]
        self.stats["context_tokens_read"] += int(attn_metadata.seq_lens.sum()) - n
        U = blocks.shape[0]
        # token-major records -> keys and values [U, block_size, Hkv, D], i.e. [U * block_size, Hkv, D] for free
        k_blk, v_blk = dequantize_records(blocks.permute(0, 2, 1, 3), spec, self.head_size, query.dtype,
                                          raw_dtype=default_raw_dtype(query.dtype))
        scratch = torch.empty(U, self.num_kv_heads, block_size, 2 * self.head_size, dtype=query.dtype,
                              device=query.device)
        shape = (U * block_size, self.num_kv_heads, self.head_size)
        super().do_kv_cache_update(layer, k_blk.view(shape), v_blk.view(shape), scratch,
                                   torch.arange(U * block_size, device=query.device))
        q, k_new, v_new = query[:n], key[:n], value[:n]
        if spec.rotate:  # attend in the stored (rotated) basis: rotate q and the new tokens, not the context
            q = _rotate_tokens(q, state.key_signs)
            k_new = _rotate_tokens(k_new, state.key_signs)
            v_new = _rotate_tokens(v_new, state.value_signs)
        super().do_kv_cache_update(layer, k_new, v_new, scratch, plan.new_scratch_slot)
        if not spec.rotate:
            super().forward(layer, q, k_new, v_new, scratch, meta, output)
            return output
        out_rot = torch.empty_like(output[:n])
        super().forward(layer, q, k_new, v_new, scratch, meta, out_rot)
        output[:n].copy_(_unrotate_tokens(out_rot, state.value_signs))
        return output


_plan_cache: dict[str, Any] = {}  # the last step's metadata, its key, plan and remapped metadata


def _step_plan(attn_metadata: Any, block_size: int) -> tuple[BlockPlan, Any]:
    """The step's :class:`BlockPlan` and metadata with the scratch block table, computed once per step (every layer
    of a step gets the same metadata object; its lengths are compared too, in case vLLM updates it in place)."""
    key = (block_size, attn_metadata.num_actual_tokens, attn_metadata.seq_lens.tolist(),
           attn_metadata.query_start_loc.tolist())
    if _plan_cache.get("metadata") is not attn_metadata or _plan_cache.get("key") != key:
        plan = block_plan(attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table,
                          block_size)
        _plan_cache.update(metadata=attn_metadata, key=key, plan=plan,
                           remapped=replace(attn_metadata, block_table=plan.scratch_block_table))
    return _plan_cache["plan"], _plan_cache["remapped"]


def _rotate_tokens(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x [N, H, D]`` rotated per head like the cache (``H`` a multiple of ``signs``' heads), in x's dtype."""
    return rotate(x.float().transpose(0, 1).unsqueeze(0), signs)[0].transpose(0, 1).to(x.dtype).contiguous()


def _unrotate_tokens(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    return unrotate(x.float().transpose(0, 1).unsqueeze(0), signs)[0].transpose(0, 1).to(x.dtype).contiguous()


def packed_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: torch.Tensor,
                               idx: BatchIndex, spec: KVQuantSpec, state: KVQuantState, scale: float, *,
                               raw_dtype: torch.dtype) -> torch.Tensor:
    """Attention of one step, sequence by sequence, with longkit's
    :func:`~longkit.kernels.kv_quant.quantized_prefill_attention` (QJL included): each sequence's new tokens
    attend causally to themselves in full precision and to its context records.

    Args:
        query: ``[N, Hq, D]``; key, value: ``[N, Hkv, D]`` (the step's new tokens, sequence by sequence).
        ctx: ``uint8 [C, Hkv, record_bytes]``: the sequences' context records, as :func:`batch_index` orders them.
        idx: the step's :class:`BatchIndex`.
        spec, state: the cache's spec and the layer's state.
        scale: softmax scale.
        raw_dtype: dtype of the records' 16-bit raw fields (the cache's: the model dtype, fp16 for fp32 models).

    Returns:
        ``[N, Hq, D]`` in query's dtype.
    """
    out = torch.empty_like(query)
    q_start = 0
    for r, (q_len, c_len, c_start) in enumerate(zip(idx.q_lens.tolist(), idx.ctx_lens.tolist(),
                                                    idx.ctx_starts.tolist())):
        del r
        if q_len == 0:
            continue
        sl = slice(q_start, q_start + q_len)
        q_start += q_len
        packed = None
        if c_len:
            packed = PackedKV.from_buffer(spec, ctx[c_start:c_start + c_len].transpose(0, 1).unsqueeze(0),
                                          state.head_dim, raw_dtype=raw_dtype)
        o = quantized_prefill_attention(query[sl].transpose(0, 1).unsqueeze(0), key[sl].transpose(0, 1).unsqueeze(0),
                                        value[sl].transpose(0, 1).unsqueeze(0), packed, spec, state, scale)
        out[sl] = o[0].transpose(0, 1)
    return out
