"""Public linear-attention functions: validation, dispatch, and the Triton path's autograd.

Scalar-decay linear attention runs the chunked Triton kernels on CUDA tensors (``launch.py``, imported with Triton on
first use, so ``import longkit`` stays free of Triton) and the chunked PyTorch code of ``naive.py`` elsewhere. The
gated delta rule and both LASP-2 summaries run in PyTorch on every device (see each docstring for why).

The Triton path is a ``torch.autograd.Function`` and the public functions are ``torch.compiler.disable``-d: inside a
compiled model they run eagerly (a graph break), not as registered custom ops.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import torch

from longkit._validate import BUILTIN, check_bool, check_int, check_number
from longkit.kernels._dispatch import IMPLS, select_impl

from .naive import (
    acc_dtype,
    as_log_gates,
    chunk_gated_delta_rule_torch,
    chunk_linear_attention_torch,
    gated_delta_summary_torch,
    l2norm,
    linear_attention_summary_torch,
)

__all__ = ["linear_attention", "linear_attention_summary", "gated_delta_rule", "gated_delta_summary"]

_Tensor = torch.Tensor
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNKS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------- validation
def _shape(t: Any) -> str:  # noqa: ANN401
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_kv(op: str, k: _Tensor, v: _Tensor, q: _Tensor | None = None) -> tuple[int, int, int, int, int]:
    """q (optional), k ``[B, H, T, Dk]`` and v ``[B, H, T, Dv]``: ranks, one dtype, one device. Returns the sizes."""
    named = (("q", q), ("k", k), ("v", v)) if q is not None else (("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            want = "[B, H, T, Dv]" if name == "v" else "[B, H, T, Dk]"
            raise ValueError(f"{op}: {name} must be a rank-4 tensor {want} (heads before time; transpose "
                             f"transformers' [B, T, H, D] with .transpose(1, 2)), got {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    tensors = [t for _, t in named]
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"{op}: " + ", ".join(n for n, _ in named) + " must share one dtype, got "
                        + ", ".join(str(t.dtype) for t in tensors) + "; cast them to one dtype")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: " + ", ".join(n for n, _ in named) + " must be on one device, got "
                         + ", ".join(str(t.device) for t in tensors))
    B, H, T, Dk = k.shape
    if q is not None and q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have the same shape [B, H, T, Dk], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)} (grouped heads are not supported: repeat k to q's heads first)")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"{op}: v must be [B, H, T, Dv] with B, H, T = {B}, {H}, {T} as in k {tuple(k.shape)}, "
                         f"got {tuple(v.shape)}")
    Dv = v.shape[3]
    for name, d in (("Dk", Dk), ("Dv", Dv)):
        if not 1 <= d <= 256:
            raise ValueError(f"{op}: head dim {name} must be between 1 and 256, got {d}")
    return B, H, T, Dk, Dv


def _check_gates(op: str, name: str, g: Any, B: int, H: int, T: int, device: torch.device,  # noqa: ANN401
                 allow_per_head: bool, nonpositive: bool) -> None:
    shapes = f"[H] = [{H}] or [B, H, T] = [{B}, {H}, {T}]" if allow_per_head else f"[B, H, T] = [{B}, {H}, {T}]"
    if not isinstance(g, torch.Tensor) or not g.is_floating_point():
        got = f"{_shape(g)} {g.dtype}" if isinstance(g, torch.Tensor) else type(g).__name__
        raise TypeError(f"{op}: {name} must be a floating-point tensor of shape {shapes}, got {got}")
    ok = (tuple(g.shape) == (B, H, T)) or (allow_per_head and tuple(g.shape) == (H,))
    if not ok:
        raise ValueError(f"{op}: {name} must have shape {shapes}, got {tuple(g.shape)}")
    if g.device != device:
        raise ValueError(f"{op}: {name} is on {g.device} but the inputs are on {device}: move it with "
                         f"{name}.to(q.device)")
    # a value check reads the tensor (one host sync on CUDA); skipped while compiling or capturing a CUDA graph
    if g.numel() == 0 or torch.compiler.is_compiling() or (g.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if nonpositive:
        bad = ~(torch.isfinite(g) & (g <= 0))
        if bool(bad.any()):
            raise ValueError(f"{op}: {name} must be finite and <= 0 (a log decay: the state is multiplied by "
                             f"exp({name}) <= 1), got {g[bad].flatten()[:5].tolist()} (first offending values); "
                             "e.g. pass -slope for a decay rate slope > 0, or -softplus(x) for a learned gate")
    elif not bool(torch.isfinite(g).all()):
        raise ValueError(f"{op}: {name} must be finite, got NaN or infinity")


def _check_state(op: str, s: Any, B: int, H: int, Dk: int, Dv: int, device: torch.device) -> None:  # noqa: ANN401
    if s is None:
        return
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise TypeError(f"{op}: initial_state must be None or a float tensor [B, H, Dk, Dv], got {_shape(s)}")
    if tuple(s.shape) != (B, H, Dk, Dv):
        raise ValueError(f"{op}: initial_state must have shape [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}], "
                         f"got {tuple(s.shape)}")
    if s.device != device:
        raise ValueError(f"{op}: initial_state is on {s.device} but the inputs are on {device}")


def _check_common(op: str, scale: Any, output_final_state: Any, chunk_size: Any,  # noqa: ANN401
                  allow_none_scale: bool) -> float | None:
    check_bool(op, "output_final_state", output_final_state, errors=BUILTIN)
    size = check_int(op, "chunk_size", chunk_size, min=16, max=128, want=f"one of {list(_CHUNKS)}", errors=BUILTIN)
    if size not in _CHUNKS:
        raise ValueError(f"{op}.chunk_size must be one of {list(_CHUNKS)} (a power of two the kernels tile by), "
                         f"got {size}")
    if scale is None and allow_none_scale:
        return None
    if isinstance(scale, torch.Tensor) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}.scale must be a Python float{' or None' if allow_none_scale else ''}, got "
                        f"{type(scale).__name__}")
    return check_number(op, "scale", scale, errors=BUILTIN)


def _compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, created on the first call (the decorator imports ``torch._dynamo``, which
    ``import longkit`` must not)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- Triton autograd
class _ChunkLinearAttnFunction(torch.autograd.Function):
    """Triton chunked linear attention with per-token log gates ``g [B, H, T]`` (fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, output_final_state, chunk_size):  # noqa: ANN001, ANN205
        from .launch import chunk_linear_attn_fwd  # here, not at the top: Triton loads on first use

        g = g.float().contiguous()
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = chunk_linear_attn_fwd(q, k, v, g, h0, scale, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.params = (scale, chunk_size, initial_state is not None,
                      initial_state.dtype if initial_state is not None else None)
        if ht is not None:
            return o, ht
        return o, o.new_empty(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, do, dht):  # noqa: ANN001, ANN205
        from .launch import chunk_linear_attn_bwd

        q, k, v, g, h0 = ctx.saved_tensors
        scale, chunk_size, has_h0, h0_dtype = ctx.params
        dht = dht if (dht is not None and dht.numel()) else None
        dq, dk, dv, dg, dh0 = chunk_linear_attn_bwd(q, k, v, g, h0, do, dht, scale, chunk_size)
        dh0 = dh0.to(h0_dtype) if has_h0 else None
        return dq, dk, dv, dg, dh0, None, None, None


# ----------------------------------------------------------------------------- public functions
@_compile_disabled
def linear_attention(q: _Tensor, k: _Tensor, v: _Tensor, log_decay: _Tensor, scale: float = 1.0,
                     initial_state: _Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
                     *, impl: str | None = None) -> tuple[_Tensor, _Tensor | None]:
    """Causal linear attention with a scalar decay per head (or per token): lightning attention, RetNet, simple GLA.

    ``S_t = exp(g_t) S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t`` (token ``t`` sees itself), with ``g_t =
    log_decay[h]`` for a constant per-head decay or ``g_t = log_decay[b, h, t]`` for per-token gates (simple GLA).
    The state is fp32; the output has ``q``'s dtype. No normalisation, feature map or output gate is applied: those
    belong to the layer. MiniMax's lightning attention is ``log_decay = -slope`` (its per-head, per-layer slope
    rate) with ``scale=1.0``.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (fp16, bf16 or fp32, one dtype and device; fp64 runs the
            PyTorch path in fp64, for gradcheck). transformers' ``[B, T, H, D]`` tensors are passed as
            ``x.transpose(1, 2)`` views.
        log_decay: ``[H]`` or ``[B, H, T]``, finite and ``<= 0`` (checked, one host sync on CUDA); gradients flow
            to it in either shape.
        scale: output scale (``1.0``: none, as MiniMax).
        initial_state: ``[B, H, Dk, Dv]`` state before token 0, or ``None`` for zeros; gets a gradient.
        output_final_state: return the state after the last token (``[B, H, Dk, Dv]`` fp32, differentiable).
        chunk_size: 16, 32, 64 or 128, the block the chunked algorithm works in (results agree up to rounding).
        impl: ``None``/``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere; env ``LONGKIT_KERNEL_IMPL``),
            ``"triton"`` or ``"naive"`` (the chunked PyTorch path).

    Returns:
        ``(o [B, H, T, Dv], final_state or None)``.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, a positive or non-finite ``log_decay``.

    Examples::

        >>> import torch
        >>> from longkit.kernels.linear_attn import linear_attention, naive_linear_attention
        >>> q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
        >>> log_decay = -torch.tensor([0.1, 0.01])
        >>> o, s = linear_attention(q, k, v, log_decay, output_final_state=True)
        >>> o_ref, s_ref = naive_linear_attention(q, k, v, log_decay, output_final_state=True)
        >>> torch.allclose(o, o_ref, atol=1e-4), torch.allclose(s, s_ref, atol=1e-4)
        (True, True)
    """
    op = "linear_attention"
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"{op}.impl must be None or one of {list(IMPLS)}, got {impl!r}")
    B, H, T, Dk, Dv = _check_kv(op, k, v, q)
    scale = _check_common(op, scale, output_final_state, chunk_size, allow_none_scale=False)
    _check_gates(op, "log_decay", log_decay, B, H, T, q.device, allow_per_head=True, nonpositive=True)
    _check_state(op, initial_state, B, H, Dk, Dv, q.device)
    which = select_impl(impl, q.device, op)
    if which == "triton" and q.dtype == torch.float64:
        if impl is not None:
            raise TypeError(f"{op}: the Triton kernels take float16, bfloat16 or float32, got float64; "
                            "use impl='naive' for float64")
        which = "naive"
    if T == 0 or which == "naive":
        return chunk_linear_attention_torch(q, k, v, log_decay, scale, initial_state, output_final_state, chunk_size)
    g = as_log_gates(log_decay, B, H, T)
    o, ht = _ChunkLinearAttnFunction.apply(q, k, v, g, initial_state, scale, output_final_state, chunk_size)
    return o, (ht if output_final_state else None)


@_compile_disabled
def linear_attention_summary(k: _Tensor, v: _Tensor, log_decay: _Tensor) -> tuple[_Tensor, _Tensor]:
    """The LASP-2 summary of one rank's chunk for :func:`linear_attention`: ``(state, total)``.

    ``state [B, H, Dk, Dv]`` (fp32) is the state the chunk leaves from a zero initial state and ``total [B, H]``
    (fp32) is the sum of the chunk's log decays, so ``S_end = exp(total)[..., None, None] * S_in + state`` for any
    incoming state ``S_in``. One decayed ``k^T v`` matmul in PyTorch on every device (a kernel would do the same
    work); differentiable in ``k``, ``v`` and ``log_decay``.

    Args:
        k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``.
        log_decay: ``[H]`` or ``[B, H, T]``, ``<= 0``, as for :func:`linear_attention`.

    Returns:
        ``(state [B, H, Dk, Dv] fp32, total [B, H] fp32)``.
    """
    op = "linear_attention_summary"
    B, H, T, _, _ = _check_kv(op, k, v)
    _check_gates(op, "log_decay", log_decay, B, H, T, k.device, allow_per_head=True, nonpositive=True)
    return linear_attention_summary_torch(k, v, log_decay)


@_compile_disabled
def gated_delta_rule(q: _Tensor, k: _Tensor, v: _Tensor, g: _Tensor, beta: _Tensor, scale: float | None = None,
                     initial_state: _Tensor | None = None, output_final_state: bool = False, chunk_size: int = 64,
                     use_qk_l2norm: bool = False) -> tuple[_Tensor, _Tensor | None]:
    """Gated delta rule (Gated DeltaNet; Qwen3-Next / Qwen3.5 linear layers), chunked, with autograd.

    ``S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t`` and ``o_t = scale * q_t S_t``; with
    ``use_qk_l2norm`` q and k are l2-normalised first (``x * rsqrt(sum(x^2) + 1e-6)``, in fp32). This is the math of
    transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` (``scale=None`` is their
    fixed ``Dk ** -0.5``; ``use_qk_l2norm`` is their ``use_qk_l2norm_in_kernel``; ``chunk_size`` default 64). Only
    the layout differs: here heads come before time (``[B, H, T, D]`` and ``[B, H, T]``), there ``[B, T, H, D]``
    and ``[B, T, H]``; the state is ``[B, H, Dk, Dv]`` in both.

    There is no Triton kernel for this op yet: the chunked PyTorch path (fp32, one triangular solve per chunk)
    runs on every device, CUDA included, and ``LONGKIT_KERNEL_IMPL`` does not apply to it.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]`` (one float dtype and device; grouped q/k heads must be
            repeated to v's heads first, as transformers does before calling its kernel).
        g: ``[B, H, T]`` log gates, finite and ``<= 0``. beta: ``[B, H, T]`` write strengths (usually in (0, 1)).
        scale: output scale; ``None`` means ``Dk ** -0.5``.
        initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros); gets a gradient.
        output_final_state: also return the final state ``[B, H, Dk, Dv]`` (fp32).
        chunk_size: 16, 32, 64 or 128.
        use_qk_l2norm: l2-normalise q and k inside (gradients flow through the normalisation).

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, final_state or None)``.
    """
    op = "gated_delta_rule"
    B, H, T, Dk, Dv = _check_kv(op, k, v, q)
    scale = _check_common(op, scale, output_final_state, chunk_size, allow_none_scale=True)
    check_bool(op, "use_qk_l2norm", use_qk_l2norm, errors=BUILTIN)
    _check_gates(op, "g", g, B, H, T, q.device, allow_per_head=False, nonpositive=True)
    _check_gates(op, "beta", beta, B, H, T, q.device, allow_per_head=False, nonpositive=False)
    _check_state(op, initial_state, B, H, Dk, Dv, q.device)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size,
                                        use_qk_l2norm)


@_compile_disabled
def gated_delta_summary(k: _Tensor, v: _Tensor, g: _Tensor, beta: _Tensor, *, chunk_size: int = 64,
                        use_qk_l2norm: bool = False) -> tuple[_Tensor, _Tensor]:
    """The LASP-2 summary of one rank's chunk for :func:`gated_delta_rule`: ``(state, A)``.

    ``state [B, H, Dk, Dv]`` (fp32) is the state the chunk leaves from a zero initial state and ``A [B, H, Dk, Dk]``
    (fp32) its transition, ``A = M_T ... M_1`` with ``M_t = exp(g_t) (I - beta_t k_t^T k_t)``, so ``S_end = A @ S_in
    + state`` for any incoming ``S_in``. Chunked PyTorch on every device; differentiable in ``k``, ``v``, ``g``,
    ``beta``.

    Args:
        k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``; g, beta: ``[B, H, T]`` as for :func:`gated_delta_rule`.
        chunk_size: 16, 32, 64 or 128.
        use_qk_l2norm: l2-normalise k first (pass the same value as to :func:`gated_delta_rule`).

    Returns:
        ``(state [B, H, Dk, Dv] fp32, A [B, H, Dk, Dk] fp32)``.
    """
    op = "gated_delta_summary"
    B, H, T, _, _ = _check_kv(op, k, v)
    _check_common(op, 1.0, False, chunk_size, allow_none_scale=False)
    check_bool(op, "use_qk_l2norm", use_qk_l2norm, errors=BUILTIN)
    _check_gates(op, "g", g, B, H, T, k.device, allow_per_head=False, nonpositive=True)
    _check_gates(op, "beta", beta, B, H, T, k.device, allow_per_head=False, nonpositive=False)
    if use_qk_l2norm:
        k = l2norm(k.to(acc_dtype(k)))
    return gated_delta_summary_torch(k, v, g, beta, chunk_size)
