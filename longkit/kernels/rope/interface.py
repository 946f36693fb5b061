"""Public RoPE re-rotation: rotate cached (post-RoPE) keys in place by per-token position deltas.

The Triton path is the ``torch.library`` custom op ``torch.ops.longkit.rope_rerotate_`` (it declares that it mutates
``keys``), so ``torch.compile`` and CUDA graphs see the in-place write; it calls ``launch.py``, imported (with
Triton) on first use only, so that ``import longkit`` stays free of Triton.
"""

from __future__ import annotations

import torch

from longkit._validate import BUILTIN, check_bool, check_int
from longkit.kernels._dispatch import IMPLS, select_impl

from .naive import naive_rope_rotate

__all__ = ["rerotate_", "rerotate_range_"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DELTA_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("longkit::rope_rerotate_", mutates_args=("keys",))
def _rerotate_op(keys: torch.Tensor, delta: torch.Tensor | None, inv_freq: torch.Tensor, shift: int,
                 interleaved: bool) -> None:
    from .launch import launch_rerotate  # here, not at the top: Triton loads on first use

    launch_rerotate(keys, delta, inv_freq, shift, interleaved)


@_rerotate_op.register_fake
def _rerotate_fake(keys, delta, inv_freq, shift, interleaved) -> None:  # noqa: ANN001
    return None


# ----------------------------------------------------------------------------- validation
def _check_common(op: str, keys: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool, impl: str | None) -> None:
    check_bool(op, "interleaved", interleaved, errors=BUILTIN)
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"{op}.impl must be None or one of {list(IMPLS)}, got {impl!r}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"{op}: keys must be a rank-4 tensor [B, H, T, D], got {got}")
    if keys.dtype not in _DTYPES:
        raise TypeError(f"{op}: keys must be float16, bfloat16 or float32, got {keys.dtype}")
    B, H, T, D = keys.shape
    if keys.numel() and keys.stride(-1) != 1:
        raise ValueError(f"{op}: keys' last dim must be contiguous (stride 1), got strides {tuple(keys.stride())}; "
                         "slice along B, H or T only, or pass keys.contiguous() and copy the result back")
    if any(s == 0 and n > 1 for s, n in zip(keys.stride(), keys.shape)):
        raise ValueError(f"{op}: keys must not be an expanded view (a stride of 0 makes elements share memory, "
                         f"which would be rotated more than once), got strides {tuple(keys.stride())}")
    if torch.is_grad_enabled() and keys.requires_grad:
        raise RuntimeError(f"{op} rotates a KV cache in place and has no gradient: call it under torch.no_grad() "
                           "on keys that do not require grad")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        got = (f"{tuple(inv_freq.shape)} {inv_freq.dtype}" if isinstance(inv_freq, torch.Tensor)
               else type(inv_freq).__name__)
        raise ValueError(f"{op}: inv_freq must be a 1-D float tensor [D/2] (model.model.rotary_emb.inv_freq), "
                         f"got {got}")
    if D != 2 * inv_freq.numel():
        raise ValueError(f"{op}: keys' head dim D={D} must equal 2 * len(inv_freq) = {2 * inv_freq.numel()} "
                         "(partial rotary embeddings are not supported)")
    if inv_freq.device != keys.device:
        raise ValueError(f"{op}: inv_freq is on {inv_freq.device} but keys are on {keys.device}: move it with "
                         "inv_freq.to(keys.device)")


def _check_delta(keys: torch.Tensor, delta: torch.Tensor) -> None:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"rerotate_: delta must be an integer tensor [B, T] or [T], got {type(delta).__name__}; "
                        "for one shift of a range of tokens use rerotate_range_")
    if delta.dtype not in _DELTA_DTYPES:
        raise TypeError(f"rerotate_: delta must be an integer tensor (position shifts), got {delta.dtype}; "
                        "convert with delta.long() (a float shift is not a whole number of positions)")
    B, _, T, _ = keys.shape
    if tuple(delta.shape) not in ((T,), (B, T)):
        raise ValueError(f"rerotate_: delta must have shape [B, T] = [{B}, {T}] or [T] = [{T}] for keys of shape "
                         f"{tuple(keys.shape)}, got {tuple(delta.shape)}")
    if delta.device != keys.device:
        raise ValueError(f"rerotate_: delta is on {delta.device} but keys are on {keys.device}: move it with "
                         "delta.to(keys.device)")


def _naive_(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool) -> None:
    rotated = naive_rope_rotate(keys, delta, inv_freq, interleaved=interleaved)
    moved = (delta != 0).reshape(-1 if delta.dim() == 2 else 1, 1, keys.shape[2], 1)
    # tokens with delta == 0 keep their bits exactly (the kernel does not touch them either)
    keys.copy_(torch.where(moved, rotated, keys))


# ----------------------------------------------------------------------------- public functions
def rerotate_(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, *, interleaved: bool = False,
              impl: str | None = None) -> torch.Tensor:
    """Rotate post-RoPE ``keys`` in place so a key encoded at position ``p`` becomes the key at ``p + delta``.

    RoPE rotations compose (``R(p + d) = R(d)·R(p)``), so one more rotation moves a cached key; RoPE's attention
    scaling, already in the key, is kept (the rotation is a pure one). The angles are ``fp32(delta) · inv_freq`` in
    fp32, as transformers computes them: pass the (small) shift, not absolute positions. Tokens with ``delta == 0``
    are left bit-identical (the kernel does not read or write them).

    Args:
        keys: ``[B, H, T, D]`` cached keys (fp16/bf16/fp32), modified in place; ``D == 2 * len(inv_freq)``. May be a
            strided view, e.g. ``cache[:, :, start:]``, as long as its last dim is contiguous.
        delta: ``[B, T]`` or ``[T]`` integer position changes (0 leaves a key unchanged; may be negative), on
            ``keys``' device.
        inv_freq: ``[D/2]`` the model's RoPE inverse frequencies (``model.model.rotary_emb.inv_freq``).
        interleaved: pairs are dimensions ``(2i, 2i+1)`` (GPT-J style) instead of transformers' ``(i, i + D/2)``.
        impl: ``None``/``"auto"`` (Triton on CUDA, reference elsewhere; env ``LONGKIT_KERNEL_IMPL``), ``"triton"``
            or ``"naive"``.

    Returns:
        ``keys`` (the same tensor).

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices or strides (checked before anything is written).

    Examples::

        >>> import torch
        >>> from longkit.kernels.rope import naive_rope_rotate, rerotate_
        >>> f = 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)
        >>> x = torch.randn(1, 2, 10, 64)                                  # pre-RoPE keys
        >>> pos = torch.arange(10)
        >>> cache = naive_rope_rotate(x, pos, f)                           # cached at positions 0..9
        >>> _ = rerotate_(cache[:, :, 4:], torch.full((6,), 3), f)          # 3 tokens inserted before token 4
        >>> torch.allclose(cache[:, :, 4:], naive_rope_rotate(x, pos + 3, f)[:, :, 4:], atol=1e-5)
        True
    """
    _check_common("rerotate_", keys, inv_freq, interleaved, impl)
    _check_delta(keys, delta)
    which = select_impl(impl, keys.device, "rerotate_")
    if keys.numel() == 0:
        return keys
    if which == "naive":
        _naive_(keys, delta, inv_freq, interleaved)
    else:
        _rerotate_op(keys, delta, inv_freq, 0, interleaved)
    return keys


def rerotate_range_(keys: torch.Tensor, start: int, end: int | None, shift: int, inv_freq: torch.Tensor, *,
                    interleaved: bool = False, impl: str | None = None) -> torch.Tensor:
    """Rotate tokens ``[start, end)`` of every batch row and head of ``keys`` by the same ``shift`` positions.

    The common edit: after inserting ``n`` tokens (``shift = n``) or deleting ``n`` (``shift = -n``) before token
    ``start``, every later cached key moves by ``shift``. The Triton path runs the same kernel as :func:`rerotate_`
    with the shift as a scalar (no delta tensor is built or read).

    Args:
        keys: ``[B, H, T, D]`` cached keys, as for :func:`rerotate_`, modified in place.
        start: first token to rotate, ``0 <= start <= T``.
        end: one past the last token, ``start <= end <= T``; ``None`` means ``T``.
        shift: position change (a Python int, may be negative; 0 does nothing).
        inv_freq: ``[D/2]`` RoPE inverse frequencies.
        interleaved: pairs ``(2i, 2i+1)`` instead of ``(i, i + D/2)``.
        impl: as for :func:`rerotate_`.

    Returns:
        ``keys`` (the same tensor).

    Examples::

        >>> import torch
        >>> from longkit.kernels.rope import naive_rope_rotate, rerotate_range_
        >>> f = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
        >>> x = torch.randn(2, 4, 12, 16); pos = torch.arange(12)
        >>> cache = naive_rope_rotate(x, pos, f)
        >>> _ = rerotate_range_(cache, 5, None, -2, f)                    # 2 tokens deleted before token 5
        >>> torch.allclose(cache[:, :, 5:], naive_rope_rotate(x, pos - 2, f)[:, :, 5:], atol=1e-5)
        True
    """
    _check_common("rerotate_range_", keys, inv_freq, interleaved, impl)
    T = keys.shape[2]
    start = check_int("rerotate_range_", "start", start, min=0, max=T, errors=BUILTIN)
    end = check_int("rerotate_range_", "end", end, min=start, max=T, allow_none=True,
                    want=f"None or an int in [start={start}, T={T}]", errors=BUILTIN)
    end = T if end is None else end
    shift = check_int("rerotate_range_", "shift", shift, min=-(2 ** 31), max=2 ** 31 - 1, errors=BUILTIN)
    which = select_impl(impl, keys.device, "rerotate_range_")
    view = keys[:, :, start:end]
    if shift == 0 or view.numel() == 0:
        return keys
    if which == "naive":
        _naive_(view, torch.full((end - start,), shift, dtype=torch.int64, device=keys.device), inv_freq,
                interleaved)
    else:
        _rerotate_op(view, None, inv_freq, shift, interleaved)
    return keys
