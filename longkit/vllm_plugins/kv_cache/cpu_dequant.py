"""Dequantizing packed records on CPU with byte operations (the packed backend's hot path).

The same values as :func:`~longkit.kernels.kv_quant.dequantize_kv` with ``rotated=True`` (keys and values as
stored: rotated, not rotated back), bit for bit (``tests/vllm_plugins/test_kv_cache.py`` checks every bit width),
but several times faster on CPU: codes are unpacked with ``uint8`` shifts and masks instead of int64 words, group
scales broadcast through a view instead of ``repeat_interleave``, records of any leading shape are read where they
are (so the result comes out in the order the caller needs, e.g. token-major for vLLM's cache writer), and the
result is written once, in the dtype the vLLM kernel reads. The bit layout is the one
``longkit/kernels/kv_quant/spec.py`` documents: with ``S`` values per word, word ``p`` holds value ``p + s·n/S`` at
bits ``[b·s, b·s + b)``; 3-bit words are three byte planes.
"""

from __future__ import annotations

import torch

from ...kernels.kv_quant import KVQuantSpec, PackedKV, record_layout
from ...kernels.kv_quant.naive import codebook_tensors

__all__ = ["dequantize_records", "dequantize_stored", "unpack_codes_u8"]


def unpack_codes_u8(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``uint8 [..., n·bits/8]`` packed codes -> ``uint8 [..., n]`` codes (``bits`` in 2, 3, 4)."""
    packed = packed.contiguous()  # a strided slice of the records: one small copy makes the byte ops faster
    # stack(..., -2).flatten(-2) puts segment s at [s·n/S, (s+1)·n/S): the segment order of the layout
    if bits == 4:
        return torch.stack([packed & 0xF, packed >> 4], dim=-2).flatten(-2)
    if bits == 2:
        return torch.stack([(packed >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-2).flatten(-2)
    if bits == 3:  # the 24-bit word b0 | b1 << 8 | b2 << 16 holds 8 values at bits 0, 3, ..., 21
        m = n // 8
        b0, b1, b2 = packed[..., :m], packed[..., m:2 * m], packed[..., 2 * m:]
        return torch.stack([b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7, (b1 >> 4) & 7,
                            (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5], dim=-2).flatten(-2)
    raise ValueError(f"unpack_codes_u8: bits must be 2, 3 or 4, got {bits}")


def _field(records: torch.Tensor, fields: dict[str, tuple[int, int]], name: str, bits: int, n: int, group: int,
           raw_dtype: torch.dtype, dtype: torch.dtype, codebook: bool) -> torch.Tensor:
    off, size = fields[f"{name}_codes"]
    codes = records[..., off:off + size]
    if bits == 16:
        return codes.view(raw_dtype).to(dtype).contiguous()
    so, sn = fields[f"{name}_scale"]
    scale = records[..., so:so + sn].view(torch.float16)
    c = unpack_codes_u8(codes, bits, n)
    lead = c.shape[:-1]
    if codebook:  # fp32 centroid[code] * scale, the reference's arithmetic
        x = codebook_tensors(bits, records.device)[0][c.long()].view(*lead, n // group, group)
        x.mul_(scale.float().unsqueeze(-1))
        return x.view(*lead, n).to(dtype)
    zo, zn = fields[f"{name}_zero"]
    zero = records[..., zo:zo + zn].view(torch.float16)
    # fp32 code * scale + zero, exactly the reference's arithmetic (then one rounding to ``dtype``)
    x = c.view(*lead, n // group, group).float()
    x.mul_(scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1))
    return x.view(*lead, n).to(dtype)


def dequantize_records(records: torch.Tensor, spec: KVQuantSpec, head_dim: int, dtype: torch.dtype, *,
                       raw_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[..., Dk]`` and values ``[..., D]`` as stored (rotated), contiguous in ``dtype``, from records
    ``uint8 [..., record_bytes]`` of any leading shape (last dim contiguous, other strides even).

    Args:
        records: one record per (token, KV head), e.g. vLLM's pages permuted to ``[blocks, block_size, Hkv, R]``.
        spec: the records' spec (``key_axis="token"``).
        head_dim: ``D``.
        dtype: output dtype.
        raw_dtype: dtype of 16-bit raw fields (bf16 or fp16).
    """
    if spec.key_axis != "token":
        raise NotImplementedError("dequantize_records: key_axis='channel' keeps key scales outside the records "
                                  "(use dequantize_kv)")
    lay = record_layout(spec, head_dim)
    if records.dtype != torch.uint8 or records.shape[-1] != lay.record_bytes:
        raise ValueError(f"dequantize_records: records must be uint8 [..., {lay.record_bytes}], got "
                         f"{records.dtype} {tuple(records.shape)}")
    g = spec.group_size
    k = _field(records, lay.fields, "k", spec.key_bits, lay.key_dim, g, raw_dtype, dtype, spec.codebook)
    v = _field(records, lay.fields, "v", spec.value_bits, head_dim, g, raw_dtype, dtype, spec.codebook)
    return k, v


def dequantize_stored(packed: PackedKV, spec: KVQuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, Hkv, T, Dk]`` and values ``[B, Hkv, T, D]`` of a :class:`PackedKV` as stored (rotated), in
    ``dtype`` (:func:`dequantize_records` on its buffer)."""
    return dequantize_records(packed.buffer, spec, packed.layout.head_dim, dtype, raw_dtype=packed.raw_dtype)
