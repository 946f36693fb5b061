"""Quantized KV cache: rotated, packed 2/3/4-bit keys and values with an optional QJL key correction.

TurboQuant-style (Zandieh et al.): post-RoPE keys and values are rotated by a randomized Hadamard transform
(outlier channels spread over all channels), quantized with min/max groups to 2, 3 or 4 bits, and packed (3 bits
really take 3 bits); a 1-bit Quantized Johnson-Lindenstrauss sketch of the key residual makes the score estimate
unbiased. ThinK-style pruning stores only the most useful key channels. KIVI (per-channel keys, per-token values,
no rotation) is expressible as :meth:`KVQuantSpec.kivi`, the baseline.

Public API:

* :class:`KVQuantSpec` (options), :func:`bytes_per_token` (exact storage), :class:`KVQuantState` (per-layer signs,
  QJL matrix, kept channels), :class:`PackedKV` (the cache tensors: one byte record per token and KV head).
* :func:`quantize_kv` (quantize-on-write into a preallocated cache at ``start``), :func:`dequantize_kv`
  (reference / debugging), :func:`quantized_decode_attention` (fused decode over the packed cache),
  :func:`quantized_prefill_attention` (fresh tokens in full precision + packed past), :func:`merge_attention_states`.
* ``naive_*``: the plain-PyTorch references (``naive.py``), the CPU path and the tests' oracle.

Modules, cut by role as ``masked_attn/``: ``spec.py`` / ``state.py`` / ``packed.py`` (options, state, layout);
``interface.py`` (validation, dispatch: Triton for CUDA tensors, ``naive`` elsewhere); ``launch.py`` (host side:
query rotation, split plan, launches; imports Triton, loaded on first use); ``quant.py`` and ``decode.py``
(``@triton.jit`` kernels only) with ``_jit.py`` (shared device helpers).

Design choices, measured where a number is given:

* Quantizer: asymmetric min/max per group with fp16 scale and zero by default (error at most half a step, see
  :class:`KVQuantSpec`), or (``codebook=True``, TurboQuant's choice) the Lloyd-Max codebook of the Gaussian scaled
  by one fp16 RMS per group. Relative squared error ``||x - x̂||² / ||x||²`` on rotated standard Gaussian vectors
  (D=128, 4096 vectors, fp32) at 2 / 3 / 4 bits: codebook with one group per vector 0.116 / 0.034 / 0.0093 (2 bytes
  of scale per vector), min/max groups of 32 channels 0.154 / 0.028 / 0.0061 (16 bytes), one min/max group of 128
  0.249 / 0.046 / 0.0099 (4 bytes). At equal bytes the codebook wins; min/max groups of 32 have the lower error at
  3 and 4 bits for 14 more bytes per vector. Only the codebook reaches 5x less memory than bf16 at 3 bits (5.12x at
  D=128: 48 code bytes + 2).
* Prefill attends to its own fresh tokens in full precision and quantizes them afterwards
  (:func:`quantized_prefill_attention`): cheaper (the dense kernel) and more accurate, as in KIVI and TurboQuant.
* Keys are rotated once, at write; the decode query is projected and rotated in PyTorch (a decode step's few rows: one
  fp64 matmul; longer chunks: ``log2(D)`` butterfly steps).
* Pruned keys are rotated within the kept channels (rotation after the choice, which is made in the original
  channel basis, where ThinK's magnitudes mean something).
"""

from __future__ import annotations

from .interface import (
    dequantize_kv,
    merge_attention_states,
    quantize_kv,
    quantized_decode_attention,
    quantized_prefill_attention,
)
from .naive import (
    hadamard_transform,
    naive_decode_attention,
    naive_dequantize_kv,
    naive_prefill_attention,
    naive_quantize_kv,
    pack_codes,
    unpack_codes,
)
from .packed import PackedKV
from .spec import KVQuantSpec, RecordLayout, bytes_per_token, record_layout
from .state import KVQuantState

__all__ = [
    "KVQuantSpec",
    "KVQuantState",
    "PackedKV",
    "RecordLayout",
    "record_layout",
    "bytes_per_token",
    "quantize_kv",
    "dequantize_kv",
    "quantized_decode_attention",
    "quantized_prefill_attention",
    "merge_attention_states",
    "naive_quantize_kv",
    "naive_dequantize_kv",
    "naive_decode_attention",
    "naive_prefill_attention",
    "hadamard_transform",
    "pack_codes",
    "unpack_codes",
]
