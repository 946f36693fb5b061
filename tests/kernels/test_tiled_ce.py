"""Tiled LM head + cross-entropy (``longkit.kernels.tiled_ce``): loss and gradients of hidden, weight and bias
against the full-logits reference, on fresh random inputs.

Tolerances (``longkit.kernels.testing.assert_close``): the oracle is the reference in fp64; the tiled function may be
at most twice as far from it as the reference itself in the inputs' dtype (fp32: ~1e-7 relative; bf16: the bf16
rounding of the logits and of the gradients), plus a floor of 2e-6 (fp32) / 1e-3 (bf16) times the tensor's largest
magnitude, for values the input-dtype reference happens to get exactly right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longkit.kernels.testing import assert_close
from longkit.kernels.tiled_ce import naive_cross_entropy, tiled_cross_entropy

DTYPES = (torch.float32, torch.bfloat16)
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def make(N: int, H: int, V: int, dtype: torch.dtype, bias: bool = False, ignored: float = 0.25):
    """Random ``hidden [N, H]``, ``weight [V, H]`` (logits of order 1-3), optional bias, labels with ``ignored``
    of them -100."""
    h = torch.randn(N, H).to(dtype)
    w = (torch.randn(V, H) * 2 / H**0.5).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignored] = -100
    return h, w, b, y


def loss_and_grads(fn, h, w, b, y, upstream: float = 1.0, **kw) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Run ``fn`` on leaf copies of the inputs; returns the loss and every input's gradient."""
    leaves = {"hidden": h.detach().clone().requires_grad_(), "weight": w.detach().clone().requires_grad_()}
    if b is not None:
        leaves["bias"] = b.detach().clone().requires_grad_()
    loss = fn(leaves["hidden"], leaves["weight"], y, bias=leaves.get("bias"), **kw)
    (loss * upstream).backward()
    return {"loss": loss.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}


def check(h, w, b, y, *, upstream: float = 1.0, **kw) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Tiled vs the fp64 oracle within 2x the input-dtype reference's own error; returns the tiled results."""
    ref = loss_and_grads(naive_cross_entropy, h.double(), w.double(), None if b is None else b.double(), y, upstream,
                         **{k: v for k, v in kw.items() if k not in ("chunk_size", "recompute")})
    low = loss_and_grads(naive_cross_entropy, h, w, b, y, upstream,
                         **{k: v for k, v in kw.items() if k not in ("chunk_size", "recompute")})
    out = loss_and_grads(tiled_cross_entropy, h, w, b, y, upstream, **kw)
    assert out["loss"].dtype == torch.float32
    for name in ref:
        assert out[name].dtype == (torch.float32 if name == "loss" else h.dtype), name
        r = ref[name]
        floor = FLOOR[h.dtype] * max(r.abs().max().item(), 1e-3)
        assert_close(name, r, out[name], lowprec_ref=low[name], atol_floor=floor)
    return out


# ----------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk", [2, 7, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype: torch.dtype, chunk: int, bias: bool, recompute: bool) -> None:
    """N=113 rows: chunk sizes that do not divide N (the last tile of 7 has one row) and one larger than N."""
    h, w, b, y = make(113, 48, 301, dtype, bias=bias)
    check(h, w, b, y, chunk_size=chunk, recompute=recompute)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_row_per_tile(dtype: torch.dtype) -> None:
    """(Few rows: a one-row GEMM is very slow on CPU.)"""
    h, w, b, y = make(9, 16, 37, dtype, bias=True)
    check(h, w, b, y, chunk_size=1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions(dtype: torch.dtype, reduction: str) -> None:
    h, w, b, y = make(90, 32, 200, dtype, bias=True)
    check(h, w, b, y, chunk_size=16, reduction=reduction)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_num_items_in_batch(dtype: torch.dtype, as_tensor: bool) -> None:
    """transformers' rule under gradient accumulation: the summed loss divided by the batch's item count."""
    h, w, b, y = make(70, 32, 150, dtype)
    n = 3 * int((y != -100).sum()) + 5  # the count over several micro-batches
    out = check(h, w, b, y, chunk_size=9, num_items_in_batch=torch.tensor(n) if as_tensor else n)
    total = loss_and_grads(tiled_cross_entropy, h, w, b, y, reduction="sum", chunk_size=9)["loss"]
    torch.testing.assert_close(out["loss"], total / n)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
@pytest.mark.parametrize("scale, cap", [(0.5, None), (1.0, 3.0), (1.7, 2.5)], ids=["scale", "cap", "scale+cap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap_and_scale(dtype: torch.dtype, scale: float, cap: float | None, recompute: bool) -> None:
    h, w, b, y = make(61, 32, 128, dtype, bias=True)
    check(h, w, b, y, chunk_size=10, logit_scale=scale, softcap=cap, recompute=recompute)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
def test_upstream_gradient_is_applied(recompute: bool) -> None:
    """``(3.7 · loss).backward()``: every gradient scales (the grads-in-forward path rescales saved gradients)."""
    h, w, b, y = make(50, 16, 64, torch.float32, bias=True)
    check(h, w, b, y, upstream=3.7, chunk_size=8, recompute=recompute)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_labels_ignored(reduction: str, recompute: bool) -> None:
    """As ``F.cross_entropy``: the mean of nothing is NaN, the sum 0; the gradients are zero either way."""
    h, w, b, y = make(20, 16, 40, torch.float32, bias=True, ignored=1.0)
    out = loss_and_grads(tiled_cross_entropy, h, w, b, y, chunk_size=6, reduction=reduction, recompute=recompute)
    ref = loss_and_grads(naive_cross_entropy, h, w, b, y, reduction=reduction)
    assert torch.isnan(out["loss"]) if reduction == "mean" else out["loss"] == 0
    torch.testing.assert_close(out["loss"], ref["loss"], equal_nan=True)
    for name in ("dhidden", "dweight", "dbias"):
        assert torch.equal(out[name], torch.zeros_like(out[name])), name


def test_some_tiles_fully_ignored() -> None:
    """A prompt-masked batch: whole tiles of ignored rows between tiles that count."""
    h, w, b, y = make(64, 16, 50, torch.float32, ignored=0.0)
    y[:20] = -100
    y[40:57] = -100
    check(h, w, b, y, chunk_size=8)


def test_autocast_matches_reference_under_autocast() -> None:
    """fp32 parameters under ``torch.autocast(bf16)``: the GEMM runs in bf16 as ``nn.Linear`` would; gradients come
    back in fp32."""
    h, w, b, y = make(40, 32, 96, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_and_grads(naive_cross_entropy, h, w, b, y)
        out = loss_and_grads(tiled_cross_entropy, h, w, b, y, chunk_size=7)
    ref = loss_and_grads(naive_cross_entropy, h.double(), w.double(), b.double(), y)
    for name in ref:
        assert out[name].dtype == torch.float32, name
        assert_close(name, ref[name], out[name], lowprec_ref=low[name],
                     atol_floor=1e-3 * ref[name].abs().max().item())


def test_int32_labels_and_strided_hidden() -> None:
    h, w, b, y = make(30, 24, 70, torch.float32)
    strided = torch.randn(24, 30).t()  # a non-contiguous view
    check(strided, w, b, y.to(torch.int32), chunk_size=4)


def test_frozen_weight_and_no_grad() -> None:
    """Only the inputs that require grad get one; under no_grad the forward alone runs (any ``recompute``)."""
    h, w, b, y = make(30, 16, 40, torch.float32)
    hl = h.clone().requires_grad_()
    loss = tiled_cross_entropy(hl, w, y, chunk_size=7)
    loss.backward()
    assert hl.grad is not None and w.grad is None
    with torch.no_grad():
        for recompute in (True, False):
            value = tiled_cross_entropy(h, w.requires_grad_(), y, chunk_size=7, recompute=recompute)
            torch.testing.assert_close(value, naive_cross_entropy(h, w, y))
            assert value.grad_fn is None


def test_empty_input() -> None:
    h, w, b, y = make(0, 8, 10, torch.float32)
    hl, wl = h.requires_grad_(), w.requires_grad_()
    assert tiled_cross_entropy(hl, wl, y, reduction="sum").item() == 0.0
    loss = tiled_cross_entropy(hl, wl, y)
    assert torch.isnan(loss)  # the mean of nothing, as F.cross_entropy
    loss.backward()
    assert torch.equal(wl.grad, torch.zeros_like(wl))


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
def test_never_materialises_full_logits(recompute: bool) -> None:
    """No op output, forward or backward, is larger than one ``[chunk, V]`` tile or the ``[V, H]`` / ``[N, H]``
    inputs' gradients; the full ``[N, V]`` logits are 8x that."""
    N, H, V, chunk = 256, 16, 300, 32
    h, w, b, y = make(N, H, V, torch.bfloat16, bias=True)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    with _LargestOutput() as mode:
        loss = tiled_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2], chunk_size=chunk, recompute=recompute)
        loss.backward()
    assert mode.largest <= max(chunk * V, V * H, N * H) < N * V
    with _LargestOutput() as full:
        naive_cross_entropy(h, w, y, bias=b)
    assert full.largest >= N * V  # the probe sees the reference's full logits


def test_runs_eagerly_inside_a_compiled_function() -> None:
    """``torch.compile`` does not trace into it (graph break), and the compiled caller gets the same loss and
    gradients."""
    h, w, b, y = make(40, 16, 30, torch.float32)

    def f(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return tiled_cross_entropy(h * 2, w, y, chunk_size=7) * 3

    eager = loss_and_grads(lambda h, w, y, bias: f(h, w), h, w, None, y)
    compiled = loss_and_grads(lambda h, w, y, bias: torch.compile(f, backend="eager")(h, w), h, w, None, y)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=0, atol=0)


def test_import_stays_light() -> None:
    """Importing the op or its adapter imports neither Triton (``torch._dynamo`` would) nor transformers."""
    import subprocess
    import sys

    code = ("import sys, longkit.kernels.tiled_ce, longkit.hf_patches.tiled_loss; "
            "print([m for m in ('transformers', 'triton', 'torch._dynamo') if m in sys.modules])")
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be an int >= 1"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size must be an int"),
        ({"chunk_size": True}, TypeError, "a bool is not a number"),
        ({"reduction": "none"}, ValueError, "reduction must be one of"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or a number > 0"),
        ({"logit_scale": float("nan")}, ValueError, "logit_scale"),
        ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch must be"),
        ({"num_items_in_batch": True}, TypeError, "num_items_in_batch must be None"),
        ({"num_items_in_batch": torch.ones(2)}, ValueError, "one-element tensor"),
        ({"num_items_in_batch": 4, "reduction": "sum"}, ValueError, "replaces reduction='mean'"),
        ({"recompute": 1}, TypeError, "recompute must be a bool"),
        ({"ignore_index": -1.0}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_options_raise(kwargs: dict, exc: type, match: str) -> None:
    h, w, b, y = make(8, 4, 10, torch.float32)
    with pytest.raises(exc, match=match):
        tiled_cross_entropy(h, w, y, **kwargs)


def test_bad_tensors_raise() -> None:
    h, w, b, y = make(8, 4, 10, torch.float32)
    with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor \[N, H\]"):
        tiled_cross_entropy(h[None], w, y)
    with pytest.raises(ValueError, match=r"weight must be a 2-D tensor \[V, H\]"):
        tiled_cross_entropy(h, w[0], y)
    with pytest.raises(ValueError, match="H must agree"):
        tiled_cross_entropy(h, w.t().contiguous(), y)
    with pytest.raises(ValueError, match=r"labels must be a 1-D tensor \[N\] = \[8\]"):
        tiled_cross_entropy(h, w, y[:5])
    with pytest.raises(TypeError, match="labels must be an int64 or int32 tensor"):
        tiled_cross_entropy(h, w, y.float())
    with pytest.raises(TypeError, match="labels must be an int64 or int32 tensor"):
        tiled_cross_entropy(h, w, y.clamp(min=0).to(torch.uint8))
    with pytest.raises(ValueError, match=r"bias must be None or a 1-D tensor \[V\] = \[10\]"):
        tiled_cross_entropy(h, w, y, bias=torch.zeros(9))
    with pytest.raises(TypeError, match="hidden is torch.float32 but weight is torch.bfloat16"):
        tiled_cross_entropy(h, w.bfloat16(), y)
    with pytest.raises(TypeError, match="hidden must be float32, bfloat16 or float16"):
        tiled_cross_entropy(h.double(), w.double(), y)
    bad = y.clamp(min=0)
    bad[3] = 10
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 10\).*\[10\]"):
        tiled_cross_entropy(h, w, bad)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"or equal ignore_index \(-100\); got \[-1\]"):
        tiled_cross_entropy(h, w, bad)
    torch.testing.assert_close(tiled_cross_entropy(h, w, bad, ignore_index=-1),
                               naive_cross_entropy(h, w, bad, ignore_index=-1))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_matches_reference(dtype: torch.dtype, recompute: bool) -> None:
    """On CUDA (cuBLAS tiles; bf16/fp16 grad_weight through ``addmm(out_dtype=float32)``), and the same tolerance
    rejects a gradient 5% off."""
    torch.set_default_device("cuda")
    try:
        h, w, b, y = make(1000, 128, 3001, dtype, bias=True)
        out = check(h, w, b, y, chunk_size=96, recompute=recompute)
        ref = loss_and_grads(naive_cross_entropy, h.double(), w.double(), b.double(), y)
        low = loss_and_grads(naive_cross_entropy, h, w, b, y)
        wrong = out["dweight"] * 1.05
        with pytest.raises(AssertionError):
            assert_close("dweight", ref["dweight"], wrong, lowprec_ref=low["dweight"],
                         atol_floor=FLOOR[dtype] * ref["dweight"].abs().max().item())
    finally:
        torch.set_default_device("cpu")
