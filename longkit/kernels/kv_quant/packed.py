"""The packed KV cache tensors (:class:`PackedKV`): one byte buffer of records plus typed views of its fields."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from longkit._validate import BUILTIN, check_int

from .spec import KVQuantSpec, RecordLayout, record_layout

__all__ = ["PackedKV", "RAW_DTYPES"]

RAW_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class PackedKV:
    """A packed (quantized) KV cache of one layer, ``T`` token slots (a capacity: which slots hold tokens is the
    caller's ``lengths``). Build with :meth:`allocate` (zeros), :meth:`from_buffer` (views of an existing buffer,
    e.g. a serving engine's pages) or :func:`~longkit.kernels.kv_quant.quantize_kv`.

    ``buffer`` owns the memory; every other tensor except the KIVI key scales is a view of it (see
    ``spec.py`` for the record layout), so writing tokens ``[s, e)`` touches ``buffer[:, :, s:e]`` only.

    Attributes:
        buffer: ``uint8 [B, Hkv, T, record_bytes]``.
        k_codes: ``uint8 [B, Hkv, T, Dk·key_bits/8]`` packed codes, or ``[B, Hkv, T, Dk]`` raw keys in
            ``raw_dtype`` when ``key_bits == 16``; rotated and channel-pruned as the spec says.
        v_codes: ``uint8 [B, Hkv, T, D·value_bits/8]`` or raw ``[B, Hkv, T, D]`` values.
        k_scale, k_zero: fp16 ``[B, Hkv, T, Dk/group_size]`` (``key_axis="token"``) or separate fp16 tensors
            ``[B, Hkv, ceil(T/group_size), Dk]`` (``key_axis="channel"``); ``None`` with 16-bit keys.
        v_scale, v_zero: fp16 ``[B, Hkv, T, D/group_size]``; ``None`` with 16-bit values.
        k_qjl: ``uint8 [B, Hkv, T, qjl_dim/8]`` residual sign bits; ``None`` without QJL.
        k_rnorm: fp16 ``[B, Hkv, T]`` residual norms; ``None`` without QJL.
        layout: the :class:`~longkit.kernels.kv_quant.spec.RecordLayout`.
        raw_dtype: dtype of 16-bit raw fields (bf16 or fp16).
        spec: the :class:`~longkit.kernels.kv_quant.spec.KVQuantSpec` the records follow.
    """

    buffer: torch.Tensor
    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scale: torch.Tensor | None
    k_zero: torch.Tensor | None
    v_scale: torch.Tensor | None
    v_zero: torch.Tensor | None
    k_qjl: torch.Tensor | None
    k_rnorm: torch.Tensor | None
    layout: RecordLayout
    raw_dtype: torch.dtype
    spec: KVQuantSpec

    # ------------------------------------------------------------------------- construction
    @classmethod
    def allocate(cls, spec: KVQuantSpec, batch: int, num_kv_heads: int, max_tokens: int, head_dim: int, *,
                 device: torch.device | str = "cpu", raw_dtype: torch.dtype = torch.bfloat16) -> PackedKV:
        """A zero-filled cache of ``max_tokens`` slots (``max_tokens`` a multiple of ``group_size`` is not needed:
        KIVI key scales get ``ceil(max_tokens / group_size)`` rows)."""
        batch = check_int("PackedKV.allocate", "batch", batch, min=1, errors=BUILTIN)
        num_kv_heads = check_int("PackedKV.allocate", "num_kv_heads", num_kv_heads, min=1, errors=BUILTIN)
        max_tokens = check_int("PackedKV.allocate", "max_tokens", max_tokens, min=0, errors=BUILTIN)
        lay = record_layout(spec, head_dim)
        buf = torch.zeros(batch, num_kv_heads, max_tokens, lay.record_bytes, dtype=torch.uint8, device=device)
        side = None
        if lay.side_bytes:
            rows = -(-max_tokens // spec.group_size)
            side = torch.zeros(2, batch, num_kv_heads, rows, lay.key_dim, dtype=torch.float16, device=device)
        return cls.from_buffer(spec, buf, head_dim, raw_dtype=raw_dtype, key_scales=side)

    @classmethod
    def from_buffer(cls, spec: KVQuantSpec, buffer: torch.Tensor, head_dim: int, *,
                    raw_dtype: torch.dtype = torch.bfloat16, key_scales: torch.Tensor | None = None) -> PackedKV:
        """Views of ``buffer`` (``uint8 [B, Hkv, T, record_bytes]``, last dim contiguous, strides even) as a cache.

        Args:
            spec: the spec the records follow.
            buffer: the record bytes; may be a strided view (e.g. pages of a larger pool).
            head_dim: ``D``.
            raw_dtype: dtype of raw 16-bit fields (``torch.bfloat16`` or ``torch.float16``).
            key_scales: with ``key_axis="channel"``, fp16 ``[2, B, Hkv, ceil(T/group_size), Dk]`` (scales, zeros).
        """
        lay = record_layout(spec, head_dim)
        if raw_dtype not in RAW_DTYPES:
            raise TypeError(f"PackedKV: raw_dtype must be torch.bfloat16 or torch.float16, got {raw_dtype}")
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 4:
            got = f"{buffer.dtype} {tuple(buffer.shape)}" if isinstance(buffer, torch.Tensor) else type(buffer).__name__
            raise ValueError(f"PackedKV: buffer must be a uint8 tensor [B, Hkv, T, record_bytes], got {got}")
        if buffer.shape[-1] != lay.record_bytes:
            raise ValueError(f"PackedKV: buffer's last dim must be record_bytes={lay.record_bytes} for this spec and "
                             f"head_dim={head_dim}, got {buffer.shape[-1]}")
        if buffer.stride(-1) != 1 or any(s % 2 for s in buffer.stride()[:-1]) or buffer.storage_offset() % 2:
            raise ValueError(f"PackedKV: buffer's last dim must be contiguous and its other strides and storage "
                             f"offset even (fp16 views), got strides {tuple(buffer.stride())}")
        B, H, T, _ = buffer.shape
        if lay.side_bytes:
            rows = -(-T // spec.group_size)
            want = (2, B, H, rows, lay.key_dim)
            if (not isinstance(key_scales, torch.Tensor) or tuple(key_scales.shape) != want
                    or key_scales.dtype != torch.float16 or key_scales.device != buffer.device):
                got = (f"{key_scales.dtype} {tuple(key_scales.shape)}" if isinstance(key_scales, torch.Tensor)
                       else repr(key_scales))
                raise ValueError(f"PackedKV: key_axis='channel' needs key_scales, fp16 {want} on {buffer.device}, "
                                 f"got {got}")
        elif key_scales is not None:
            raise ValueError("PackedKV: key_scales is only used with key_axis='channel'")

        def view(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            if name not in lay.fields:
                return None
            off, n = lay.fields[name]
            return buffer[..., off:off + n].view(dtype)

        f16 = torch.float16
        k_codes = view("k_codes", raw_dtype if spec.key_bits == 16 else torch.uint8)
        v_codes = view("v_codes", raw_dtype if spec.value_bits == 16 else torch.uint8)
        k_rnorm = view("k_rnorm", f16)
        k_scale, k_zero = (key_scales[0], key_scales[1]) if lay.side_bytes else (view("k_scale", f16),
                                                                                  view("k_zero", f16))
        return cls(buffer=buffer, k_codes=k_codes, v_codes=v_codes, k_scale=k_scale, k_zero=k_zero,
                   v_scale=view("v_scale", f16), v_zero=view("v_zero", f16), k_qjl=view("k_qjl", torch.uint8),
                   k_rnorm=None if k_rnorm is None else k_rnorm[..., 0], layout=lay, raw_dtype=raw_dtype,
                   spec=spec)

    # ------------------------------------------------------------------------- shape and slicing
    @property
    def batch(self) -> int:
        return self.buffer.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.buffer.shape[1]

    @property
    def num_tokens(self) -> int:
        """Token slots ``T`` (capacity)."""
        return self.buffer.shape[2]

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def key_scales(self) -> torch.Tensor | None:
        """KIVI key scales and zeros stacked (``[2, B, Hkv, ceil(T/group_size), Dk]``), else ``None``."""
        if not self.layout.side_bytes:
            return None
        return torch.stack([self.k_scale, self.k_zero])

    def nbytes(self) -> int:
        """Bytes held by this cache's tensors (buffer plus KIVI key scales)."""
        n = self.buffer.numel()
        if self.layout.side_bytes:
            n += 2 * self.k_scale.numel() * 2
        return n

    def narrow_tokens(self, start: int, length: int) -> PackedKV:
        """Views of token slots ``[start, start + length)``; with ``key_axis="channel"``, ``start`` must be a
        multiple of ``group_size`` (token groups are not split)."""
        T = self.num_tokens
        start = check_int("PackedKV.narrow_tokens", "start", start, min=0, max=T, errors=BUILTIN)
        length = check_int("PackedKV.narrow_tokens", "length", length, min=0, max=T - start, errors=BUILTIN)
        g = self.spec.group_size
        if self.layout.side_bytes and start % g:
            raise ValueError(f"PackedKV.narrow_tokens: with key_axis='channel' start must be a multiple of "
                             f"group_size={g}, got {start}")
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, torch.Tensor):
                out[f.name] = t
            elif self.layout.side_bytes and f.name in ("k_scale", "k_zero"):
                out[f.name] = t.narrow(2, start // g, -(-(start + length) // g) - start // g)
            else:
                out[f.name] = t.narrow(2, start, length)
        return PackedKV(**out)

    def __repr__(self) -> str:
        B, H, T, C = self.buffer.shape
        return (f"PackedKV(B={B}, Hkv={H}, T={T}, record_bytes={C}, head_dim={self.layout.head_dim}, "
                f"key_dim={self.layout.key_dim}, fields={list(self.layout.fields)}, device={self.device})")
