"""Quantized KV cache (``longkit.kernels.kv_quant``), the reference path: spec validation, exact byte counts, bit
packing, quantization error bounds, the rotation, the QJL estimator (statistical), channel pruning, identity
setting vs plain attention, appending, prefill, and bad input. The Triton kernels are compared with this reference
in ``test_kv_quant_triton.py`` (interpreter) and ``test_kv_quant_gpu.py`` (GPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longkit.errors import ConfigError
from longkit.kernels.kv_quant import (
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    bytes_per_token,
    dequantize_kv,
    hadamard_transform,
    merge_attention_states,
    pack_codes,
    quantize_kv,
    quantized_decode_attention,
    quantized_prefill_attention,
    record_layout,
    unpack_codes,
)
from longkit.kernels.kv_quant.naive import (
    dequantize_codebook,
    prepare_query,
    qjl_scores,
    quantize_codebook,
    quantize_groups,
    rotate,
    unrotate,
)
from longkit.kernels.kv_quant.spec import gaussian_codebook
from longkit.kernels.kv_quant.state import hadamard_matrix

ROOT = Path(__file__).resolve().parents[2]
B, HKV, HQ, D = 2, 2, 4, 64


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, causal: bool
                    ) -> torch.Tensor:
    """Dense fp64 softmax attention written from the decode docstring (the oracle for the identity setting)."""
    Bq, Hq, Tq, Dq = q.shape
    T, group = k.shape[2], Hq // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(Dq)
    out = torch.zeros(Bq, Hq, Tq, Dq, dtype=torch.float64)
    for b in range(Bq):
        for i in range(Tq):
            n = int(lengths[b]) - Tq + i + 1 if causal else int(lengths[b])
            n = min(n, T)
            if n > 0:
                p = torch.softmax(s[b, :, i, :n], dim=-1)
                out[b, :, i] = (p.unsqueeze(1) @ v[b].double().repeat_interleave(group, 0)[:, :n]).squeeze(1)
    return out


def make(spec: KVQuantSpec, T: int = 40, dtype: torch.dtype = torch.float32, head_dim: int = D
         ) -> tuple[KVQuantState, PackedKV, torch.Tensor, torch.Tensor]:
    k = torch.randn(B, HKV, T, head_dim).to(dtype)
    v = torch.randn(B, HKV, T, head_dim).to(dtype)
    state = KVQuantState.create(spec, head_dim, HKV)
    if state.prunes:
        state.calibrate(torch.randn(B, HQ, 8, head_dim), k)
    return state, quantize_kv(k, v, spec, state), k, v


# ----------------------------------------------------------------------------- spec and bytes
@pytest.mark.parametrize("kwargs, match", [
    ({"key_bits": 5}, "key_bits must be one of"),
    ({"value_bits": 8}, "value_bits must be one of"),
    ({"key_bits": True}, "key_bits"),
    ({"key_bits": "4"}, "key_bits"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": 32.0}, "group_size"),
    ({"key_axis": "row"}, "key_axis"),
    ({"rotate": 1}, "rotate must be a bool"),
    ({"qjl": "yes"}, "qjl must be a bool"),
    ({"qjl": True, "qjl_dim": 24}, "multiple of 16"),
    ({"qjl": True, "qjl_dim": 8}, "qjl_dim"),
    ({"qjl_dim": 64}, "qjl=False"),
    ({"keep_channels": 0.0}, "keep_channels"),
    ({"keep_channels": 1.5}, "keep_channels"),
    ({"keep_channels": float("nan")}, "keep_channels"),
    ({"seed": -1}, "seed"),
    ({"key_bits": 16, "qjl": True}, "no residual"),
    ({"key_bits": 16, "key_axis": "channel"}, "key_axis='channel'"),
    ({"codebook": 1}, "codebook must be a bool"),
    ({"codebook": True, "key_axis": "channel"}, "KIVI"),
    ({"codebook": True, "key_bits": 16, "value_bits": 16}, "quantize nothing"),
])
def test_spec_rejects_bad_fields(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KVQuantSpec(**kwargs)


@pytest.mark.parametrize("spec, head_dim, match", [
    (KVQuantSpec(group_size=48), 64, "must divide the head dim"),
    (KVQuantSpec(rotate=True, group_size=16), 80, "power-of-two head dim"),
    (KVQuantSpec(keep_channels=0.75, group_size=16), 64, "power-of-two stored key dim"),
    (KVQuantSpec(keep_channels=0.75, rotate=False), 64, "must divide the stored key dim 48"),
    (KVQuantSpec(), 72, "multiple of 16"),
    (KVQuantSpec(), 512, "multiple of 16 in"),
])
def test_spec_rejects_head_dim(spec: KVQuantSpec, head_dim: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KVQuantState.create(spec, head_dim, 2)
    with pytest.raises(ValueError, match=match):
        bytes_per_token(spec, head_dim, 2)


def test_spec_presets() -> None:
    kivi = KVQuantSpec.kivi(bits=2, group_size=32)
    assert (kivi.rotate, kivi.key_axis, kivi.key_bits, kivi.value_bits) == (False, "channel", 2, 2)
    ident = KVQuantSpec.identity()
    assert (ident.key_bits, ident.value_bits, ident.rotate, ident.qjl) == (16, 16, False, False)
    assert KVQuantSpec(keep_channels=0.5).key_dim(128) == 64
    assert KVQuantSpec(keep_channels=0.3).key_dim(128) == 32  # 38.4 -> nearest multiple of 16
    assert KVQuantSpec(keep_channels=0.01).key_dim(64) == 16  # at least 16
    assert KVQuantSpec(qjl=True).sketch_dim(128) == 128 and KVQuantSpec(qjl=True, qjl_dim=32).sketch_dim(128) == 32


def expected_bytes(spec: KVQuantSpec, D: int, H: int) -> float:
    """Bytes per token written from the spec's description, independently of ``record_layout``."""
    Dk = spec.key_dim(D)
    side = 2 if spec.codebook else 4  # fp16 scale (the codebook's RMS), plus an fp16 zero for min/max groups
    kb = Dk * 2 if spec.key_bits == 16 else Dk * spec.key_bits / 8 + side * Dk / spec.group_size
    vb = D * 2 if spec.value_bits == 16 else D * spec.value_bits / 8 + side * D / spec.group_size
    qb = spec.sketch_dim(D) / 8 + 2 if spec.qjl else 0
    return H * (kb + vb + qb)


SPECS = {
    "k4v4": KVQuantSpec(),
    "k3v3": KVQuantSpec(key_bits=3, value_bits=3),
    "k2v3-g16": KVQuantSpec(key_bits=2, value_bits=3, group_size=16),
    "k3v3-qjl": KVQuantSpec(key_bits=3, value_bits=3, qjl=True),
    "k2v2-qjl32-norot": KVQuantSpec(key_bits=2, value_bits=2, qjl=True, qjl_dim=32, rotate=False),
    "k4v2-keep50-qjl": KVQuantSpec(key_bits=4, value_bits=2, keep_channels=0.5, qjl=True),
    "k3v4-keep75-norot": KVQuantSpec(key_bits=3, value_bits=4, keep_channels=0.75, group_size=16, rotate=False),
    "kivi2": KVQuantSpec.kivi(bits=2),
    "kivi4-g16": KVQuantSpec.kivi(bits=4, group_size=16),
    "k16v3": KVQuantSpec(key_bits=16, value_bits=3),
    "identity": KVQuantSpec.identity(),
    "identity-keep50": KVQuantSpec(key_bits=16, value_bits=16, rotate=False, keep_channels=0.5),
    "k3v3-cb64": KVQuantSpec(key_bits=3, value_bits=3, group_size=64, codebook=True),
    "k2v16-cb-qjl": KVQuantSpec(key_bits=2, value_bits=16, codebook=True, qjl=True),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bytes_per_token_counts_the_stored_tensors(name: str, head_dim: int) -> None:
    spec = SPECS[name]
    T, H = 64, 3
    assert bytes_per_token(spec, head_dim, H) == expected_bytes(spec, head_dim, H)
    packed = PackedKV.allocate(spec, 2, H, T, head_dim)
    assert packed.nbytes() == 2 * T * bytes_per_token(spec, head_dim, H)
    lay = record_layout(spec, head_dim)
    assert sum(n for _, n in lay.fields.values()) == lay.record_bytes  # no padding, no overlap
    offsets = sorted(lay.fields.values())
    assert all(a + n == b for (a, n), (b, _) in zip(offsets, offsets[1:]))


def test_bytes_per_token_table_values() -> None:
    """Spot values (SmolLM2: 3 KV heads of dim 64; Llama-3-8B: 8 of dim 128), also quoted in the docs."""
    assert bytes_per_token(KVQuantSpec(key_bits=3, value_bits=3, group_size=64), 64, 3) == 168
    assert bytes_per_token(KVQuantSpec(key_bits=3, value_bits=3), 64, 3) == 192
    assert bytes_per_token(KVQuantSpec(key_bits=3, value_bits=3, qjl=True), 64, 3) == 222
    assert bytes_per_token(KVQuantSpec(key_bits=4, value_bits=4), 128, 8) == 1280
    assert bytes_per_token(KVQuantSpec.identity(), 128, 8) == 4 * 128 * 8  # a bf16 cache
    # the codebook, one group per head of 128: 3·128/8 + 2 bytes per key and per value -> 5.12x less than bf16
    cb3 = KVQuantSpec(key_bits=3, value_bits=3, group_size=128, codebook=True)
    assert bytes_per_token(cb3, 128, 8) == 800 and 4 * 128 * 8 / 800 == 5.12


def test_channel_pruning_stores_fewer_bytes() -> None:
    full = bytes_per_token(KVQuantSpec(key_bits=4, value_bits=4, qjl=True), 128, 8)
    half = bytes_per_token(KVQuantSpec(key_bits=4, value_bits=4, qjl=True, keep_channels=0.5), 128, 8)
    # keys: 64 of 128 channels (codes, scales) and a 64-projection sketch
    assert full - half == 8 * (64 * 4 / 8 + 4 * 64 / 32 + 64 / 8)
    spec = KVQuantSpec(key_bits=4, value_bits=4, qjl=True, keep_channels=0.5)
    state, packed, _, _ = make(spec, head_dim=128)
    assert packed.k_codes.shape[-1] == 64 * 4 // 8 and packed.k_qjl.shape[-1] == 64 // 8
    assert packed.nbytes() == B * 40 * bytes_per_token(spec, 128, HKV)


# ----------------------------------------------------------------------------- packing and rotation
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [16, 48, 64, 128])
def test_packing_round_trip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2 ** bits, (3, 5, n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == n * bits // 8  # 3 bits: 8 values per 3 bytes
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packing_layout() -> None:
    """Word ``p`` holds value ``p + s·n/S`` at bits ``[b·s, b·s + b)``; 3-bit words are three byte planes."""
    n = 16
    codes = torch.zeros(n, dtype=torch.int64)
    codes[1 + 2 * 2] = 5  # 3 bits, S = 8 segments of 2: value 5 is word 1, segment 2 -> bits 6..8 of word 1
    p = pack_codes(codes, 3)
    word1 = int(p[1]) | int(p[3]) << 8 | int(p[5]) << 16
    assert word1 == 5 << 6 and int(p.sum()) == (5 << 6 & 0xFF) + (5 << 6 >> 8)
    codes4 = torch.arange(n) % 16
    p4 = pack_codes(codes4, 4)
    assert [int(x) for x in p4[:2]] == [0 | 8 << 4, 1 | 9 << 4]


def test_hadamard_and_rotation_are_orthogonal() -> None:
    for n in (16, 64, 128):
        x = torch.randn(5, n, dtype=torch.float64)
        assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n).double(), atol=1e-10)
    signs = (torch.randint(0, 2, (HKV, D)) * 2 - 1).float()
    a, b = torch.randn(B, HQ, 7, D), torch.randn(B, HQ, 7, D)
    ra, rb = rotate(a, signs), rotate(b, signs)
    torch.testing.assert_close((ra * rb).sum(-1), (a * b).sum(-1), atol=1e-4, rtol=1e-5)  # inner products kept
    torch.testing.assert_close(unrotate(ra, signs), a, atol=1e-5, rtol=1e-5)
    mats = KVQuantState.create(KVQuantSpec(), D, HKV).rotation("key")
    eye = torch.eye(D).expand(HKV, D, D)
    torch.testing.assert_close(mats @ mats.transpose(-1, -2), eye, atol=1e-5, rtol=0)


def test_state_is_seeded_per_layer() -> None:
    spec = KVQuantSpec(qjl=True)
    s0, s0b = KVQuantState.create(spec, D, HKV), KVQuantState.create(spec, D, HKV)
    s1 = KVQuantState.create(spec, D, HKV, layer_idx=1)
    assert torch.equal(s0.key_signs, s0b.key_signs) and torch.equal(s0.qjl_matrix, s0b.qjl_matrix)
    assert not torch.equal(s0.key_signs, s1.key_signs) and not torch.equal(s0.qjl_matrix, s1.qjl_matrix)
    assert s0.qjl_matrix.shape == (D, D) and not torch.equal(s0.key_signs, s0.value_signs)


# ----------------------------------------------------------------------------- quantization error
def group_bound(x: torch.Tensor, scale: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """Stated bound: half a step, plus the fp16 rounding of zero and scale (2**-10 of the group's largest
    magnitude covers both), plus fp32 rounding."""
    big = x.abs().unflatten(dim % x.dim(), (-1, group)).amax(dim % x.dim() + 1)
    b = scale.float() / 2 + 2 ** -10 * big + 1e-6
    return b.repeat_interleave(group, dim=dim)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_error_within_half_a_step(bits: int, axis: str) -> None:
    x = torch.randn(2, 3, 64, 64) * torch.rand(1, 1, 1, 64) * 10
    x[..., 5] += 40  # an outlier channel
    x[0, 0, :, :32] = 1.5  # constant groups: scale 0, exact up to fp16 rounding
    dim = -1 if axis == "token" else -2
    codes, scale, zero = quantize_groups(x, bits, 32, dim=dim)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** bits - 1
    s = scale.float().repeat_interleave(32, dim=dim)
    xh = codes.float() * s + zero.float().repeat_interleave(32, dim=dim)
    err = (x - xh).abs()
    assert bool((err <= group_bound(x, scale, 32, dim)).all()), f"max err / step {(err / s.clamp(min=1e-9)).max()}"
    assert err.max() > 0  # not trivially exact


def test_gaussian_codebook_is_the_lloyd_max_quantizer() -> None:
    """Centroids are symmetric, match Max's (1960) 3-bit table, and are fixed points of Lloyd's iteration: each is
    the mean of the standard Gaussian over its cell (checked by numerical integration, not the closed form the
    module uses); boundaries are the midpoints."""
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    w = torch.exp(-x * x / 2)
    for bits in (2, 3, 4):
        cents, bounds = gaussian_codebook(bits)
        c, bd = torch.tensor(cents, dtype=torch.float64), torch.tensor(bounds, dtype=torch.float64)
        assert len(cents) == 2 ** bits and torch.allclose(c, -c.flip(0), atol=1e-6)
        assert torch.allclose(bd, (c[1:] + c[:-1]) / 2, atol=1e-6)
        cell = (x.unsqueeze(-1) > bd).sum(-1)
        for i in range(2 ** bits):
            m = cell == i
            assert abs(float((x[m] * w[m]).sum() / w[m].sum()) - cents[i]) < 1e-5, (bits, i)
    assert [round(v, 3) for v in gaussian_codebook(3)[0][4:]] == [0.245, 0.756, 1.344, 2.152]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_codes_are_nearest_centroids(bits: int) -> None:
    x = torch.randn(3, 2, 50, 64) * torch.rand(3, 2, 50, 1) * 5
    x[0, 0, 0] = 0.0  # an all-zero group: scale 0, codes 0, exact
    codes, scale = quantize_codebook(x, bits, 32)
    cents = torch.tensor(gaussian_codebook(bits)[0])
    y = x / scale.float().repeat_interleave(32, -1)
    dist = (y.unsqueeze(-1) - cents).abs()
    chosen = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    ok = torch.isfinite(y)
    assert bool((chosen[ok] <= dist.min(-1).values[ok] + 1e-6).all())
    rms = x.unflatten(-1, (2, 32)).square().mean(-1).sqrt()
    assert torch.allclose(scale.float(), rms, rtol=2 ** -10, atol=0)
    xh = dequantize_codebook(codes, scale, bits, 32)
    assert torch.equal(xh[0, 0, 0], torch.zeros(64)) and int(codes.max()) <= 2 ** bits - 1


def test_codebook_error_is_the_gaussian_distortion() -> None:
    """Rotated Gaussian keys, one group per head: relative squared error near Lloyd-Max's distortion of the unit
    Gaussian (0.1175, 0.03454, 0.009497 at 2, 3, 4 bits; within 10%), and half the side bytes of min/max."""
    for bits, want in ((2, 0.1175), (3, 0.03454), (4, 0.009497)):
        spec = KVQuantSpec(key_bits=bits, value_bits=bits, group_size=64, codebook=True)
        state, packed, k, v = make(spec, T=256)
        kh, vh = dequantize_kv(packed, spec, state)
        for x, xh in ((k, kh), (v, vh)):
            err = ((xh - x).pow(2).sum() / x.pow(2).sum()).item()
            assert abs(err - want) < 0.1 * want, (bits, err, want)
        assert packed.k_zero is None and packed.v_zero is None


def test_quantize_error_shrinks_with_bits() -> None:
    """Rotated Gaussian rows: each extra bit cuts the mean squared error by more than 2.5x (4x for uniform)."""
    spec_err = []
    for bits in (2, 3, 4):
        spec = KVQuantSpec(key_bits=bits, value_bits=bits)
        state, packed, k, v = make(spec, T=64)
        kh, vh = dequantize_kv(packed, spec, state)
        spec_err.append(((kh - k).pow(2).mean() / k.pow(2).mean()).item())
        # end to end, in the stored (rotated) space, every value obeys the group bound
        ks = rotate(k, state.key_signs)
        kr, _ = dequantize_kv(packed, spec, state, rotated=True)
        assert bool(((kr - ks).abs() <= group_bound(ks, packed.k_scale, spec.group_size, -1) + 1e-5).all())
    assert spec_err[0] > 2.5 * spec_err[1] > 2.5 * 2.5 * spec_err[2], spec_err


def test_rotation_helps_outlier_channels() -> None:
    """With a few large channels (as post-RoPE keys have), rotation lowers the 3-bit error at equal bytes."""
    k = torch.randn(B, HKV, 64, D)
    k[..., :4] *= 20
    errs = {}
    for rot in (False, True):
        spec = KVQuantSpec(key_bits=3, value_bits=3, rotate=rot, group_size=64)
        state = KVQuantState.create(spec, D, HKV)
        kh, _ = dequantize_kv(quantize_kv(k, k, spec, state), spec, state)
        errs[rot] = (kh - k).pow(2).mean().item()
    assert errs[True] < 0.5 * errs[False], errs


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [1, 3])
def test_identity_setting_equals_plain_attention(Tq: int, causal: bool) -> None:
    spec = KVQuantSpec.identity()
    state, packed, k, v = make(spec, T=50, dtype=torch.bfloat16)
    q = torch.randn(B, HQ, Tq, D)
    lengths = torch.tensor([50, 23])
    out = quantized_decode_attention(q, packed, spec, state, lengths=lengths, causal=causal)
    ref = plain_attention(q, k, v, lengths, causal)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    kk, vv = dequantize_kv(packed, spec, state)
    assert torch.equal(kk, k.float()) and torch.equal(vv, v.float())  # stored unchanged


def test_identity_with_pruning_scores_kept_channels_only() -> None:
    spec = KVQuantSpec(key_bits=16, value_bits=16, rotate=False, keep_channels=0.5)
    state, packed, k, v = make(spec, T=30)
    q = torch.randn(B, HQ, 1, D)
    keep = state.key_channels  # [Hkv, 32]
    mask = torch.zeros(HKV, D)
    mask.scatter_(1, keep, 1.0)
    kz = k.bfloat16().float() * mask[None, :, None, :]  # stored raw in fp16 for fp32 input
    kz = k.half().float() * mask[None, :, None, :]
    ref = plain_attention(q, kz, v.half().float(), torch.tensor([30, 30]), True)
    out = quantized_decode_attention(q, packed, spec, state)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_calibrate_keeps_the_largest_contributions() -> None:
    spec = KVQuantSpec(keep_channels=0.25, rotate=False, key_bits=4, group_size=16)
    k = torch.randn(1, HKV, 32, D)
    q = torch.randn(1, HQ, 8, D)
    big = torch.randperm(D)[:16]
    k[..., big] *= 10
    state = KVQuantState.create(spec, D, HKV).calibrate(q, k)
    for h in range(HKV):
        assert state.key_channels[h].tolist() == sorted(big.tolist())


def test_qjl_estimator_is_unbiased() -> None:
    """Over many independent QJL matrices (the seeds 0..N-1), the mean estimate of ``<q, r>`` equals the exact
    residual inner product within 5 standard errors, and dropping the sqrt(pi/2) factor is detected."""
    N, m = 1500, 64
    k = torch.randn(1, 1, 4, D)
    spec0 = KVQuantSpec(key_bits=2, value_bits=2, rotate=False, qjl=True, qjl_dim=m)
    state0 = KVQuantState.create(spec0, D, 1)
    kh, _ = dequantize_kv(quantize_kv(k, k, spec0, state0), spec0, state0)
    r = (k - kh)[0, 0]  # the residual does not depend on the seed without rotation
    q = r / r.norm(dim=-1, keepdim=True) * 4 + torch.randn(4, D) * 0.25  # large <q, r>: a bias would show
    exact = (q * r).sum(-1).double()  # [4] query i with key i
    est = torch.empty(N, 4, dtype=torch.float64)
    for seed in range(N):
        spec = KVQuantSpec(key_bits=2, value_bits=2, rotate=False, qjl=True, qjl_dim=m, seed=seed)
        state = KVQuantState.create(spec, D, 1)
        packed = quantize_kv(k, k, spec, state)
        _, q_sk = prepare_query(q.view(1, 1, 4, D), spec, state)
        est[seed] = qjl_scores(q_sk, packed, spec)[0, 0].diagonal().double()
    # ||r|| is stored in fp16: its rounding is a (tiny) bias the statistical test allows for
    se = est.std(0) / math.sqrt(N)
    tol = 5 * se + 2 ** -10 * exact.abs()
    assert bool(((est.mean(0) - exact).abs() <= tol).all()), (est.mean(0), exact, se)
    biased = est.mean(0) / math.sqrt(math.pi / 2)
    assert bool(((biased - exact).abs() > tol).any()), "the test cannot tell a biased estimator apart"


def test_qjl_corrected_scores_closer_to_exact() -> None:
    """Scores ``<q, dequant(k)>`` with the QJL term are closer to ``<q, k>`` on average than without: the mean
    error (bias) over keys always, and the mean squared error when ``qjl_dim`` is several times the key dim
    (each sign carries ``(pi/2 - 1)`` of noise: at ``qjl_dim = D`` one draw's squared error is about 1.6x the
    uncorrected one, the known cost of QJL at equal sketch size)."""
    T = 512
    k = torch.randn(1, HKV, T, D)
    q = torch.randn(1, HQ, 1, D)
    errs = {}
    for name, spec in (("plain", KVQuantSpec(key_bits=2, value_bits=2)),
                       ("qjl4x", KVQuantSpec(key_bits=2, value_bits=2, qjl=True, qjl_dim=4 * D))):
        state = KVQuantState.create(spec, D, HKV)
        packed = quantize_kv(k, k, spec, state)
        q_rot, q_sk = prepare_query(q, spec, state)
        kr, _ = dequantize_kv(packed, spec, state, rotated=True)
        s = q_rot @ kr.repeat_interleave(2, 1).transpose(-1, -2)
        if spec.qjl:
            s = s + qjl_scores(q_sk, packed, spec)
        exact = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
        errs[name] = (s - exact).pow(2).mean().item()
    assert errs["qjl4x"] < 0.7 * errs["plain"], errs


def test_merge_attention_states_equals_attention_over_the_union() -> None:
    spec = KVQuantSpec.identity()
    state, packed, k, v = make(spec, T=40)
    q = torch.randn(B, HQ, 2, D)
    a, la = quantized_decode_attention(q, packed.narrow_tokens(0, 25), spec, state, causal=False, return_lse=True)
    b, lb = quantized_decode_attention(q, packed.narrow_tokens(25, 15), spec, state, causal=False, return_lse=True)
    full, lf = quantized_decode_attention(q, packed, spec, state, causal=False, return_lse=True)
    out, lse = merge_attention_states(a, la, b, lb)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lf, atol=1e-5, rtol=1e-5)


def test_rows_without_visible_keys() -> None:
    spec = KVQuantSpec(key_bits=3, value_bits=3, qjl=True)
    state, packed, _, _ = make(spec)
    q = torch.randn(B, HQ, 2, D)
    out, lse = quantized_decode_attention(q, packed, spec, state, lengths=torch.tensor([0, 1]), return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isinf(lse[0]).all())
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))  # causal: query 0 sees slot -1
    assert bool(torch.isfinite(out[1, :, 1]).all()) and bool(torch.isfinite(lse[1, :, 1]).all())


@pytest.mark.parametrize("name", ["identity", "k3v3-qjl"])
def test_prefill_merges_fresh_tokens_and_packed_past(name: str) -> None:
    spec = SPECS[name]
    state, packed, k, v = make(spec, T=30)
    Tc = 5
    q = torch.randn(B, HQ, Tc, D)
    kc, vc = torch.randn(B, HKV, Tc, D), torch.randn(B, HKV, Tc, D)
    lengths = torch.tensor([30, 12])
    out = quantized_prefill_attention(q, kc, vc, packed, spec, state, lengths=lengths)
    first = quantized_prefill_attention(q, kc, vc, None, spec, state)
    torch.testing.assert_close(first.double(), plain_attention(q, kc, vc, torch.tensor([Tc, Tc]), True),
                               atol=1e-5, rtol=1e-5)
    if name == "identity":  # the past read back exactly: equals attention over [past, chunk]
        kh, vh = dequantize_kv(packed, spec, state)
        for b in range(B):
            n = int(lengths[b])
            kk = torch.cat([kh[b:b + 1, :, :n], kc[b:b + 1]], 2)
            vv = torch.cat([vh[b:b + 1, :, :n], vc[b:b + 1]], 2)
            ref = plain_attention(q[b:b + 1], kk, vv, torch.tensor([n + Tc]), True)
            torch.testing.assert_close(out[b:b + 1].double(), ref, atol=1e-5, rtol=1e-5)
    else:  # the past part is the decode attention (causal=False) merged by lse
        past, pl = quantized_decode_attention(q, packed, spec, state, lengths=lengths, causal=False,
                                              return_lse=True)
        fresh, fl = quantized_prefill_attention(q, kc, vc, None, spec, state, return_lse=True)
        torch.testing.assert_close(out, merge_attention_states(fresh, fl, past, pl)[0], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- appending
@pytest.mark.parametrize("name", ["k3v3-qjl", "k4v2-keep50-qjl", "identity", "k3v3-cb64"])
def test_append_in_pieces_equals_one_write(name: str) -> None:
    spec = SPECS[name]
    state, whole, k, v = make(spec, T=40)
    cache = PackedKV.allocate(spec, B, HKV, 48, D, raw_dtype=whole.raw_dtype)
    for s, e in ((0, 17), (17, 18), (18, 40)):
        assert quantize_kv(k[:, :, s:e], v[:, :, s:e], spec, state, out=cache, start=s) is cache
    assert torch.equal(cache.buffer[:, :, :40], whole.buffer)
    assert not bool(cache.buffer[:, :, 40:].any())  # untouched slots


def test_append_kivi_whole_groups() -> None:
    spec = SPECS["kivi2"]
    state, whole, k, v = make(spec, T=64)
    cache = PackedKV.allocate(spec, B, HKV, 96, D)
    quantize_kv(k[:, :, :32], v[:, :, :32], spec, state, out=cache, start=0)
    quantize_kv(k[:, :, 32:], v[:, :, 32:], spec, state, out=cache, start=32)
    assert torch.equal(cache.buffer[:, :, :64], whole.buffer)
    assert torch.equal(cache.key_scales[:, :, :, :2], whole.key_scales)
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_kv(k[:, :, :8], v[:, :, :8], spec, state, out=cache, start=64)


def test_append_per_row_start() -> None:
    spec = SPECS["k3v3-qjl"]
    state, _, k, v = make(spec, T=3)
    cache = PackedKV.allocate(spec, B, HKV, 20, D)
    quantize_kv(k, v, spec, state, out=cache, start=torch.tensor([4, 11]))
    one = quantize_kv(k, v, spec, state)
    assert torch.equal(cache.buffer[0, :, 4:7], one.buffer[0]) and torch.equal(cache.buffer[1, :, 11:14], one.buffer[1])
    assert int(cache.buffer[0, :, :4].sum()) == 0 and int(cache.buffer[1, :, :11].sum()) == 0
    with pytest.raises(ValueError, match="start values"):
        quantize_kv(k, v, spec, state, out=cache, start=torch.tensor([4, 18]))


def test_from_buffer_views_an_existing_buffer() -> None:
    spec = SPECS["k3v3-qjl"]
    state, packed, k, v = make(spec, T=16)
    pool = torch.zeros(3, B, HKV, 16, packed.layout.record_bytes, dtype=torch.uint8)
    view = PackedKV.from_buffer(spec, pool[1], D)
    quantize_kv(k, v, spec, state, out=view)
    assert torch.equal(pool[1], packed.buffer) and not bool(pool[0].any()) and not bool(pool[2].any())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors() -> None:
    spec = KVQuantSpec(key_bits=3, value_bits=3)
    state, packed, k, v = make(spec, T=8)
    q = torch.randn(B, HQ, 1, D)
    with pytest.raises(ValueError, match="rank-4"):
        quantize_kv(k[0], v[0], spec, state)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quantize_kv(k.double(), v.double(), spec, state)
    with pytest.raises(ValueError, match="same shape"):
        quantize_kv(k, v[:, :, :4], spec, state)
    with pytest.raises(ValueError, match="state was created for"):
        quantize_kv(k[:, :1], v[:, :1], spec, state)
    with pytest.raises(ValueError, match="state was created for KVQuantSpec"):
        quantize_kv(k, v, KVQuantSpec(), state)
    with pytest.raises(TypeError, match="KVQuantState"):
        quantize_kv(k, v, spec, "state")
    with pytest.raises(ValueError, match=r"start must be an int in \[0, capacity - T\]"):
        quantize_kv(k, v, spec, state, out=packed, start=1)
    with pytest.raises(ValueError, match="needs out="):
        quantize_kv(k, v, spec, state, start=2)
    with pytest.raises(ValueError, match="batch"):
        quantize_kv(k[:1], v[:1], spec, state, out=packed)
    with pytest.raises(ValueError, match="impl must be one of"):
        quantize_kv(k, v, spec, state, impl="cuda")
    with pytest.raises(ValueError, match="multiple of the cache's 2 KV heads"):
        quantized_decode_attention(torch.randn(B, 3, 1, D), packed, spec, state)
    with pytest.raises(ValueError, match="head dim"):
        quantized_decode_attention(torch.randn(B, HQ, 1, 32), packed, spec, state)
    with pytest.raises(ValueError, match="lengths must be an int32/int64 tensor"):
        quantized_decode_attention(q, packed, spec, state, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="scale"):
        quantized_decode_attention(q, packed, spec, state, scale=-1.0)
    with pytest.raises(TypeError, match="causal"):
        quantized_decode_attention(q, packed, spec, state, causal=1)
    with pytest.raises(ValueError, match="packed was built for"):
        other = KVQuantSpec(key_bits=4, value_bits=4)
        quantized_decode_attention(q, packed, other, KVQuantState.create(other, D, HKV))
    with pytest.raises(ValueError, match="buffer's last dim must be record_bytes"):
        PackedKV.from_buffer(spec, torch.zeros(1, 2, 4, 7, dtype=torch.uint8), D)
    with pytest.raises(ValueError, match="key_channels must be an integer tensor"):
        KVQuantState.create(KVQuantSpec(keep_channels=0.5), D, HKV, key_channels=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="distinct"):
        KVQuantState.create(KVQuantSpec(keep_channels=0.5), D, HKV, key_channels=torch.zeros(2, 32, dtype=torch.long))
    pruned = KVQuantSpec(keep_channels=0.5)
    with pytest.raises(RuntimeError, match=r"calibrate\(q, k\)"):
        quantize_kv(k, v, pruned, KVQuantState.create(pruned, D, HKV))
    with pytest.raises(ValueError, match="same shape|Hq must be a multiple"):
        quantized_prefill_attention(torch.randn(B, 3, 8, D), k, v, packed, spec, state)


def test_import_does_not_load_triton() -> None:
    code = ("import sys, longkit.kernels.kv_quant as m; m.KVQuantSpec(); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
