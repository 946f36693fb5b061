"""Quantized KV cache: the Triton kernels (Triton's CPU interpreter here, ``TRITON_INTERPRET=1`` from conftest) vs
the PyTorch reference on fresh random inputs at small shapes: quantize-on-write (bit-identical codes without
rotation), fused split-K decode attention (GQA, lengths with padding, causal, several splits, every field kind),
prefill, per-row appends, and what the kernel does not support."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_kv_quant_helpers import assert_decode_close, assert_packed_match, lowprec_decode

from longkit.kernels.kv_quant import (
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    naive_decode_attention,
    quantize_kv,
    quantized_decode_attention,
    quantized_prefill_attention,
)
from longkit.kernels.kv_quant.naive import naive_prefill_attention

pytestmark = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None),
    reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter tier)")

B, HKV, D = 2, 2, 64
SPECS = {
    "k4v4-norot": KVQuantSpec(rotate=False),
    "k3v2-norot": KVQuantSpec(key_bits=3, value_bits=2, rotate=False),
    "k3v3": KVQuantSpec(key_bits=3, value_bits=3),
    "k2v4-qjl": KVQuantSpec(key_bits=2, value_bits=4, qjl=True),
    "k3v3-qjl32-g16": KVQuantSpec(key_bits=3, value_bits=3, qjl=True, qjl_dim=32, group_size=16),
    "k4v3-keep50-qjl": KVQuantSpec(key_bits=4, value_bits=3, keep_channels=0.5, qjl=True),
    "k3v4-keep75-norot": KVQuantSpec(key_bits=3, value_bits=4, keep_channels=0.75, rotate=False, group_size=16),
    "kivi2": KVQuantSpec.kivi(bits=2, group_size=16),
    "k16v3": KVQuantSpec(key_bits=16, value_bits=3),
    "identity": KVQuantSpec.identity(),
    "k3v3-cb": KVQuantSpec(key_bits=3, value_bits=3, group_size=64, codebook=True),
    "k2v4-cb-g16-qjl": KVQuantSpec(key_bits=2, value_bits=4, group_size=16, codebook=True, qjl=True),
    "k4v16-cb-norot": KVQuantSpec(key_bits=4, value_bits=16, codebook=True, rotate=False),
}


def make(spec: KVQuantSpec, T: int, dtype: torch.dtype, hq: int = 4, cap: int | None = None
         ) -> tuple[KVQuantState, torch.Tensor, torch.Tensor]:
    k = torch.randn(B, HKV, T, D).to(dtype)
    k[..., 3] *= 6  # an outlier channel
    v = torch.randn(B, HKV, T, D).to(dtype)
    state = KVQuantState.create(spec, D, HKV, layer_idx=2)
    if state.prunes:
        state.calibrate(torch.randn(B, hq, 4, D), k)
    return state, k, v


def write_both(spec: KVQuantSpec, state: KVQuantState, k: torch.Tensor, v: torch.Tensor, cap: int,
               start: int | torch.Tensor = 0) -> tuple[PackedKV, PackedKV]:
    raw = k.dtype if k.dtype != torch.float32 else torch.float16
    ref = PackedKV.allocate(spec, B, HKV, cap, D, raw_dtype=raw)
    tri = PackedKV.allocate(spec, B, HKV, cap, D, raw_dtype=raw)
    quantize_kv(k, v, spec, state, out=ref, start=start, impl="naive")
    assert quantize_kv(k, v, spec, state, out=tri, start=start, impl="triton") is tri
    return ref, tri


# ----------------------------------------------------------------------------- quantize-on-write
@pytest.mark.parametrize("name", list(SPECS))
def test_quantize_matches_reference(name: str) -> None:
    spec = SPECS[name]
    T = 32 if spec.key_axis == "channel" else 21
    dtype = torch.bfloat16 if spec.key_bits == 16 or spec.value_bits == 16 else torch.float32
    state, k, v = make(spec, T, dtype)
    ref, tri = write_both(spec, state, k, v, cap=T + 16, start=16 if spec.key_axis == "channel" else 5)
    # the codebook's group RMS is a sum whose order differs from the reference's: not bit-exact
    assert_packed_match(ref, tri, spec, state, exact=not (spec.rotate or spec.codebook))


def test_quantize_per_row_start_and_capacity() -> None:
    """Per-row start positions; writes past the capacity are dropped by the kernel (documented)."""
    spec = SPECS["k2v4-qjl"]
    state, k, v = make(spec, 3, torch.float32)
    ref, tri = write_both(spec, state, k, v, cap=12, start=torch.tensor([0, 9]))
    assert_packed_match(ref, tri, spec, state, exact=False)
    before = tri.buffer.clone()
    quantize_kv(k, v, spec, state, out=tri, start=torch.tensor([10, 11]), impl="triton")
    assert torch.equal(tri.buffer[:, :, :10], before[:, :, :10])  # only slots 10, 11 (row 0) and 11 (row 1)
    # the kernel's own records of row 0's first two tokens (the kernel and the reference may round a value on a
    # rounding boundary differently: assert_packed_match above holds them to that)
    assert torch.equal(tri.buffer[0, :, 10:12], quantize_kv(k, v, spec, state, impl="triton").buffer[0, :, :2])


def test_quantize_unsupported_by_the_kernel_raises() -> None:
    spec = KVQuantSpec.kivi(bits=2, group_size=8)
    state, k, v = make(spec, 8, torch.float32)
    with pytest.raises(NotImplementedError, match="impl='naive'"):
        quantize_kv(k, v, spec, state, impl="triton")
    spec = KVQuantSpec(group_size=2, rotate=False)
    state, k, v = make(spec, 4, torch.float32)
    with pytest.raises(NotImplementedError, match="scale groups"):
        quantize_kv(k, v, spec, state, impl="triton")


# ----------------------------------------------------------------------------- decode
CASES = [  # (spec, dtype, T, hq, Tq, lengths, causal, num_splits)
    ("k4v4-norot", torch.float32, 40, 4, 1, None, True, None),
    ("k3v2-norot", torch.bfloat16, 96, 4, 2, [96, 33], True, 3),
    ("k3v3", torch.float16, 70, 6, 1, [70, 1], True, 2),
    ("k2v4-qjl", torch.float32, 50, 4, 3, [50, 20], False, None),
    ("k2v4-qjl", torch.bfloat16, 80, 2, 1, [64, 80], True, 2),
    ("k3v3-qjl32-g16", torch.float16, 33, 4, 2, [33, 0], True, None),
    ("k4v3-keep50-qjl", torch.bfloat16, 64, 4, 1, [17, 64], True, 4),
    ("k3v4-keep75-norot", torch.float32, 45, 6, 1, [45, 44], True, None),
    ("kivi2", torch.float32, 64, 4, 1, [64, 50], False, 2),
    ("k16v3", torch.bfloat16, 30, 4, 2, [30, 29], True, None),
    ("identity", torch.bfloat16, 66, 4, 1, [66, 5], True, 3),
    ("k3v3-cb", torch.bfloat16, 70, 4, 1, [70, 9], True, 2),
    ("k2v4-cb-g16-qjl", torch.float32, 50, 4, 2, [50, 31], True, None),
    ("k4v16-cb-norot", torch.float16, 40, 2, 1, None, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{str(c[1])[6:]}-T{c[2]}-Hq{c[3]}-Tq{c[4]}-s{c[7]}"
                                             for c in CASES])
def test_decode_matches_reference(case: tuple) -> None:
    name, dtype, T, hq, Tq, lengths, causal, splits = case
    spec = SPECS[name]
    state, k, v = make(spec, T, dtype, hq)
    packed = quantize_kv(k, v, spec, state, impl="naive")
    q = torch.randn(B, hq, Tq, D).to(dtype)
    lens = None if lengths is None else torch.tensor(lengths)
    scale = D ** -0.5
    out, lse = quantized_decode_attention(q, packed, spec, state, lengths=lens, causal=causal, return_lse=True,
                                          num_splits=splits, impl="triton")
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    ref, ref_lse = naive_decode_attention(q.float(), packed, spec, state, scale, lens, causal=causal)
    low = lowprec_decode(q, packed, spec, state, scale, lens, causal)
    assert_decode_close(name, ref, ref_lse, out, lse, low)


def test_decode_tolerance_catches_a_wrong_result() -> None:
    """The decode check fails when the kernel drops one token (lengths off by one), so it can fail."""
    spec = SPECS["k4v4-norot"]
    state, k, v = make(spec, 24, torch.bfloat16)
    v[:, :, -1] += 4  # the dropped token's value stands out
    packed = quantize_kv(k, v, spec, state, impl="naive")
    q = torch.randn(B, 4, 1, D).bfloat16()
    lens = torch.tensor([24, 24])
    out, lse = quantized_decode_attention(q, packed, spec, state, lengths=lens - 1, return_lse=True, impl="triton")
    ref, ref_lse = naive_decode_attention(q.float(), packed, spec, state, D ** -0.5, lens)
    with pytest.raises(AssertionError):
        assert_decode_close("wrong", ref, ref_lse, out, lse, lowprec_decode(q, packed, spec, state, D ** -0.5, lens))


def test_prefill_matches_reference() -> None:
    spec = SPECS["k2v4-qjl"]
    state, k, v = make(spec, 40, torch.float32)
    packed = quantize_kv(k, v, spec, state, impl="naive")
    Tc = 17
    q, kc, vc = torch.randn(B, 4, Tc, D), torch.randn(B, HKV, Tc, D), torch.randn(B, HKV, Tc, D)
    lens = torch.tensor([40, 9])
    out, lse = quantized_prefill_attention(q, kc, vc, packed, spec, state, lengths=lens, return_lse=True,
                                           impl="triton")
    ref, ref_lse = naive_prefill_attention(q, kc, vc, packed, spec, state, D ** -0.5, lens)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
