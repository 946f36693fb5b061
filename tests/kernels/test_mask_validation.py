"""Mask constructors and ``AttentionMask`` reject wrong types up front (TypeError) and bad ranges (ValueError),
naming the field, the value and what to pass, instead of building a mask that misbehaves later."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longkit.kernels import AttentionMask, causal, documents, masked_attention, shared_prefix, sink_window

CU = torch.tensor([0, 3, 8])
SEGS = torch.tensor([[1, 2], [0, 3]])


@pytest.mark.parametrize("build, exc, message", [
    (lambda: causal(2.5), TypeError, "AttentionMask.q_offset must be an int >= 0, got 2.5 (float)"),
    (lambda: causal("3"), TypeError, "q_offset must be an int >= 0, got '3' (str); convert the string first"),
    (lambda: causal(True), TypeError, "q_offset must be an int >= 0, got True (bool)"),
    (lambda: causal(torch.tensor(3)), TypeError, "got tensor(3) (Tensor); pass a Python number"),
    (lambda: causal(-1), ValueError, "q_offset must be an int >= 0, got -1"),
    (lambda: causal().with_offset(4.0), TypeError, "q_offset must be an int >= 0, got 4.0 (float)"),
    (lambda: sink_window(True, 16), TypeError, "n_global must be an int >= 0, got True (bool)"),
    (lambda: sink_window(4, 16.0), TypeError, "n_local must be an int >= 1 or None, got 16.0 (float)"),
    (lambda: sink_window(4, "16"), TypeError, "n_local must be an int >= 1 or None, got '16' (str)"),
    (lambda: sink_window(4.0, 16), TypeError, "n_global must be an int >= 0, got 4.0 (float)"),
    (lambda: sink_window(4, 16, q_offset=1.5), TypeError, "q_offset must be an int >= 0, got 1.5"),
    (lambda: sink_window(4, 0), ValueError, "n_local must be an int >= 1 or None, got 0"),
    (lambda: sink_window(-1, 4), ValueError, "n_global must be an int >= 0, got -1"),
    (lambda: documents([0, 3, 8]), TypeError, "AttentionMask.cu_seqlens must be a torch.Tensor, got [0, 3, 8] (list)"),
    (lambda: documents(np.array([0, 3, 8])), TypeError, "cu_seqlens must be a torch.Tensor"),
    (lambda: documents(torch.tensor([0.0, 3.0, 8.0])), ValueError, "1-D int32/int64 tensor"),
    (lambda: documents(torch.tensor([[0, 3, 8]])), ValueError, "1-D int32/int64 tensor"),
    (lambda: documents(torch.tensor([0, 1], dtype=torch.bool)), ValueError, "1-D int32/int64 tensor"),
    (lambda: shared_prefix([[1, 2]]), TypeError, "AttentionMask.prefix_segments must be a torch.Tensor"),
    (lambda: shared_prefix(torch.tensor([[1.0, 2.0]])), ValueError, "int tensor [rows_or_docs, 2]"),
    (lambda: shared_prefix(torch.tensor([1, 2])), ValueError, "int tensor [rows_or_docs, 2]"),
    (lambda: shared_prefix(torch.tensor([[[1, 2]]])), ValueError, "int tensor [rows_or_docs, 2]"),
    (lambda: AttentionMask(causal="no"), TypeError, "AttentionMask.causal must be a bool (True or False), got 'no'"),
    (lambda: AttentionMask(causal=1), TypeError, "causal must be a bool (True or False), got 1 (int)"),
    (lambda: AttentionMask(causal=False), ValueError, "only causal masks are supported"),
    (lambda: AttentionMask(n_global=2), ValueError, "only makes sense together with a window"),
])
def test_mask_rejects(build, exc: type[Exception], message: str) -> None:  # noqa: ANN001
    with pytest.raises(exc) as e:
        build()
    assert message in str(e.value)


def test_mask_accepts_and_normalises_integer_scalars() -> None:
    m = sink_window(np.int64(2), np.int32(8), q_offset=np.int64(3))
    assert (type(m.n_global), type(m.n_local), type(m.q_offset)) == (int, int, int)
    assert (m.n_global, m.n_local, m.q_offset) == (2, 8, 3)
    assert (m & documents(CU.int())).kind == "documents & sink_window(n_global=2, n_local=8)"
    assert (documents(CU) & shared_prefix(SEGS)).dense(1, 8, 8).shape == (1, 1, 8, 8)


def test_masked_attention_rejects_before_running() -> None:
    """A float position fails at the mask, not inside the kernel's custom op."""
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="q_offset must be an int"):
        masked_attention(q, q, q, mask=causal(0.0))


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"scale": "0.1"}, TypeError, "scale"),
    ({"scale": True}, TypeError, "scale"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"impl": 3}, TypeError, "impl"),
    ({"impl": "cuda"}, ValueError, "impl"),
    ({"return_lse": "yes"}, TypeError, "return_lse"),
    ({"deterministic": 1}, TypeError, "deterministic"),
])
def test_masked_attention_checks_its_options(kwargs, exc, message) -> None:  # noqa: ANN001
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(exc, match=message):
        masked_attention(q, q, q, mask=causal(), **kwargs)


def test_masked_attention_checks_shapes_and_dtypes() -> None:
    empty_d = torch.randn(1, 2, 8, 0)
    with pytest.raises(ValueError, match="head dim must be between 1 and 256, got 0"):
        masked_attention(empty_d, empty_d, empty_d, mask=causal())
    ints = torch.ones(1, 2, 8, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match="must be floating point"):
        masked_attention(ints, ints, ints, mask=causal())


def test_fp64_runs_on_the_reference_and_is_refused_by_the_triton_path(monkeypatch) -> None:  # noqa: ANN001
    """fp64 (gradcheck, say) is computed by the reference under impl='auto'; an explicit impl='triton' names the
    fix instead of failing inside the kernel (the interpreter used to die on the backward with a bare assert)."""
    from longkit.kernels import naive_masked_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes the Triton path available for CPU tensors
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with pytest.raises(TypeError, match="fp64 runs on the reference: pass impl='naive'"):
        masked_attention(q, k, v, mask=causal(), impl="triton")
    monkeypatch.setenv("LONGKIT_KERNEL_IMPL", "triton")
    with pytest.raises(TypeError, match="fp64 runs on the reference"):
        masked_attention(q, k, v, mask=causal())
    monkeypatch.delenv("LONGKIT_KERNEL_IMPL")
    out = masked_attention(q, k, v, mask=sink_window(2, 4), impl="auto")
    out.sum().backward()
    want, _ = naive_masked_attention(q.detach(), k.detach(), v.detach(), mask=sink_window(2, 4))
    assert out.dtype == torch.float64 and torch.equal(out.detach(), want) and q.grad is not None
    assert torch.autograd.gradcheck(lambda a, b, c: masked_attention(a, b, c, mask=causal()), (q, k, v))
