"""Public masked attention: validation, dispatch, and the Triton path as a ``torch.library`` custom op.

The Triton path is registered as ``torch.ops.longkit.masked_attention_fwd`` /
``torch.ops.longkit.masked_attention_bwd`` with fake (meta) implementations and autograd, so it works
under ``torch.compile`` without graph breaks. The ops call the host launchers of ``launch.py``, imported (with
Triton) on first use only, so that ``import longkit`` stays free of Triton.
"""

from __future__ import annotations

import math

import torch

from longkit._validate import BUILTIN, check_bool, check_number
from longkit.kernels import envs
from longkit.kernels._dispatch import IMPLS, select_impl
from longkit.kernels.masks import AttentionMask

from .naive import naive_masked_attention

__all__ = ["masked_attention"]

_Tensor = torch.Tensor
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("longkit::masked_attention_fwd", mutates_args=())
def _fwd_op(
    q: _Tensor, k: _Tensor, v: _Tensor, q_global: _Tensor | None, k_global: _Tensor | None,
    cu_seqlens: _Tensor | None, segments: _Tensor | None, q_offset: int, n_global: int, n_local: int,
    scale: float,
) -> tuple[_Tensor, _Tensor]:
    from .launch import flash_masked_attention_fwd  # here, not at the top: Triton loads on first use

    return flash_masked_attention_fwd(q, k, v, q_global, k_global, cu_seqlens, segments, q_offset,
                                      n_global, n_local, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, q_global, k_global, cu_seqlens, segments, q_offset, n_global, n_local, scale):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("longkit::masked_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: _Tensor, grad_lse: _Tensor | None, q: _Tensor, k: _Tensor, v: _Tensor, out: _Tensor,
    lse: _Tensor, q_global: _Tensor | None, k_global: _Tensor | None, cu_seqlens: _Tensor | None,
    segments: _Tensor | None, q_offset: int, n_global: int, n_local: int, scale: float,
) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    from .launch import flash_masked_attention_bwd  # Triton loads on first use

    dq, dk, dv, dqg, dkg = flash_masked_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, q_global, k_global, cu_seqlens, segments, q_offset,
        n_global, n_local, scale)
    empty = q.new_empty(0)
    return dq, dk, dv, (dqg if dqg is not None else empty), (dkg if dkg is not None else empty.clone())


@_bwd_op.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, q_global, k_global, cu_seqlens, segments,  # noqa: ANN001, ANN202
              q_offset, n_global, n_local, scale):
    dqg = q.new_empty(q_global.shape) if q_global is not None else q.new_empty(0)
    dkg = q.new_empty(k_global.shape) if k_global is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dqg, dkg


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, q_global, k_global, cu_seqlens, segments, q_offset, n_global, n_local, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_global, k_global, cu_seqlens, segments)
    ctx.params = (q_offset, n_global, n_local, scale)


def _backward(ctx, grad_out, grad_lse):  # noqa: ANN001, ANN202
    q, k, v, out, lse, q_global, k_global, cu_seqlens, segments = ctx.saved_tensors
    q_offset, n_global, n_local, scale = ctx.params
    dq, dk, dv, dqg, dkg = torch.ops.longkit.masked_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, q_global, k_global, cu_seqlens, segments, q_offset,
        n_global, n_local, scale)
    return (dq, dk, dv, dqg if q_global is not None else None, dkg if k_global is not None else None,
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- validation
def _validate(q: _Tensor, k: _Tensor, v: _Tensor, mask: AttentionMask, q_global: _Tensor | None,
              k_global: _Tensor | None) -> None:
    if not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask (see longkit.kernels.causal etc.), got {type(mask)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{name} must be a rank-4 tensor [B, H, T, D], got {got}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must be floating point ({', '.join(str(d) for d in _DTYPES)}), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k [B, Hkv, Tk, D] must match q's batch {B} and head dim {D}, got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim must be between 1 and 256, got {D}")
    mask.check(B, Tq, k.shape[2])
    if (q_global is None) != (k_global is None):
        raise ValueError("q_global and k_global must be given together")
    if q_global is not None:
        if mask.n_global <= 0 or mask.n_local is None:
            raise ValueError(f"q_global/k_global need a sink_window mask with n_global > 0, got mask {mask.kind}")
        if mask.cu_seqlens is not None:
            raise NotImplementedError("q_global/k_global (distance limit) with documents(cu_seqlens) is not supported")
        if tuple(q_global.shape) != tuple(q.shape):
            raise ValueError(f"q_global must have q's shape {tuple(q.shape)}, got {tuple(q_global.shape)}")
        want = (B, Hkv, mask.n_global, D)
        if tuple(k_global.shape) != want:
            raise ValueError(f"k_global must have shape [B, Hkv, n_global, D] = {want}, got {tuple(k_global.shape)}")
        for name, t in (("q_global", q_global), ("k_global", k_global)):
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must match q's dtype/device ({q.dtype}, {q.device}), got "
                                 f"({t.dtype}, {t.device})")


# ----------------------------------------------------------------------------- public function
def masked_attention(
    q: _Tensor,
    k: _Tensor,
    v: _Tensor,
    *,
    mask: AttentionMask,
    scale: float | None = None,
    q_global: _Tensor | None = None,
    k_global: _Tensor | None = None,
    return_lse: bool = False,
    impl: str | None = None,
    deterministic: bool = False,
) -> _Tensor | tuple[_Tensor, _Tensor]:
    """Softmax attention under an :class:`~longkit.kernels.masks.AttentionMask`, without materialising it.

    Args:
        q: queries ``[B, Hq, Tq, D]`` (fp16/bf16 on CUDA; fp32 allowed, the Hopper-specific kernels then off;
            fp64 is computed by the reference), query ``i`` at position ``mask.q_offset + i``. Strided views
            (e.g. transformers' ``[B, H, T, D]`` transposes) are fine as long as the last dim is contiguous.
        k: keys ``[B, Hkv, Tk, D]``, ``Hq % Hkv == 0`` (GQA/MQA by index, never repeated), ``D <= 256``.
        v: values ``[B, Hkv, Tk, D]``.
        mask: the visibility rule, e.g. ``causal()``, ``sink_window(4, 4096)``, ``documents(cu_seqlens)``,
            ``documents(cu) & shared_prefix(segments)``. Reuse one mask object across layers and calls: its
            tensors' values are checked (a host-GPU sync) and turned into the kernels' tables once per object,
            and again only if they are modified in place.
        scale: softmax scale; default ``1 / sqrt(D)``.
        q_global: LM-Infinite distance limit: ``[B, Hq, Tq, D]`` queries used for global-branch pairs
            outside the window (key ``j < n_global`` and ``p - j >= n_local``), scored as
            ``q_global[i] · k_global[j]``; needs a ``sink_window`` mask with ``n_global > 0``; not
            supported with ``documents`` (raises ``NotImplementedError``). Receives gradients.
        k_global: ``[B, Hkv, n_global, D]`` keys for those pairs. Receives gradients.
        return_lse: also return the log-sum-exp.
        impl: ``None``/``"auto"`` (Triton on CUDA, naive elsewhere; env ``LONGKIT_KERNEL_IMPL``),
            ``"triton"`` (raises for fp64) or ``"naive"``.
        deterministic: accepted for API stability; the Triton backward is always deterministic
            (no atomics: separate kv-parallel dk/dv and q-parallel dq kernels; where dk/dv are split over
            programs, their fp32 partial sums are added in a fixed order).

    Memory: the Triton backward allocates transient fp32 scratch for split dk/dv: under GQA with ``D <= 64``
    up to ``plan.GQA_SPLIT_BUDGET`` (2 GiB; ``2·B·Hq·Tk·D·4`` bytes when fully split, fewer splits above
    the budget), and a small one for the sink blocks with ``q_global``.

    Returns:
        ``out [B, Hq, Tq, D]`` in ``q.dtype``; with ``return_lse`` also ``lse [B, Hq, Tq]`` (fp32,
        natural log of the sum of ``exp(scale * q·k)`` over visible keys).

    Examples::

        >>> import torch
        >>> from longkit.kernels import masked_attention, sink_window
        >>> q = torch.randn(1, 4, 64, 32); k = v = torch.randn(1, 2, 64, 32)
        >>> masked_attention(q, k, v, mask=sink_window(n_global=4, n_local=16)).shape
        torch.Size([1, 4, 64, 32])
    """
    check_bool("masked_attention", "return_lse", return_lse, errors=BUILTIN)
    check_bool("masked_attention", "deterministic", deterministic, errors=BUILTIN)  # always deterministic
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"masked_attention.impl must be None or one of {list(IMPLS)}, got {impl!r}")
    _validate(q, k, v, mask, q_global, k_global)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = check_number("masked_attention", "scale", scale, min=0, min_exclusive=True, errors=BUILTIN)
    which = select_impl(impl, q.device, "masked_attention")
    if which == "triton" and q.dtype == torch.float64:
        if (impl or envs.kernel_impl()).lower() == "triton":
            raise TypeError("masked_attention: the Triton kernels take fp16, bf16 and fp32; fp64 runs on the "
                            "reference: pass impl='naive' (or 'auto') or cast the inputs to fp32")
        which = "naive"  # auto: fp64 (e.g. gradcheck) is computed by the reference, in fp64
    if which == "naive":
        out, lse = naive_masked_attention(q, k, v, mask=mask, scale=scale, q_global=q_global, k_global=k_global)
    else:
        cu, seg = mask.tensors_on(q.device)
        n_local = mask.n_local if mask.n_local is not None else 0
        out, lse = torch.ops.longkit.masked_attention_fwd(
            q, k, v, q_global, k_global, cu, seg, mask.q_offset, mask.n_global, n_local, scale)
    return (out, lse) if return_lse else out
