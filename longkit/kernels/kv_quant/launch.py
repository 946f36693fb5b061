"""Host side of the quantized KV kernels: tile parameters, query preparation, split plan, launches.

Inputs are checked by ``interface.py``. The query is projected to the kept key channels, rotated and (with QJL)
sketched in PyTorch (fp32; for a decode step's few rows the rotation is one fp64 matmul, not ``log2(D)`` butterfly
steps), then permuted into the kernels' tile order and cast to the compute dtype (the query's; fp32 stays fp32 with
IEEE dots). Splits: each (row, KV head) is cut into ``num_splits`` ranges of whole ``BLOCK_N`` tiles, enough to give
every SM ``PROGRAMS_PER_SM`` programs, but no split shorter than ``MIN_SPLIT`` tokens.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from longkit.kernels import envs

from ..masked_attn._interpreter import fix_interpreter_index
from . import naive
from .decode import _combine_kernel, _decode_split_kernel
from .packed import PackedKV
from .quant import _quantize_kernel
from .spec import KVQuantSpec
from .state import KVQuantState

__all__ = ["tile_params", "tile_order", "launch_quantize", "launch_decode", "plan_splits"]

if envs.triton_interpreting():
    fix_interpreter_index()  # the token loop has run-time bounds under the interpreter's numpy

LOG2E = 1.4426950408889634
PROGRAMS_PER_SM = 4
MIN_SPLIT = 256
BLOCK_T = 16
MAX_GROUPS = 16  # scale groups per token unrolled in the quantize kernel


def tile_params(n: int, bits: int) -> dict[str, int]:
    """``S`` (segments), ``NS`` (words), ``NS_PAD``, ``NPLANES`` (bytes per word) and ``W`` (tile width) of a row
    of ``n`` values of ``bits`` bits (16 = raw; 1 = sign bits)."""
    if bits == 16:
        S, planes = 1, 0
    else:
        S = 8 if bits in (1, 3) else 8 // bits
        planes = bits * S // 8
    ns = n // S
    ns_pad = triton.next_power_of_2(ns)
    return {"S": S, "NS": ns, "NS_PAD": ns_pad, "NPLANES": planes, "W": S * ns_pad}


@functools.cache
def _tile_index(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(index, padding mask)`` of the tile order on ``device`` (``None, None`` when it is the identity)."""
    p = tile_params(n, bits)
    idx = [s * p["NS"] + i if i < p["NS"] else -1 for s in range(p["S"]) for i in range(p["NS_PAD"])]
    if idx == list(range(n)):
        return None, None
    t = torch.tensor(idx, device=device)
    return t.clamp(min=0), (t < 0 if -1 in idx else None)


def tile_order(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x [..., n]`` with its last dim permuted into the tile order of ``bits``-bit rows (zeros in padding).
    Index tensors are built once per (n, bits, device): no host-device copy or sync per call."""
    idx, pad = _tile_index(x.shape[-1], bits, x.device)
    if idx is None:
        return x
    out = x.index_select(-1, idx)
    return out if pad is None else out.masked_fill(pad, 0)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small grid
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tables(spec: KVQuantSpec, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook tables of ``bits`` when the spec uses them, else 1-element placeholders."""
    if spec.codebook and bits != 16:
        return naive.codebook_tensors(bits, device)
    dummy = _placeholder(device)
    return dummy, dummy


@functools.cache
def _placeholder(device: torch.device) -> torch.Tensor:
    """One fp32 element per device: a pointer argument the kernel never reads (no allocation per call)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"quantize_kv (Triton): {what} is not supported by the kernel; use impl='naive' "
                               "(the PyTorch reference) for it")


# ----------------------------------------------------------------------------- quantize
def _encode(x: torch.Tensor, which: str, spec: KVQuantSpec, state: KVQuantState, out: PackedKV,
            start: int | torch.Tensor) -> None:
    B, H, T, D = x.shape
    key = which == "key"
    bits = spec.key_bits if key else spec.value_bits
    n = state.key_dim if key else D
    prune = key and state.prunes
    rotate = spec.rotate
    qjl = key and spec.qjl
    channel_axis = key and spec.key_axis == "channel" and bits != 16
    raw = bits == 16
    tp = tile_params(n, bits)
    g = spec.group_size
    if not raw and not channel_axis and n // g > MAX_GROUPS:
        raise _unsupported(f"more than {MAX_GROUPS} scale groups per token ({n} channels / group_size {g})")
    block_t = BLOCK_T
    if channel_axis:
        if g & (g - 1) or not 16 <= g <= 128:
            raise _unsupported(f"key_axis='channel' with group_size={g} (the kernel needs a power of two in "
                               "[16, 128])")
        block_t = g
    codes = out.k_codes if key else out.v_codes
    scale = out.k_scale if key else out.v_scale
    zero = out.k_zero if key else out.v_zero
    dummy_f = torch.zeros(1, device=x.device, dtype=torch.float32)
    rot = state.rotation(which) if rotate else dummy_f
    ch = state.key_channels if prune else dummy_f
    sk = state.qjl_matrix.contiguous() if qjl else dummy_f
    m = state.qjl_matrix.shape[0] if qjl else 8
    if scale is None:
        scale = torch.zeros(1, 1, 1, 1, device=x.device, dtype=torch.float16)
    if zero is None:  # 16 bits or the codebook: no minima
        zero = scale
    lut, bnd = _tables(spec, bits, x.device)
    qb = out.k_qjl if qjl else codes
    rn = out.k_rnorm if qjl else torch.zeros(1, 1, 1, device=x.device, dtype=torch.float16)
    if isinstance(start, torch.Tensor):
        starts, s0, st = start.contiguous(), 0, True
    else:
        starts, s0, st = dummy_f, int(start), False
    grid = (triton.cdiv(T, block_t), B * H)
    _quantize_kernel[grid](
        x, *x.stride(), ch, rot, starts, s0,
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        scale, zero, scale.stride(0), scale.stride(1), scale.stride(2),
        sk, lut, bnd, qb, qb.stride(0), qb.stride(1), qb.stride(2), rn, rn.stride(0), rn.stride(1), rn.stride(2),
        H, T, out.num_tokens,
        N=n, BITS=bits if not raw else 16, S=tp["S"], NS=tp["NS"], NS_PAD=tp["NS_PAD"],
        NPLANES=tp["NPLANES"], GROUP=g, NG=n // g if not raw else 1, M=m,
        MS_PAD=max(16, triton.next_power_of_2(m // 8)),  # a tl.dot dimension
        CHANNEL_AXIS=channel_axis, PRUNE=prune, ROTATE=rotate, QJL=qjl, CODEBOOK=spec.codebook and not raw,
        RAW=raw, START_TENSOR=st, RNE_BF16=raw and out.raw_dtype == torch.bfloat16 and envs.triton_interpreting(),
        BLOCK_T=block_t, num_warps=8 if n > 64 else 4,  # the [n, n] rotation tile: registers
    )


def launch_quantize(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec, state: KVQuantState, out: PackedKV,
                    start: int | torch.Tensor) -> None:
    """Write ``k, v [B, Hkv, T, D]`` into ``out`` at ``start`` (checked by the caller)."""
    _encode(k, "key", spec, state, out, start)
    _encode(v, "value", spec, state, out, start)


# ----------------------------------------------------------------------------- decode
def plan_splits(B: int, Hkv: int, m_blocks: int, T: int, block_n: int, device: torch.device,
                num_splits: int | None = None) -> tuple[int, int]:
    """``(num_splits, split_len)``: ``split_len`` a multiple of ``block_n`` covering ``T`` in ``num_splits``."""
    if T == 0:
        return 1, block_n
    tiles = triton.cdiv(T, block_n)
    if num_splits is None:
        want = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), B * Hkv * m_blocks)
        num_splits = max(1, min(want, triton.cdiv(T, MIN_SPLIT)))
    num_splits = min(num_splits, tiles)
    split_tiles = triton.cdiv(tiles, num_splits)
    num_splits = triton.cdiv(tiles, split_tiles)  # no empty split at the end
    return num_splits, split_tiles * block_n


def _decode_config(G: int, Tq: int, D: int, fp32: bool) -> dict[str, int]:
    """Tiles of the split kernel. Head dim 128, 16-bit queries: 32 tokens and 4 warps, the fastest of 32:4, 64:8
    and 128:8 in every case of ``benchmarks/kv_decode.py`` on an H100 (4-bit and 3-bit codebook, batch 1 and 8,
    32k and 128k: 1.12-1.28x faster than 64:8). The others: chosen from ptxas register counts of an offline sm_90a
    compile (``benchmarks/kernel_regs.py``) so that they do not spill; not timed."""
    rows = G * Tq
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    if fp32:  # IEEE fp32 dots are FMA loops: small key tiles
        return {"BLOCK_M": block_m, "BLOCK_N": 16, "num_warps": 8 if D > 64 else 4}
    if D <= 64:
        return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4}
    if D <= 128:
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": 4}
    return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": 8}


def launch_decode(q: torch.Tensor, packed: PackedKV, spec: KVQuantSpec, state: KVQuantState, scale: float,
                  lengths: torch.Tensor | None, causal: bool, num_splits: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Hq, Tq, D]`` over ``packed`` (checked by the caller): ``(out in q.dtype, lse fp32)``."""
    B, Hq, Tq, D = q.shape
    Hkv, T = packed.num_kv_heads, packed.num_tokens
    G = Hq // Hkv
    dev = q.device
    if q.dtype == torch.float32:
        prec = 1
    else:
        prec = 2 if q.dtype == torch.bfloat16 and envs.triton_interpreting() else 0
    few = _few_rows(q)
    q_rot, q_sk = naive.prepare_query(q, spec, state, (lambda x: _rotate_rows(x, state, "key")) if few else None)
    qt = tile_order(q_rot, spec.key_bits).to(q.dtype).contiguous()
    qs = tile_order(q_sk, 1).to(q.dtype).contiguous() if spec.qjl else qt
    cfg = _decode_config(G, Tq, D, q.dtype == torch.float32)
    m_blocks = triton.cdiv(G * Tq, cfg["BLOCK_M"])
    splits, split_len = plan_splits(B, Hkv, m_blocks, T, cfg["BLOCK_N"], dev, num_splits)
    o_part = torch.empty(B, Hq, Tq, splits, D, device=dev, dtype=torch.float32)
    l_part = torch.empty(B, Hq, Tq, splits, device=dev, dtype=torch.float32)
    kp, vp = tile_params(state.key_dim, spec.key_bits), tile_params(D, spec.value_bits)
    f16z = torch.zeros(1, 1, 1, 1, device=dev, dtype=torch.float16)
    ks = packed.k_scale if packed.k_scale is not None else f16z
    vs = packed.v_scale if packed.v_scale is not None else f16z
    kz = packed.k_zero if packed.k_zero is not None else ks  # 16 bits or the codebook: never read
    vz = packed.v_zero if packed.v_zero is not None else vs
    klut, _ = _tables(spec, spec.key_bits, dev)
    vlut, _ = _tables(spec, spec.value_bits, dev)
    kq = packed.k_qjl if spec.qjl else packed.k_codes
    rn = packed.k_rnorm if spec.qjl else f16z[0]
    m = state.qjl_matrix.shape[0] if spec.qjl else 8
    lens = lengths if lengths is not None else l_part
    grid = (m_blocks, B * Hkv, splits)
    _decode_split_kernel[grid](
        qt, qt.stride(0), qt.stride(1), qt.stride(2),
        qs, qs.stride(0), qs.stride(1), qs.stride(2),
        packed.k_codes, *packed.k_codes.stride()[:3],
        ks, kz, klut, *ks.stride()[:3],
        kq, *kq.stride()[:3],
        rn, *rn.stride()[:3],
        packed.v_codes, *packed.v_codes.stride()[:3],
        vs, vz, vlut, *vs.stride()[:3],
        lens,
        o_part, *o_part.stride()[:4],
        l_part, *l_part.stride()[:3],
        Hkv, Tq, T, split_len, scale * LOG2E, naive.QJL_COEF / m,
        G=G,
        K_BITS=spec.key_bits, K_S=kp["S"], K_NS=kp["NS"], K_NS_PAD=kp["NS_PAD"], K_PLANES=kp["NPLANES"],
        K_GROUP=spec.group_size, K_CHANNEL_AXIS=spec.key_axis == "channel", K_RAW=spec.key_bits == 16,
        V_BITS=spec.value_bits, V_S=vp["S"], V_NS=vp["NS"], V_NS_PAD=vp["NS_PAD"], V_PLANES=vp["NPLANES"],
        V_GROUP=spec.group_size, V_RAW=spec.value_bits == 16,
        QJL=spec.qjl, M=m, MS_PAD=triton.next_power_of_2(m // 8), CODEBOOK=spec.codebook,
        CAUSAL=causal, HAS_LENS=lengths is not None, PREC=prec,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
        **({"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}),
    )
    out = torch.empty(B, Hq, Tq, D, device=dev, dtype=torch.float32)
    lse = torch.empty(B, Hq, Tq, device=dev, dtype=torch.float32)
    _combine_kernel[(B * Hq * Tq,)](
        o_part, *o_part.stride()[:4], l_part, *l_part.stride()[:3], out, *out.stride()[:3], lse, *lse.stride(),
        Hq, Tq, splits, D=D, D_PAD=triton.next_power_of_2(D), SPLITS_PAD=triton.next_power_of_2(splits),
    )
    if spec.rotate:
        out = _rotate_rows(out, state, "value", inverse=True) if few else naive.unrotate(out, state.value_signs)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- query / output rotation
MATRIX_ROWS = 1 << 16  # up to this many query rows, rotations are one small fp64 matmul (decode)


def _few_rows(x: torch.Tensor) -> bool:
    return x.numel() // x.shape[-1] <= MATRIX_ROWS


def _rotation(state: KVQuantState, which: str) -> torch.Tensor:
    """fp64 ``[Hkv, n, n]`` matrices ``R_h = diag(s_h)·H/sqrt(n)`` of the key or value signs (``x @ R_h`` =
    ``naive.rotate(x)``), built once per state and signs tensor."""
    signs = state.key_signs if which == "key" else state.value_signs
    cache = state.__dict__.setdefault("_rotation_matrices", {})
    tag = (which, signs.device, signs.data_ptr())
    if tag not in cache:
        n = signs.shape[-1]
        h = naive.hadamard_transform(torch.eye(n, dtype=torch.float64, device=signs.device))
        cache[tag] = signs.double()[:, :, None] * h / math.sqrt(n)
    return cache[tag]


def _rotate_rows(x: torch.Tensor, state: KVQuantState, which: str, inverse: bool = False) -> torch.Tensor:
    """``naive.rotate`` (``inverse``: ``naive.unrotate``) of ``x [B, H, T, n]`` as one batched fp64 matmul, fp32
    out. A decode step's few rows: one kernel instead of ``log2(n)`` butterfly steps of three each, and no TF32
    rounding whatever the matmul precision settings."""
    B, H, T, n = x.shape
    r = _rotation(state, which)
    if inverse:
        r = r.transpose(-1, -2)
    y = x.double().reshape(B, r.shape[0], (H // r.shape[0]) * T, n) @ r  # head h uses KV head h // (H / Hkv)
    return y.reshape(B, H, T, n).float()

