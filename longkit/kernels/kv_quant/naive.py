"""Reference quantized KV cache: plain PyTorch, fp32 math. The CPU path and the tests' oracle.

Everything the Triton kernels do is written here once, readably: the rotation (a fast Walsh-Hadamard transform),
min/max group quantization, bit packing, the QJL residual sketch, and attention of a (rotated) query against the
packed cache. The kernels must give the same codes (bit-exact without rotation) and the same attention output up
to low-precision rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from .packed import RAW_DTYPES, PackedKV
from .spec import KVQuantSpec, gaussian_codebook
from .state import KVQuantState, select_key_channels  # noqa: F401 - re-exported: the reference's API

__all__ = [
    "hadamard_transform",
    "rotate",
    "unrotate",
    "quantize_groups",
    "quantize_codebook",
    "dequantize_codebook",
    "pack_codes",
    "unpack_codes",
    "prepare_query",
    "select_key_channels",
    "naive_quantize_kv",
    "naive_dequantize_kv",
    "naive_decode_attention",
    "naive_prefill_attention",
    "merge_attention_states",
]

FP16_MAX = 65504.0
QJL_COEF = math.sqrt(math.pi / 2)  # E[sign(<s, r>) <s, q>] = sqrt(2/pi) <r, q> / ||r|| for s ~ N(0, I)


# ----------------------------------------------------------------------------- rotation
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` for the Sylvester Hadamard matrix ``H`` (±1, symmetric) along the last dim (a power of two), by
    ``log2(n)`` butterfly steps: ``O(n log n)``. Unnormalised: ``hadamard_transform(hadamard_transform(x)) = n·x``."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_transform: the last dim must be a power of two, got {n}")
    lead = x.shape[:-1]
    y, h = x, 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def _head_signs(signs: torch.Tensor, heads: int) -> torch.Tensor:
    """``[Hkv, n]`` signs broadcast to ``[1, heads, 1, n]`` (query heads of a KV head share its signs)."""
    return signs.repeat_interleave(heads // signs.shape[0], dim=0)[None, :, None, :]


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``R x = H·diag(s)·x / sqrt(n)`` per head: ``x [B, H, T, n]``, ``signs [Hkv, n]`` (head ``h`` uses row
    ``h // (H / Hkv)``). Orthogonal: inner products and norms are preserved."""
    n = x.shape[-1]
    return hadamard_transform(x * _head_signs(signs, x.shape[1])) / math.sqrt(n)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate`: ``Rᵀ y = diag(s)·H·y / sqrt(n)``."""
    n = y.shape[-1]
    return hadamard_transform(y) / math.sqrt(n) * _head_signs(signs, y.shape[1])


# ----------------------------------------------------------------------------- scalar quantization
def quantize_groups(x: torch.Tensor, bits: int, group: int, dim: int = -1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of fp32 ``x`` in groups of ``group`` consecutive elements along ``dim``.

    ``zero = fp16(min)``, ``scale = fp16((max - zero) / L)`` with ``L = 2**bits - 1``,
    ``code = clamp(floor((x - zero) / scale + 1/2), 0, L)`` (0 where ``scale == 0``), so ``code·scale + zero`` is
    within ``scale/2`` of ``x`` up to the fp16 rounding of ``zero`` and ``scale``.

    Returns:
        ``(codes, scale, zero)``: int64 codes shaped like ``x``; fp16 scale and zero with ``dim`` shrunk by
        ``group``.
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    levels = float(2 ** bits - 1)
    xg = x.float().unflatten(dim, (n // group, group))  # group axis at dim + 1
    lo = xg.amin(dim + 1).clamp(-FP16_MAX, FP16_MAX).half()
    hi = xg.amax(dim + 1)
    scale = ((hi - lo.float()) / levels).clamp(0, FP16_MAX).half()
    s32, z32 = scale.float().unsqueeze(dim + 1), lo.float().unsqueeze(dim + 1)
    y = torch.where(s32 > 0, (xg - z32) / torch.where(s32 > 0, s32, 1.0), 0.0)
    codes = torch.floor(y + 0.5).clamp(0, levels).to(torch.int64)
    return codes.flatten(dim, dim + 1), scale, lo


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                      dim: int = -1) -> torch.Tensor:
    """``code·scale + zero`` in fp32 (scale and zero repeated over their ``group`` elements along ``dim``)."""
    dim = dim % codes.dim()
    s = scale.float().repeat_interleave(group, dim=dim)
    z = zero.float().repeat_interleave(group, dim=dim)
    return codes.float() * s + z


@functools.cache
def codebook_tensors(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids [2**bits], boundaries [2**bits - 1])`` of :func:`gaussian_codebook` as fp32 tensors on ``device``,
    built once per (bits, device): the reference, the kernels' launcher and the vLLM dequantizer share them."""
    cents, bounds = gaussian_codebook(bits)
    return (torch.tensor(cents, dtype=torch.float32, device=device),
            torch.tensor(bounds, dtype=torch.float32, device=device))


def quantize_codebook(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-codebook quantization of fp32 ``x`` in groups of ``group`` consecutive elements of the last dim.

    ``scale = fp16(sqrt(mean(x²)))`` per group, ``code = #{i : x / scale > boundaries[i]}`` (the nearest centroid
    of :func:`~longkit.kernels.kv_quant.spec.gaussian_codebook`; 0 where ``scale == 0``).

    Returns:
        ``(codes, scale)``: int64 codes shaped like ``x``; fp16 scale with the last dim shrunk by ``group``.
    """
    n = x.shape[-1]
    xg = x.float().unflatten(-1, (n // group, group))
    scale = (xg.square().sum(-1) / group).sqrt().clamp(max=FP16_MAX).half()
    s32 = scale.float().unsqueeze(-1)
    y = torch.where(s32 > 0, xg / torch.where(s32 > 0, s32, 1.0), 0.0)
    bounds = codebook_tensors(bits, x.device)[1]
    codes = (y.unsqueeze(-1) > bounds).sum(-1)
    return codes.flatten(-2), scale


def dequantize_codebook(codes: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``centroid[code]·scale`` in fp32 (scale repeated over its ``group`` elements of the last dim)."""
    lut = codebook_tensors(bits, codes.device)[0]
    return lut[codes] * scale.float().repeat_interleave(group, dim=-1)


def _quantize(x: torch.Tensor, spec: KVQuantSpec, bits: int, dim: int = -1
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(codes, {"scale", "zero"?}, dequantized)`` of ``x`` with the spec's quantizer (``dim``: min/max only)."""
    if spec.codebook:
        codes, scale = quantize_codebook(x, bits, spec.group_size)
        return codes, {"scale": scale}, dequantize_codebook(codes, scale, bits, spec.group_size)
    codes, scale, zero = quantize_groups(x, bits, spec.group_size, dim=dim)
    return codes, {"scale": scale, "zero": zero}, dequantize_groups(codes, scale, zero, spec.group_size, dim=dim)


# ----------------------------------------------------------------------------- bit packing
def _segments(bits: int) -> int:
    """Values per packed word: 8 for 1 and 3 bits (1- and 3-byte words), 8 / bits for 2 and 4 bits (1 byte)."""
    return 8 if bits in (1, 3) else 8 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [..., n]`` (ints in ``[0, 2**bits)``) into ``uint8 [..., n·bits/8]`` (layout in ``spec.py``):
    word ``p`` holds value ``p + s·n/S`` at bits ``[bits·s, bits·s + bits)``; 3-bit words are stored as three byte
    planes."""
    n, S = codes.shape[-1], _segments(bits)
    segs = codes.to(torch.int64).unflatten(-1, (S, n // S))  # [..., S, n/S]
    shifts = (torch.arange(S, device=codes.device) * bits).view(S, 1)
    word = (segs << shifts).sum(-2)  # [..., n/S], < 2**(bits·S)
    planes = [(word >> (8 * i)) & 0xFF for i in range(bits * S // 8)]
    return torch.cat(planes, dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 [..., n·bits/8]`` -> int64 ``[..., n]``."""
    S = _segments(bits)
    planes = packed.to(torch.int64).unflatten(-1, (bits * S // 8, n // S))  # [..., planes, n/S]
    word = sum(planes[..., i, :] << (8 * i) for i in range(planes.shape[-2]))
    shifts = (torch.arange(S, device=packed.device) * bits).view(S, 1)
    segs = (word.unsqueeze(-2) >> shifts) & (2 ** bits - 1)  # [..., S, n/S]
    return segs.flatten(-2)


# ----------------------------------------------------------------------------- queries and kept channels
def _gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` -> ``[B, H, T, Dk]`` keeping ``channels [Hkv, Dk]`` (head ``h`` uses row ``h // group``)."""
    idx = channels.repeat_interleave(x.shape[1] // channels.shape[0], dim=0)  # [H, Dk]
    return x.gather(-1, idx[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))


def prepare_query(q: torch.Tensor, spec: KVQuantSpec, state: KVQuantState,
                  rotate_keys: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query as the packed keys see it, in fp32: kept channels, then rotation; plus its QJL projection.

    ``rotate_keys``: another form of the same rotation (the launcher's matmul for a decode step's few rows);
    default :func:`rotate` with the state's key signs.

    Returns:
        ``(q_rot [B, Hq, Tq, Dk], q_sketch [B, Hq, Tq, m] or None)`` with ``q_sketch = q_rot @ Sᵀ``.
    """
    x = q.float()
    if state.prunes:
        x = _gather_channels(x, _kept(state))
    if spec.rotate:
        x = rotate_keys(x) if rotate_keys is not None else rotate(x, state.key_signs)
    sketch = x @ state.qjl_matrix.t() if spec.qjl else None
    return x, sketch


def _kept(state: KVQuantState) -> torch.Tensor:
    if state.key_channels is None:
        raise RuntimeError(f"KVQuantSpec.keep_channels={state.spec.keep_channels} stores {state.key_dim} of "
                           f"{state.head_dim} key channels, but the state has no kept channels yet: call "
                           "state.calibrate(q, k) on the prompt's queries and keys (or KVQuantState.create(..., "
                           "key_channels=...)) before the first write")
    return state.key_channels


# ----------------------------------------------------------------------------- quantize-on-write
def _encode_keys(k: torch.Tensor, spec: KVQuantSpec, state: KVQuantState, raw_dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """Fields of the key part of ``k [B, Hkv, T, D]`` (the tokens to write), shaped ``[B, Hkv, T, ...]``."""
    x = k.float()
    if state.prunes:
        x = _gather_channels(x, _kept(state))
    if spec.rotate:
        x = rotate(x, state.key_signs)
    if spec.key_bits == 16:
        return {"k_codes": x.to(raw_dtype)}
    dim = -1 if spec.key_axis == "token" else -2
    codes, side, deq = _quantize(x, spec, spec.key_bits, dim=dim)
    out = {"k_codes": pack_codes(codes, spec.key_bits), **{f"k_{n}": t for n, t in side.items()}}
    if spec.qjl:
        r = x - deq
        out["k_rnorm"] = r.norm(dim=-1).clamp(max=FP16_MAX).half()
        out["k_qjl"] = pack_codes((r @ state.qjl_matrix.t() >= 0).to(torch.int64), 1)
    return out


def _encode_values(v: torch.Tensor, spec: KVQuantSpec, state: KVQuantState, raw_dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    x = v.float()
    if spec.rotate:
        x = rotate(x, state.value_signs)
    if spec.value_bits == 16:
        return {"v_codes": x.to(raw_dtype)}
    codes, side, _ = _quantize(x, spec, spec.value_bits)
    return {"v_codes": pack_codes(codes, spec.value_bits), **{f"v_{n}": t for n, t in side.items()}}


def default_raw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Raw 16-bit storage for inputs of ``dtype``: bf16/fp16 keep theirs, fp32 is stored as fp16."""
    return dtype if dtype in RAW_DTYPES else torch.float16


def naive_quantize_kv(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec, state: KVQuantState, *,
                      out: PackedKV | None = None, start: int | torch.Tensor = 0) -> PackedKV:
    """Quantize ``k, v [B, Hkv, T, D]`` and write them to token slots ``[start, start + T)`` of ``out`` (a new
    cache of ``T`` slots if ``None``); ``start`` an int or an int tensor ``[B]`` (one position per row).
    Inputs are assumed valid (``interface.quantize_kv`` checks them)."""
    B, H, T, D = k.shape
    if out is None:
        out = PackedKV.allocate(spec, B, H, T, D, device=k.device, raw_dtype=default_raw_dtype(k.dtype))
    if T == 0:
        return out
    fields = {**_encode_keys(k, spec, state, out.raw_dtype), **_encode_values(v, spec, state, out.raw_dtype)}
    if isinstance(start, torch.Tensor):  # per-row slots: one scatter per field, no host read (token axis only)
        slots = start.to(device=k.device, dtype=torch.long)[:, None] + torch.arange(T, device=k.device)[None]
        for name, val in fields.items():
            dst = getattr(out, name)
            idx = slots.view(B, 1, T, *([1] * (val.dim() - 3))).expand(val.shape)
            dst.scatter_(2, idx, val.to(dst.dtype))
        return out
    g = spec.group_size
    for b, s in enumerate([start] * B):
        for name, val in fields.items():
            dst = getattr(out, name)
            if name in ("k_scale", "k_zero") and spec.key_axis == "channel":
                dst[b, :, s // g:(s + T) // g] = val[b]
            else:
                dst[b, :, s:s + T] = val[b]
    return out


# ----------------------------------------------------------------------------- reading the cache
def _decode_stored(packed: PackedKV, spec: KVQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, Hkv, T, Dk]`` and values ``[B, Hkv, T, D]`` as stored (rotated, kept channels), fp32."""
    lay, g = packed.layout, spec.group_size
    if spec.key_bits == 16:
        k = packed.k_codes.float()
    else:
        codes = unpack_codes(packed.k_codes, spec.key_bits, lay.key_dim)
        if spec.codebook:
            k = dequantize_codebook(codes, packed.k_scale, spec.key_bits, g)
        elif spec.key_axis == "token":
            k = dequantize_groups(codes, packed.k_scale, packed.k_zero, g)
        else:
            T = codes.shape[2]
            k = dequantize_groups(codes, packed.k_scale, packed.k_zero, g, dim=-2)[:, :, :T] \
                if T % g == 0 else _dequant_channel_ragged(codes, packed.k_scale, packed.k_zero, g)
    if spec.value_bits == 16:
        v = packed.v_codes.float()
    elif spec.codebook:
        v = dequantize_codebook(unpack_codes(packed.v_codes, spec.value_bits, lay.head_dim), packed.v_scale,
                                spec.value_bits, g)
    else:
        v = dequantize_groups(unpack_codes(packed.v_codes, spec.value_bits, lay.head_dim), packed.v_scale,
                              packed.v_zero, g)
    return k, v


def _dequant_channel_ragged(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> torch.Tensor:
    """KIVI keys when ``T`` is not a multiple of the token group (a partially read last group)."""
    T = codes.shape[2]
    s = scale.float().repeat_interleave(g, dim=2)[:, :, :T]
    z = zero.float().repeat_interleave(g, dim=2)[:, :, :T]
    return codes.float() * s + z


def naive_dequantize_kv(packed: PackedKV, spec: KVQuantSpec, state: KVQuantState, *, rotated: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's keys and values in fp32.

    Args:
        rotated: return them as stored (keys ``[B, Hkv, T, Dk]`` rotated, kept channels only; values rotated)
            instead of in the input space (``[B, Hkv, T, D]``, pruned key channels zero).
    """
    k, v = _decode_stored(packed, spec)
    if rotated:
        return k, v
    if spec.rotate:
        k, v = unrotate(k, state.key_signs), unrotate(v, state.value_signs)
    if state.prunes:
        full = k.new_zeros(*k.shape[:-1], state.head_dim)
        idx = _kept(state)[None, :, None, :].expand(k.shape[0], -1, k.shape[2], -1)
        k = full.scatter(-1, idx, k)
    return k, v


def _visible(lengths: torch.Tensor, Tq: int, T: int, causal: bool) -> torch.Tensor:
    """``[B, 1, Tq, T]`` bool: key ``j`` visible to query ``i`` of row ``b``: ``j < lengths[b]`` and, if causal,
    ``j <= lengths[b] - Tq + i`` (the queries are the last ``Tq`` cached tokens)."""
    j = torch.arange(T, device=lengths.device)
    L = lengths.view(-1, 1, 1, 1)
    vis = j.view(1, 1, 1, T) < L
    if causal:
        i = torch.arange(Tq, device=lengths.device).view(1, 1, Tq, 1)
        vis = vis & (j.view(1, 1, 1, T) <= L - Tq + i)
    return vis


def qjl_scores(q_sketch: torch.Tensor, packed: PackedKV, spec: KVQuantSpec) -> torch.Tensor:
    """The QJL estimate of ``<q_rot, r>`` for every (query, key): ``sqrt(pi/2)/m · ||r|| · <S q, sign(S r)>``,
    ``[B, Hq, Tq, T]`` fp32."""
    m = q_sketch.shape[-1]
    group = q_sketch.shape[1] // packed.num_kv_heads
    signs = unpack_codes(packed.k_qjl, 1, m).float() * 2 - 1  # [B, Hkv, T, m]
    signs = signs.repeat_interleave(group, dim=1)
    rnorm = packed.k_rnorm.float().repeat_interleave(group, dim=1)  # [B, Hq, T]
    return QJL_COEF / m * rnorm[:, :, None, :] * (q_sketch @ signs.transpose(-1, -2))


def naive_decode_attention(q: torch.Tensor, packed: PackedKV, spec: KVQuantSpec, state: KVQuantState,
                           scale: float, lengths: torch.Tensor | None = None, *, causal: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Hq, Tq, D]`` over the packed cache, in fp32 (inputs assumed valid).

    Scores are ``scale · (<q_rot, dequant(k)> + qjl estimate)``; keys ``j >= lengths[b]`` are not visible and,
    with ``causal``, query ``i`` sees ``j <= lengths[b] - Tq + i``.

    Returns:
        ``(out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq] fp32)``; rows with no visible key give 0 and ``-inf``.
    """
    B, Hq, Tq, D = q.shape
    T = packed.num_tokens
    group = Hq // packed.num_kv_heads
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=q.device)
    q_rot, q_sk = prepare_query(q, spec, state)
    k, v = _decode_stored(packed, spec)
    scores = q_rot @ k.repeat_interleave(group, dim=1).transpose(-1, -2)  # [B, Hq, Tq, T]
    if spec.qjl:
        scores = scores + qjl_scores(q_sk, packed, spec)
    scores = (scores * scale).masked_fill(~_visible(lengths.to(q.device), Tq, T, causal), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = probs @ v.repeat_interleave(group, dim=1)
    if spec.rotate:
        out = unrotate(out, state.value_signs)
    return out.to(q.dtype), lse


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the two partial results (``out [..., D]``,
    natural-log ``lse [...]``; ``-inf`` = no key). Computed in fp32; ``out`` in ``out_a.dtype``."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    wa = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    wb = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse


def naive_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedKV | None,
                            spec: KVQuantSpec, state: KVQuantState, scale: float,
                            lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill of a chunk: ``q, k, v`` (``[B, Hq|Hkv, Tc, D]``) attend causally to themselves in full precision
    and to the ``lengths`` tokens already in ``packed`` (quantized); fp32 math. Returns ``(out, lse)``."""
    B, Hq, Tc, D = q.shape
    group = Hq // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    causal = torch.ones(Tc, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - Tc)
    s = s.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]) @ v.float().repeat_interleave(group, 1)
    if packed is None:
        return out.to(q.dtype), lse
    past, past_lse = naive_decode_attention(q.float(), packed, spec, state, scale, lengths, causal=False)
    out, lse = merge_attention_states(out, lse, past, past_lse)
    return out.to(q.dtype), lse
