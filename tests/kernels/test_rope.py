"""RoPE re-rotation (``longkit.kernels.rope``): the Triton kernel under the interpreter vs the reference, the
rotation's algebra (composition, identity), equivalence with transformers' encoding at shifted positions for the
default / linear / llama3 / yarn RoPE types, strided cache views, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longkit.kernels.rope import naive_rope_rotate, rerotate_, rerotate_range_
from longkit.kernels.testing import assert_close

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def inv_freq_for(D: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def random_delta(B: int, T: int, lo: int = -3000, hi: int = 3000) -> torch.Tensor:
    """Per-row deltas with some zeros (tokens that must stay untouched), negative and positive shifts."""
    d = torch.randint(lo, hi, (B, T))
    d[torch.rand(B, T) < 0.2] = 0
    return d


def check_against_reference(keys: torch.Tensor, delta: torch.Tensor, f: torch.Tensor, interleaved: bool) -> None:
    """Kernel (in place) vs the fp32 reference, within 2x PyTorch's own error in keys' dtype; zero-delta tokens
    bit-identical."""
    before = keys.clone()
    ref = naive_rope_rotate(before.float(), delta, f, interleaved=interleaved)
    lowprec = naive_rope_rotate(before, delta, f, interleaved=interleaved)
    out = rerotate_(keys, delta, f, interleaved=interleaved, impl="triton")
    assert out is keys
    assert_close("rerotate_", ref, keys, lowprec_ref=lowprec)
    still = (delta == 0).expand(keys.shape[0], -1)  # [B, T]
    for b in range(keys.shape[0]):
        assert torch.equal(keys[b][:, still[b]], before[b][:, still[b]]), "a token with delta 0 was changed"


# ----------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("T", [1, 63, 129])
def test_kernel_matches_reference(T: int, D: int, dtype: torch.dtype) -> None:
    keys = torch.randn(2, 3, T, D).to(dtype)
    check_against_reference(keys, random_delta(2, T), inv_freq_for(D), interleaved=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
def test_kernel_interleaved(D: int, dtype: torch.dtype) -> None:
    keys = torch.randn(2, 3, 63, D).to(dtype)
    check_against_reference(keys, random_delta(2, 63), inv_freq_for(D), interleaved=True)


@pytest.mark.parametrize("D", [16, 32, 96, 256])
def test_kernel_other_head_dims(D: int) -> None:
    keys = torch.randn(1, 5, 17, D, dtype=torch.bfloat16)
    check_against_reference(keys, random_delta(1, 17), inv_freq_for(D), interleaved=bool(D % 32))


def test_one_delta_row_for_every_batch_row() -> None:
    keys = torch.randn(3, 2, 40, 64, dtype=torch.float16)
    check_against_reference(keys, random_delta(1, 40)[0], inv_freq_for(64), interleaved=False)


def test_large_shifts_stay_accurate() -> None:
    """Angles up to ~2e5 rad: the kernel's range reduction keeps cos/sin as accurate as PyTorch's on the same
    fp32 angle."""
    keys = torch.randn(1, 2, 50, 128)
    delta = torch.randint(-200_000, 200_000, (1, 50))
    check_against_reference(keys, delta, inv_freq_for(128), interleaved=False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_delta_integer_dtypes(dtype: torch.dtype) -> None:
    keys = torch.randn(2, 2, 30, 32)
    delta = torch.randint(0 if dtype == torch.uint8 else -100, 100, (2, 30)).to(dtype)
    check_against_reference(keys, delta, inv_freq_for(32), interleaved=False)


# ----------------------------------------------------------------------------- strided views of a cache
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_suffix_view_of_a_cache(impl: str) -> None:
    """Rotating ``cache[:, :, start:]`` (strided in B and H) changes that suffix only: the prefix, and every
    element outside the view, stay bit-identical."""
    cache = torch.randn(2, 4, 100, 80, dtype=torch.bfloat16)
    before = cache.clone()
    start = 37
    delta = random_delta(2, 100 - start)
    rerotate_(cache[:, :, start:], delta, inv_freq_for(80), impl=impl)
    assert torch.equal(cache[:, :, :start], before[:, :, :start])
    ref = naive_rope_rotate(before[:, :, start:].float(), delta, inv_freq_for(80))
    assert_close("suffix", ref, cache[:, :, start:], lowprec_ref=naive_rope_rotate(before[:, :, start:], delta,
                                                                                   inv_freq_for(80)))


def test_heads_slice_and_transposed_layout() -> None:
    """A ``[B, T, H, D]`` buffer seen as ``[B, H, T, D]`` (transformers' transpose), heads 1..2 only."""
    buf = torch.randn(2, 33, 4, 64)
    before = buf.clone()
    view = buf.transpose(1, 2)[:, 1:3]
    delta = random_delta(2, 33)
    rerotate_(view, delta, inv_freq_for(64), impl="triton")
    assert torch.equal(buf[:, :, [0, 3]], before[:, :, [0, 3]])
    ref = naive_rope_rotate(before.transpose(1, 2)[:, 1:3], delta, inv_freq_for(64))
    assert_close("heads slice", ref, view)


# ----------------------------------------------------------------------------- algebra
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_composition(impl: str) -> None:
    """Rotating by a then by b equals rotating by a + b (fp32; angles kept small so fp32 rounding of the two
    paths' angles stays below the tolerance)."""
    f = inv_freq_for(64)
    x = torch.randn(2, 3, 45, 64)
    a, b = torch.randint(-200, 200, (2, 45)), torch.randint(-200, 200, (2, 45))
    two_steps = rerotate_(rerotate_(x.clone(), a, f, impl=impl), b, f, impl=impl)
    one_step = rerotate_(x.clone(), a + b, f, impl=impl)
    torch.testing.assert_close(two_steps, one_step, rtol=0, atol=2e-4)
    back = rerotate_(rerotate_(x.clone(), a, f, impl=impl), -a, f, impl=impl)
    torch.testing.assert_close(back, x, rtol=0, atol=2e-4)


@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_delta_is_bit_exact(impl: str, dtype: torch.dtype) -> None:
    """delta == 0 leaves keys bit-identical, even non-finite values (they are not read)."""
    keys = torch.randn(2, 3, 20, 64).to(dtype)
    keys[0, 1, 3, 5] = float("inf")
    keys[1, 0, 7, 40] = float("nan")
    before = keys.clone()
    rerotate_(keys, torch.zeros(2, 20, dtype=torch.long), inv_freq_for(64), impl=impl)
    assert torch.equal(keys.view(torch.int8 if dtype == torch.float32 else torch.int16).float(),
                       before.view(torch.int8 if dtype == torch.float32 else torch.int16).float())
    rerotate_range_(keys, 0, None, 0, inv_freq_for(64), impl=impl)
    assert torch.equal(keys.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       before.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_naive_interleaved_is_half_split_on_permuted_dims() -> None:
    """Independent check of the interleaved reference: moving even dims to the first half and odd dims to the
    second turns pairs (2i, 2i+1) into (i, i + D/2)."""
    D = 48
    x = torch.randn(2, 2, 9, D)
    delta = torch.randint(-50, 50, (9,))
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
    want = torch.empty_like(x)
    want[..., perm] = naive_rope_rotate(x[..., perm], delta, inv_freq_for(D))
    torch.testing.assert_close(naive_rope_rotate(x, delta, inv_freq_for(D), interleaved=True), want)
    # the default stays the half-split rule
    torch.testing.assert_close(naive_rope_rotate(x, delta, inv_freq_for(D)),
                               naive_rope_rotate(x, delta, inv_freq_for(D), interleaved=False), rtol=0, atol=0)


# ----------------------------------------------------------------------------- transformers' RoPE at shifted positions
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rerotation_equals_encoding_at_shifted_positions(rope_type: str, impl: str) -> None:
    """Keys encoded by transformers at positions p, re-rotated by delta, equal keys encoded at p + delta, for every
    static RoPE type (yarn's attention_scaling is inside the keys and survives the pure rotation)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    D = 64
    cfg = transformers.LlamaConfig(hidden_size=2 * D, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=256, rope_parameters=ROPE_TYPES[rope_type])
    rotary = LlamaRotaryEmbedding(cfg)
    init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv_freq, scaling = init(cfg, device=torch.device("cpu"))
    torch.testing.assert_close(rotary.inv_freq, inv_freq)
    assert rotary.attention_scaling == pytest.approx(scaling)
    assert (scaling != 1.0) == (rope_type == "yarn")

    B, H, T = 2, 2, 40
    x = torch.randn(B, H, T, D)  # pre-RoPE keys
    p = torch.arange(T)[None] + torch.randint(0, 200, (B, 1))
    delta = torch.randint(-150, 300, (B, T)).maximum(-p)  # positions stay >= 0
    delta[:, :5] = 0

    def encode(pos: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(x, pos)
        return apply_rotary_pos_emb(x, x, cos, sin)[1]

    cached, want = encode(p), encode(p + delta)
    rerotate_(cached, delta, inv_freq, impl=impl)
    # both sides round fp32 angles of up to ~500 rad (error ~3e-5 rad) on keys of size ~4
    torch.testing.assert_close(cached, want, rtol=0, atol=1e-3 * max(scaling, 1.0))
    # the same with the reference's own encoding (naive_rope_rotate at p, times attention_scaling)
    cached2 = naive_rope_rotate(x, p, inv_freq) * scaling
    rerotate_(cached2, delta, inv_freq, impl=impl)
    torch.testing.assert_close(cached2, naive_rope_rotate(x, p + delta, inv_freq) * scaling, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- rerotate_range_
@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize(("start", "end"), [(0, None), (13, 50), (49, 50), (20, 20)])
def test_range_matches_delta_form(impl: str, start: int, end: int | None) -> None:
    keys = torch.randn(2, 3, 50, 80, dtype=torch.bfloat16)
    shift = int(torch.randint(-500, 500, ()).item()) or 1
    delta = torch.zeros(50, dtype=torch.long)
    delta[start:end] = shift
    want = rerotate_(keys.clone(), delta, inv_freq_for(80), impl="naive")
    before = keys.clone()
    out = rerotate_range_(keys, start, end, shift, inv_freq_for(80), impl=impl)
    assert out is keys
    e = 50 if end is None else end
    assert torch.equal(keys[:, :, :start], before[:, :, :start]) and torch.equal(keys[:, :, e:], before[:, :, e:])
    lowprec_ref = want
    ref = naive_rope_rotate(before.float(), delta, inv_freq_for(80))
    assert_close("range", ref, keys, lowprec_ref=lowprec_ref)


def test_range_interleaved() -> None:
    keys = torch.randn(1, 2, 30, 64)
    want = naive_rope_rotate(keys, torch.full((30,), 7), inv_freq_for(64), interleaved=True)
    rerotate_range_(keys, 0, None, 7, inv_freq_for(64), interleaved=True, impl="triton")
    assert_close("range interleaved", want, keys)


# ----------------------------------------------------------------------------- tuning variable
def test_rope_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tile, head group and warp count give the same result; bad values raise."""
    monkeypatch.setenv("LONGKIT_ROPE_CONFIG", "4,2,1")
    keys = torch.randn(2, 5, 31, 64)
    check_against_reference(keys, random_delta(2, 31), inv_freq_for(64), interleaved=False)
    for bad in ("4,2", "3,2,1", "4,0,1", "a,b,c"):
        monkeypatch.setenv("LONGKIT_ROPE_CONFIG", bad)
        with pytest.raises(ValueError, match="LONGKIT_ROPE_CONFIG"):
            rerotate_(torch.randn(1, 1, 4, 8), torch.ones(4, dtype=torch.long), inv_freq_for(8), impl="triton")


# ----------------------------------------------------------------------------- bad input
def test_errors() -> None:
    f = inv_freq_for(64)
    k = torch.randn(1, 2, 8, 64)
    d = torch.ones(8, dtype=torch.long)
    cases = [
        (ValueError, "rank-4", lambda: rerotate_(k[0], d, f)),
        (TypeError, "float16, bfloat16 or float32", lambda: rerotate_(k.double(), d, f)),
        (TypeError, "float16, bfloat16 or float32", lambda: rerotate_(k.long(), d, f)),
        (ValueError, "2 \\* len\\(inv_freq\\)", lambda: rerotate_(k, d, inv_freq_for(32))),
        (ValueError, "1-D float tensor", lambda: rerotate_(k, d, f.long())),
        (ValueError, "1-D float tensor", lambda: rerotate_(k, d, f[None])),
        (TypeError, "integer tensor", lambda: rerotate_(k, d.float(), f)),
        (TypeError, "integer tensor", lambda: rerotate_(k, d.bool(), f)),
        (TypeError, "integer tensor", lambda: rerotate_(k, 3, f)),
        (ValueError, "shape \\[B, T\\]", lambda: rerotate_(k, torch.ones(2, 8, dtype=torch.long), f)),
        (ValueError, "shape \\[B, T\\]", lambda: rerotate_(k, torch.ones(7, dtype=torch.long), f)),
        (ValueError, "delta is on meta", lambda: rerotate_(k, d.to("meta"), f)),
        (ValueError, "inv_freq is on meta", lambda: rerotate_(k, d, f.to("meta"))),
        (ValueError, "last dim must be contiguous", lambda: rerotate_(k.transpose(2, 3), d[:1].expand(64), f[:4])),
        (ValueError, "expanded view", lambda: rerotate_(k[:, :1].expand(1, 2, 8, 64), d, f)),
        (RuntimeError, "torch.no_grad", lambda: rerotate_(k.clone().requires_grad_(), d, f)),
        (TypeError, "interleaved must be a bool", lambda: rerotate_(k, d, f, interleaved=1)),
        (TypeError, "impl must be None", lambda: rerotate_(k, d, f, impl=1)),
        (ValueError, "impl must be one of", lambda: rerotate_(k, d, f, impl="cuda")),
        (ValueError, "start must be", lambda: rerotate_range_(k, 9, None, 1, f)),
        (ValueError, "end must be", lambda: rerotate_range_(k, 4, 3, 1, f)),
        (TypeError, "shift must be", lambda: rerotate_range_(k, 0, None, 1.5, f)),
        (TypeError, "start must be", lambda: rerotate_range_(k, True, None, 1, f)),
        (ValueError, "2 \\* len\\(inv_freq\\)", lambda: rerotate_range_(k, 0, None, 1, inv_freq_for(32))),
    ]
    before = k.clone()
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    assert torch.equal(k, before), "a rejected call wrote into keys"


def test_default_impl_on_cpu_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkit.kernels.rope import launch

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the Triton launch ran for CPU tensors under impl=None")

    monkeypatch.setattr(launch, "launch_rerotate", boom)
    monkeypatch.delenv("LONGKIT_KERNEL_IMPL", raising=False)
    keys = torch.randn(1, 2, 6, 16)
    want = naive_rope_rotate(keys, torch.full((6,), 4), inv_freq_for(16))
    rerotate_(keys, torch.full((6,), 4), inv_freq_for(16))
    torch.testing.assert_close(keys, want)


def test_empty_keys() -> None:
    keys = torch.randn(1, 2, 0, 32)
    assert rerotate_(keys, torch.zeros(0, dtype=torch.long), inv_freq_for(32), impl="triton") is keys


# ----------------------------------------------------------------------------- benchmark script
def test_benchmark_help_and_dry_run(tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / "rope_rerotate.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--dry-run" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, str(script), "--dry-run", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "GB/s" in out.stdout
    files = list(tmp_path.glob("rope_rerotate_*.json"))
    assert len(files) == 1, files


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_kernel_matches_reference(D: int, dtype: torch.dtype, interleaved: bool) -> None:
    """The compiled kernel on a suffix view of a cache (the PIE case): rotated part against the fp64 reference
    (at most 2x the low-precision reference's error), untouched part bit-identical."""
    f = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device="cuda") / D)
    cache = torch.randn(2, 8, 3000, D, device="cuda", dtype=dtype)
    before = cache.clone()
    delta = torch.randint(-5000, 5000, (2, 2000), device="cuda")
    x = cache[:, :, 1000:].double()
    ang = delta.double()[:, None, :, None] * f  # fp64 angles: the reference the fp32 ones approximate
    cos, sin = torch.cos(ang), torch.sin(ang)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        ref = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        ref = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    low = naive_rope_rotate(cache[:, :, 1000:], delta, f.float(), interleaved=interleaved)
    rerotate_(cache[:, :, 1000:], delta, f.float(), interleaved=interleaved, impl="triton")
    assert torch.equal(cache[:, :, :1000], before[:, :, :1000])
    # fp32 angles of shifts up to 5000 carry ~1e-3 absolute error in any implementation: the floor allows it
    assert_close("keys", ref, cache[:, :, 1000:], lowprec_ref=low, atol_floor=2e-3 * ref.abs().max().item())


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from longkit.kernels.rope.rerotate import _rerotate_kernel
for dtype, interleaved, has_delta in (("bf16", False, True), ("fp16", False, False), ("fp32", True, True)):
    sig = {"k_ptr": "*" + dtype, "delta_ptr": "*i64", "inv_freq_ptr": "*fp32", "shift": "fp32", "H": "i32",
           "T": "i32", **{s: "i64" for s in ("stride_kb", "stride_kh", "stride_kt", "stride_db", "stride_dt")},
           **{c: "constexpr" for c in ("HALF", "HALF_PAD", "BLOCK_T", "HEADS", "HAS_DELTA", "INTERLEAVED",
                                       "RNE_BF16")}}
    consts = {"HALF": 40, "HALF_PAD": 64, "BLOCK_T": 32, "HEADS": 4, "HAS_DELTA": has_delta,
              "INTERLEAVED": interleaved, "RNE_BF16": False}
    triton.compile(ASTSource(fn=_rerotate_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_kernel_compiles_for_hopper_offline() -> None:
    """Compile the kernel for sm_90 with Triton's own compiler, no GPU needed, in a process without the interpreter
    (which tests/kernels/conftest.py turns on and which runs code the compiler rejects: module constants annotated
    instead of ``tl.constexpr(...)`` objects failed on the first H100 run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and "compiled" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
