"""Public quantized-KV functions: validation, dispatch (Triton for CUDA tensors, ``naive`` elsewhere).

The Triton paths call ``launch.py``, imported (with Triton) on first use only, so ``import longkit`` stays free of
Triton. The functions are not ``torch.library`` custom ops yet: each public function is wrapped in
``torch.compiler.disable`` (``torch.compile`` runs it eagerly, as a graph break). None of them has a gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from longkit._validate import BUILTIN, check_bool, check_int, check_number
from longkit.kernels._dispatch import IMPLS, select_impl

from . import naive
from .packed import PackedKV
from .spec import KVQuantSpec
from .state import KVQuantState

__all__ = [
    "quantize_kv",
    "dequantize_kv",
    "quantized_decode_attention",
    "quantized_prefill_attention",
    "merge_attention_states",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- validation
def _shape(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_impl(op: str, impl: str | None) -> None:
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"{op}.impl must be None or one of {list(IMPLS)}, got {impl!r}")


def _check_spec_state(op: str, spec: KVQuantSpec, state: KVQuantState, device: torch.device | None = None) -> None:
    """Types and agreement of spec and state; with ``device``, also that the state's tensors live there."""
    if not isinstance(spec, KVQuantSpec):
        raise TypeError(f"{op}: spec must be a KVQuantSpec, got {type(spec).__name__}")
    if not isinstance(state, KVQuantState):
        raise TypeError(f"{op}: state must be a KVQuantState (KVQuantState.create(spec, head_dim, num_kv_heads, "
                        f"device)), got {type(state).__name__}")
    if state.spec != spec:
        raise ValueError(f"{op}: state was created for {state.spec}, not for {spec}: use the state of this spec")
    for name in ("key_signs", "value_signs", "qjl_matrix", "key_channels"):
        t = getattr(state, name)
        if device is not None and t is not None and t.device != device:
            raise ValueError(f"{op}: state.{name} is on {t.device} but the tensors are on {device}: use "
                             f"state.to({str(device)!r})")


def _check_packed(op: str, packed: PackedKV, spec: KVQuantSpec, state: KVQuantState, B: int, device: torch.device
                  ) -> None:
    if not isinstance(packed, PackedKV):
        raise TypeError(f"{op}: packed must be a PackedKV, got {type(packed).__name__}")
    if packed.spec != spec:
        raise ValueError(f"{op}: packed was built for {packed.spec}, not for {spec}")
    if packed.layout.head_dim != state.head_dim or packed.num_kv_heads != state.num_kv_heads:
        raise ValueError(f"{op}: packed holds {packed.num_kv_heads} KV heads of dim {packed.layout.head_dim}, the "
                         f"state {state.num_kv_heads} of dim {state.head_dim}")
    if packed.batch != B:
        raise ValueError(f"{op}: packed has batch {packed.batch}, the inputs {B}")
    if packed.device != device:
        raise ValueError(f"{op}: packed is on {packed.device} but the inputs are on {device}")


def _check_kv(op: str, k: torch.Tensor, v: torch.Tensor, state: KVQuantState) -> None:
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a rank-4 tensor [B, Hkv, T, D], got {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(f"{op}: k and v must have the same shape, dtype and device, got {_shape(k)} on {k.device} "
                         f"and {_shape(v)} on {v.device}")
    _, H, _, D = k.shape
    if H != state.num_kv_heads or D != state.head_dim:
        raise ValueError(f"{op}: k has {H} heads of dim {D} but the state was created for {state.num_kv_heads} "
                         f"heads of dim {state.head_dim}")


def _check_lengths(op: str, lengths: torch.Tensor | None, B: int, device: torch.device) -> None:
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in _INT_DTYPES or tuple(lengths.shape) != (B,):
        raise ValueError(f"{op}: lengths must be an int32/int64 tensor [B] = [{B}] (valid tokens per row), got "
                         f"{_shape(lengths)}")
    if lengths.device != device:
        raise ValueError(f"{op}: lengths is on {lengths.device} but the inputs are on {device}")


def _check_query(op: str, q: torch.Tensor, packed: PackedKV, state: KVQuantState) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must be a rank-4 tensor [B, Hq, Tq, D], got {_shape(q)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"{op}: q must be float16, bfloat16 or float32, got {q.dtype}")
    _, Hq, _, D = q.shape
    if D != state.head_dim:
        raise ValueError(f"{op}: q's head dim {D} != the cache's {state.head_dim}")
    if Hq % state.num_kv_heads:
        raise ValueError(f"{op}: q's {Hq} heads must be a multiple of the cache's {state.num_kv_heads} KV heads "
                         "(GQA)")


def _scale(op: str, scale: float | None, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    return check_number(op, "scale", scale, min=0, min_exclusive=True, errors=BUILTIN)


def _which(op: str, impl: str | None, device: torch.device) -> str:
    _check_impl(op, impl)
    return select_impl(impl, device, op)


# ----------------------------------------------------------------------------- public functions
def _compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, created on the first call: the decorator imports ``torch._dynamo`` (and with it
    Triton), which ``import longkit`` must not."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


@_compile_disabled
@torch.no_grad()
def quantize_kv(k: torch.Tensor, v: torch.Tensor, spec: KVQuantSpec, state: KVQuantState, *,
                out: PackedKV | None = None, start: int | torch.Tensor = 0, impl: str | None = None) -> PackedKV:
    """Quantize a block of post-RoPE keys and values and write it into a packed cache (quantize-on-write).

    Per token and KV head: keep the state's key channels, rotate keys and values (``spec.rotate``), quantize in
    groups, pack, and (``spec.qjl``) sketch the key residual. One record per token and head is written
    (``spec.py``), so appending is a write of ``T`` records per row and head; nothing else in ``out`` changes.

    Args:
        k: ``[B, Hkv, T, D]`` keys (fp16/bf16/fp32; any strides).
        v: ``[B, Hkv, T, D]`` values.
        spec: the cache's :class:`KVQuantSpec`.
        state: its :class:`KVQuantState` (same spec, ``head_dim = D``, ``num_kv_heads = Hkv``, on k's device).
        out: the cache to write into (e.g. a :meth:`PackedKV.allocate` buffer); ``None`` allocates one of ``T``
            slots (raw 16-bit fields in k's dtype, fp16 for fp32 input).
        start: first slot written: an int (every row) or an int tensor ``[B]`` (one per row, e.g. each sequence's
            current length). Slots ``[start, start + T)`` must fit in ``out``; an int ``start`` is checked, tensor
            values are checked on the reference path only (the Triton kernel drops writes past the capacity,
            so a CUDA graph may capture it). With ``key_axis="channel"`` ``start`` must be an int and ``start`` and
            ``T`` multiples of ``group_size``.
        impl: ``None``/``"auto"`` (Triton on CUDA, reference elsewhere; env ``LONGKIT_KERNEL_IMPL``), ``"triton"``
            or ``"naive"``.

    Returns:
        ``out`` (or the new cache).

    Examples::

        >>> import torch
        >>> from longkit.kernels.kv_quant import KVQuantSpec, KVQuantState, PackedKV, quantize_kv
        >>> spec = KVQuantSpec(key_bits=3, value_bits=3)
        >>> state = KVQuantState.create(spec, head_dim=64, num_kv_heads=2)
        >>> cache = PackedKV.allocate(spec, batch=1, num_kv_heads=2, max_tokens=128, head_dim=64)
        >>> k = v = torch.randn(1, 2, 10, 64)
        >>> quantize_kv(k, v, spec, state, out=cache, start=0) is cache
        True
    """
    op = "quantize_kv"
    _check_spec_state(op, spec, state)
    _check_kv(op, k, v, state)
    _check_spec_state(op, spec, state, k.device)
    B, H, T, D = k.shape
    g = spec.group_size
    if out is not None:
        _check_packed(op, out, spec, state, B, k.device)
    cap = out.num_tokens if out is not None else T
    if isinstance(start, torch.Tensor):
        if spec.key_axis == "channel":
            raise NotImplementedError("quantize_kv: a per-row start tensor with key_axis='channel' is not supported: "
                                      "write whole token groups at one int start")
        if start.dtype not in _INT_DTYPES or tuple(start.shape) != (B,) or start.device != k.device:
            raise ValueError(f"{op}: start must be an int or an int32/int64 tensor [B] = [{B}] on {k.device}, got "
                             f"{_shape(start)}")
        if out is None:
            raise ValueError(f"{op}: a start tensor needs out= (the cache to write into)")
    else:
        if out is None and not (isinstance(start, int) and start == 0):
            raise ValueError(f"{op}: start={start!r} needs out= (without it a new cache of T slots is returned)")
        start = check_int(op, "start", start, min=0, max=cap - T, errors=BUILTIN,
                          want=f"an int in [0, capacity - T] = [0, {cap - T}] (T={T} tokens into {cap} slots)")
    if spec.key_axis == "channel" and (T % g or start % g):
        raise ValueError(f"{op}: key_axis='channel' quantizes keys over groups of group_size={g} tokens: T and "
                         f"start must be multiples of {g}, got T={T}, start={start}; keep the tokens of an "
                         "unfinished group in full precision until it is complete")
    if state.prunes and state.key_channels is None:
        naive._kept(state)  # raises with the fix
    which = _which(op, impl, k.device)
    if which == "naive":
        if isinstance(start, torch.Tensor) and T:  # checked without a host read op (a step stays capture-clean)
            msg = f"{op}: start values must lie in [0, capacity - T] = [0, {cap - T}] (T={T} tokens into {cap} slots)"
            try:  # raises here on CPU; on CUDA a device-side assert
                torch._assert_async(((start >= 0) & (start <= cap - T)).all(), msg)
            except RuntimeError:
                raise ValueError(msg) from None
        return naive.naive_quantize_kv(k, v, spec, state, out=out, start=start)
    from .launch import launch_quantize  # Triton loads on first use

    if out is None:
        out = PackedKV.allocate(spec, B, H, T, D, device=k.device, raw_dtype=naive.default_raw_dtype(k.dtype))
    if T:
        launch_quantize(k, v, spec, state, out, start)
    return out


@_compile_disabled
@torch.no_grad()
def dequantize_kv(packed: PackedKV, spec: KVQuantSpec, state: KVQuantState, *, rotated: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's keys and values in fp32 (reference and debugging; plain PyTorch on every device).

    Args:
        packed: the cache; spec, state: its spec and state.
        rotated: return them as stored (keys ``[B, Hkv, T, Dk]``: kept channels, rotated; values rotated) instead
            of in the input space.

    Returns:
        ``(k, v)``: ``[B, Hkv, T, D]`` each (pruned key channels are 0), or as stored with ``rotated=True``.
    """
    check_bool("dequantize_kv", "rotated", rotated, errors=BUILTIN)
    if not isinstance(packed, PackedKV):
        raise TypeError(f"dequantize_kv: packed must be a PackedKV, got {type(packed).__name__}")
    _check_spec_state("dequantize_kv", spec, state, packed.device)
    _check_packed("dequantize_kv", packed, spec, state, packed.batch, packed.device)
    if state.prunes and not rotated:
        naive._kept(state)
    return naive.naive_dequantize_kv(packed, spec, state, rotated=rotated)


@_compile_disabled
@torch.no_grad()
def quantized_decode_attention(q: torch.Tensor, packed: PackedKV, spec: KVQuantSpec, state: KVQuantState,
                               scale: float | None = None, lengths: torch.Tensor | None = None, *,
                               causal: bool = True, return_lse: bool = False, num_splits: int | None = None,
                               impl: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of a few queries over the packed cache, read directly (decode).

    The query is projected to the kept key channels and rotated like the keys (in PyTorch, ``O(D log D)``); the
    kernel dequantizes key and value tiles in registers (no dequantized copy in memory), adds the QJL estimate to
    the scores, runs an fp32 online softmax over splits of the context (split-K, several query heads of a KV head
    per program), and a second kernel combines the splits; the output is rotated back.

    Args:
        q: ``[B, Hq, Tq, D]`` post-RoPE queries (fp16/bf16/fp32), ``Hq`` a multiple of the cache's KV heads.
            Meant for small ``Tq`` (decode, speculative verification); a chunk of a long prompt works too.
        packed: the cache (``T`` slots).
        spec, state: its spec and state.
        scale: softmax scale, default ``1 / sqrt(D)``.
        lengths: int ``[B]`` valid tokens per row (slots ``>= lengths[b]`` are ignored; values above ``T`` act as
            ``T``); ``None`` = all ``T`` slots.
        causal: the queries are the last ``Tq`` of the ``lengths[b]`` cached tokens: query ``i`` sees slots
            ``j <= lengths[b] - Tq + i``. ``False``: every query sees all ``lengths[b]`` slots (the cache holds
            only earlier tokens, e.g. a full-precision recent window is attended separately).
        return_lse: also return the natural-log log-sum-exp of the scaled scores (fp32), to merge with attention
            over other keys (:func:`merge_attention_states`).
        num_splits: context splits per (row, KV head) (Triton); ``None`` picks them from the GPU's size.
        impl: ``None``/``"auto"``, ``"triton"`` or ``"naive"``.

    Returns:
        ``out [B, Hq, Tq, D]`` in ``q.dtype``; with ``return_lse`` also ``lse [B, Hq, Tq]``. A query with no
        visible slot gets ``out = 0`` and ``lse = -inf``.

    Examples::

        >>> import torch
        >>> from longkit.kernels.kv_quant import (KVQuantSpec, KVQuantState, quantize_kv,
        ...                                       quantized_decode_attention)
        >>> spec = KVQuantSpec(key_bits=4, value_bits=4, qjl=True)
        >>> state = KVQuantState.create(spec, head_dim=64, num_kv_heads=2)
        >>> k = v = torch.randn(1, 2, 50, 64)
        >>> cache = quantize_kv(k, v, spec, state)
        >>> quantized_decode_attention(torch.randn(1, 8, 1, 64), cache, spec, state).shape
        torch.Size([1, 8, 1, 64])
    """
    op = "quantized_decode_attention"
    check_bool(op, "causal", causal, errors=BUILTIN)
    check_bool(op, "return_lse", return_lse, errors=BUILTIN)
    num_splits = check_int(op, "num_splits", num_splits, min=1, max=4096, allow_none=True, errors=BUILTIN)
    _check_spec_state(op, spec, state)
    _check_query(op, q, packed, state)
    _check_spec_state(op, spec, state, q.device)
    B = q.shape[0]
    _check_packed(op, packed, spec, state, B, q.device)
    _check_lengths(op, lengths, B, q.device)
    scale = _scale(op, scale, q.shape[-1])
    if state.prunes:
        naive._kept(state)
    which = _which(op, impl, q.device)
    if which == "naive":
        out, lse = naive.naive_decode_attention(q, packed, spec, state, scale, lengths, causal=causal)
    else:
        from .launch import launch_decode  # Triton loads on first use

        out, lse = launch_decode(q, packed, spec, state, scale, lengths, causal, num_splits)
    return (out, lse) if return_lse else out


@_compile_disabled
@torch.no_grad()
def quantized_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedKV | None,
                                spec: KVQuantSpec, state: KVQuantState, scale: float | None = None,
                                lengths: torch.Tensor | None = None, *, return_lse: bool = False,
                                impl: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Prefill attention of a chunk of fresh tokens: full precision among themselves, packed cache for the past.

    Prefill does not read its own tokens back from the quantized cache: the chunk's queries attend causally to
    the chunk's exact keys and values (as every quantized-KV method does, and with the fast dense kernel), and to
    the ``lengths`` tokens already in ``packed`` through :func:`quantized_decode_attention`; the two are merged by
    their log-sum-exps. Writing the chunk into the cache is the caller's next step (:func:`quantize_kv`), so the
    quantization error of a token first affects the tokens after its chunk.

    Args:
        q: ``[B, Hq, Tc, D]`` the chunk's queries.
        k, v: ``[B, Hkv, Tc, D]`` the chunk's keys and values (same dtype as ``q``).
        packed: the cache holding the earlier tokens, or ``None`` (first chunk: plain causal attention).
        spec, state: the cache's spec and state.
        scale: softmax scale, default ``1 / sqrt(D)``.
        lengths: int ``[B]`` earlier tokens per row in ``packed`` (``None`` = all its slots).
        return_lse: also return ``lse [B, Hq, Tc]``.
        impl: ``None``/``"auto"`` (CUDA: longkit's masked attention kernel and the Triton decode kernel),
            ``"triton"`` or ``"naive"``.

    Returns:
        ``out [B, Hq, Tc, D]`` in ``q.dtype`` (and ``lse``).
    """
    op = "quantized_prefill_attention"
    check_bool(op, "return_lse", return_lse, errors=BUILTIN)
    _check_spec_state(op, spec, state)
    _check_kv(op, k, v, state)
    _check_spec_state(op, spec, state, k.device)
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"{op}: q must be a rank-4 tensor [B, Hq, Tc, D] with k's dtype and device, got "
                         f"{_shape(q)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, Tc and D, and Hq must be a "
                         "multiple of Hkv")
    if packed is not None:
        _check_packed(op, packed, spec, state, q.shape[0], q.device)
        if state.prunes:
            naive._kept(state)
    _check_lengths(op, lengths, q.shape[0], q.device)
    scale = _scale(op, scale, q.shape[-1])
    which = _which(op, impl, q.device)
    if which == "naive":
        out, lse = naive.naive_prefill_attention(q, k, v, packed, spec, state, scale, lengths)
    else:
        from longkit.kernels.masked_attn import masked_attention
        from longkit.kernels.masks import causal

        out, lse = masked_attention(q, k, v, mask=causal(), scale=scale, return_lse=True, impl=impl)
        if packed is not None:
            from .launch import launch_decode

            past, past_lse = launch_decode(q, packed, spec, state, scale, lengths, False, None)
            out, lse = naive.merge_attention_states(out, lse, past, past_lse)
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets (e.g. the packed cache and a full-precision recent window).

    Args:
        out_a, out_b: ``[..., D]`` partial outputs; lse_a, lse_b: ``[...]`` their natural-log log-sum-exps
            (``-inf`` where a part had no key).

    Returns:
        ``(out, lse)``: ``out`` in ``out_a.dtype`` (computed in fp32), ``lse`` fp32.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"merge_attention_states: outputs {tuple(out_a.shape)}, {tuple(out_b.shape)} must match "
                         f"and the lse {tuple(lse_a.shape)}, {tuple(lse_b.shape)} must be their shape without D")
    return naive.merge_attention_states(out_a, lse_a, out_b, lse_b)
