"""Tiled LM head + cross-entropy: the loss and its gradients, ``chunk_size`` tokens at a time, never ``[N, V]``.

One public function, :func:`tiled_cross_entropy`, on the autograd function :class:`TiledCrossEntropyFunction`. It is
plain PyTorch (cuBLAS/MKL GEMMs and elementwise ops on one tile), so the same code serves CPU and CUDA; there is no
Triton kernel and no ``impl`` switch.

How it works, for ``hidden [N, H]``, ``weight [V, H]`` and tiles of ``C = chunk_size`` rows:

* forward, per tile: ``x = hidden[tile] @ weight.T (+ bias)`` in the inputs' dtype (like ``nn.Linear``), upcast to
  fp32, scaled/soft-capped, then the target logit is read and ``lse = log Σ exp`` computed in place (two tile
  buffers, reused by every tile). Saved for backward: ``hidden``, ``weight``, ``bias`` (references, no copies), the
  labels (as targets and a mask) and ``lse [N]`` (fp32) only.
* backward (default, ``recompute=True``), per tile: the logits are recomputed (one more GEMM), turned in place into
  ``∂loss/∂logits = (softmax − onehot) · coef`` (``coef = grad · [row counts] / denominator``, times the cap's and the
  scale's derivatives), copied back to the inputs' dtype, then ``grad_hidden[tile] = g @ weight`` and
  ``grad_weight += g.T @ hidden[tile]``. ``grad_weight`` is accumulated in fp32 (on CUDA with bf16/fp16 by
  ``torch.addmm(..., out_dtype=torch.float32)``, so each tile's product is not rounded first: TRL's
  ``_addmm_fp32``; on CPU from the fp32 gradient tile itself), ``grad_bias`` too; both are cast to the parameters'
  dtype at the end. ``grad_hidden`` is one GEMM per tile, in the inputs' dtype, as autograd computes it.
* ``recompute=False`` computes the gradients in the forward instead (Liger's and DeepSpeed's
  ``TiledFusedLogitsLoss``'s choice): one GEMM per tile less (3 instead of 4), but ``grad_hidden [N, H]`` and the
  fp32 ``grad_weight [V, H]`` are held from the forward until the backward. It applies only when grad mode is on and
  an input requires grad; backward then only scales them by the incoming gradient.

Memory beyond the inputs and the gradients themselves (``C = min(chunk_size, N)``):

* tiles: ``C × V × 4`` bytes (the fp32 logits tile, turned into the gradient in place) plus ``C × V × 2`` for 16-bit
  inputs (the GEMM's output tile, reused for the 16-bit gradient); ``+ C × V × 4`` with ``softcap`` where gradients
  are computed. With the default ``C = 4096`` and ``V = 128256``: 2.1 GB + 1.05 GB. Lower ``chunk_size`` to trade
  speed for memory;
* ``grad_weight``'s fp32 accumulator, ``V × H × 4`` bytes (2.1 GB at V=128256, H=4096), until it is cast to a 16-bit
  weight's dtype at the end of backward (with ``recompute=False``: from the forward on);
* under autocast (inputs in fp32, autocast dtype bf16/fp16): the 16-bit copy of ``weight`` (``V × H × 2``), as
  autocast itself makes, and of each hidden tile;
* ``lse`` and a few ``[N]`` vectors (fp32/int64).

Logits are computed in the inputs' dtype and upcast, exactly as transformers does before its fp32 cross-entropy, so a
bf16 model gets the stock loss up to GEMM summation order. One host synchronisation checks the label range
(an out-of-range label would otherwise be a CUDA device-side assert).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import torch

from longkit._validate import BUILTIN, check_choice, check_int, check_number, describe

__all__ = ["tiled_cross_entropy", "TiledCrossEntropyFunction"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum")
# torch.addmm(acc, a, b, out_dtype=torch.float32) for bf16/fp16 a, b: CUDA only, torch >= 2.8 (as TRL checks it)
_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


# ----------------------------------------------------------------------------- one tile
def _logits_tile(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor,
                 z: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """Write ``transform(float(h @ weight.T + bias))`` into ``z`` (fp32 ``[c, V]``); ``buf`` is the GEMM's output
    tile in the compute dtype (``z`` itself for fp32). Returns ``z``."""
    wt = weight.t()
    if bias is None:
        torch.mm(h, wt, out=buf)
    else:
        torch.addmm(bias, h, wt, out=buf)  # bias added before the one rounding, as nn.Linear does
    if buf is not z:
        z.copy_(buf)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _cap_derivative_(z: torch.Tensor, softcap: float, out: torch.Tensor) -> torch.Tensor:
    """``1 - tanh²`` of the capped logits ``z = cap·tanh(u/cap)`` into ``out`` (``tanh = z / cap``)."""
    out.copy_(z).div_(softcap)
    return out.mul_(out).neg_().add_(1.0)


def _finish_grad_(p: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, logit_scale: float,
                  cap_grad: torch.Tensor | None) -> torch.Tensor:
    """Turn the softmax ``p [c, V]`` in place into ``∂loss/∂(h @ W.T + b) = (p - onehot) · coef · cap' · scale``."""
    p[torch.arange(p.shape[0], device=p.device), target] -= 1.0
    p.mul_(coef[:, None])  # rows that do not count have coef 0
    if cap_grad is not None:
        p.mul_(cap_grad)
    if logit_scale != 1.0:
        p.mul_(logit_scale)
    return p


def _addmm_fp32_(acc: torch.Tensor, g32: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += g.T @ h`` into the fp32 ``acc`` without rounding the product to the 16-bit dtype first."""
    if h.dtype == torch.float32:
        acc.addmm_(g32.t(), h)
    elif _MM_OUT_DTYPE and acc.device.type == "cuda":
        torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
    else:  # CPU (no out_dtype kernel): the fp32 gradient tile itself, times the upcast hidden tile
        acc.addmm_(g32.t(), h.float())


def _tiles(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
           coef: torch.Tensor | None, lse: torch.Tensor | None, chunk_size: int, logit_scale: float,
           softcap: float | None, dtype: torch.dtype, need: tuple[bool, ...]):
    """The one loop both passes run, ``chunk_size`` rows at a time.

    Forward (``lse is None``): returns ``lse [N]``, the target logits ``[N]`` (fp32) and, when ``coef`` is given
    (gradients in the forward), the gradients. Backward (``lse`` given): the gradients only. ``grads`` is
    ``[grad_hidden (compute dtype), grad_weight (fp32), grad_bias (fp32)]``, ``None`` where ``need`` is false or
    no gradient is computed.
    """
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    rows = min(chunk_size, n)
    w = weight if weight.dtype == dtype else weight.to(dtype)  # autocast: one 16-bit copy, as autocast makes
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    z_buf = torch.empty(rows, v, device=dev, dtype=torch.float32)
    mm_buf = z_buf if dtype == torch.float32 else torch.empty(rows, v, device=dev, dtype=dtype)
    cap_buf = torch.empty_like(z_buf) if softcap is not None and coef is not None else None
    forward = lse is None
    tgt = None
    if forward:
        lse = torch.empty(n, device=dev, dtype=torch.float32)
        tgt = torch.empty(n, device=dev, dtype=torch.float32)
    grads: list[torch.Tensor | None] = [None, None, None]
    if coef is not None:
        if need[0]:
            grads[0] = torch.empty(n, hidden.shape[1], device=dev, dtype=dtype)
        if need[1]:
            grads[1] = torch.zeros(weight.shape, device=dev, dtype=torch.float32)
        if need[2] and bias is not None:
            grads[2] = torch.zeros(v, device=dev, dtype=torch.float32)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        c = e - s
        h = hidden[s:e] if hidden.dtype == dtype else hidden[s:e].to(dtype)
        z = _logits_tile(h, w, b, mm_buf[:c], z_buf[:c], logit_scale, softcap)
        cap_grad = None if cap_buf is None else _cap_derivative_(z, softcap, cap_buf[:c])
        if forward:
            tgt[s:e] = z.gather(1, target[s:e, None])[:, 0]
            m = z.amax(dim=-1)
            total = z.sub_(m[:, None]).exp_().sum(dim=-1)  # z now holds exp(z - m): no second [c, V] temporary
            lse[s:e] = total.log() + m
            if coef is None:
                continue
            p = z.div_(total[:, None])
        else:
            p = z.sub_(lse[s:e, None]).exp_()
        g32 = _finish_grad_(p, target[s:e], coef[s:e], logit_scale, cap_grad)
        g = g32 if dtype == torch.float32 else mm_buf[:c].copy_(g32)
        if grads[0] is not None:
            torch.mm(g, w, out=grads[0][s:e])
        if grads[1] is not None:
            _addmm_fp32_(grads[1], g32, g, h)
        if grads[2] is not None:
            grads[2] += g32.sum(dim=0)
    return lse, tgt, grads


# ----------------------------------------------------------------------------- autograd
class TiledCrossEntropyFunction(torch.autograd.Function):
    """Autograd function behind :func:`tiled_cross_entropy` (validated inputs only; see the module docstring).

    ``apply(hidden, weight, bias, labels, denom, chunk_size, logit_scale, softcap, ignore_index, compute_dtype,
    grads_in_forward)`` returns the 0-dim fp32 loss ``Σ nll / denom`` (``denom`` a 0-dim fp32 tensor, or ``None``
    for the plain sum).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denom, chunk_size, logit_scale, softcap, ignore_index,  # noqa: ANN001, ANN205
                compute_dtype, grads_in_forward):
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0).long()
        need = tuple(ctx.needs_input_grad[:3])
        coef = None
        if grads_in_forward:
            coef = valid.float() if denom is None else torch.where(valid, 1.0 / denom, 0.0)
        with torch.autocast(hidden.device.type, enabled=False):
            lse, tgt, grads = _tiles(hidden, weight, bias, target, coef, None, chunk_size, logit_scale, softcap,
                                     compute_dtype, need)
        total = torch.where(valid, lse - tgt, 0.0).sum()
        loss = total if denom is None else total / denom
        ctx.meta = (chunk_size, logit_scale, softcap, compute_dtype, grads_in_forward, need)
        ctx.out_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if grads_in_forward:
            ctx.save_for_backward(*(g for g in grads if g is not None))
            ctx.grad_slots = tuple(g is not None for g in grads)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, valid, lse, denom)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        chunk_size, logit_scale, softcap, compute_dtype, grads_in_forward, need = ctx.meta
        if grads_in_forward:
            saved = iter(ctx.saved_tensors)
            grads = [next(saved) if slot else None for slot in ctx.grad_slots]
            g = grad_loss.float()
            grads = [None if x is None else x * g for x in grads]  # fp32 opmath, result in x's dtype
        else:
            hidden, weight, bias, target, valid, lse, denom = ctx.saved_tensors
            scale = grad_loss.float() if denom is None else grad_loss.float() / denom
            coef = torch.where(valid, scale, 0.0)
            with torch.autocast(hidden.device.type, enabled=False):
                _, _, grads = _tiles(hidden, weight, bias, target, coef, lse, chunk_size, logit_scale, softcap,
                                     compute_dtype, need)
        out = [None if x is None else x.to(dt) for x, dt in zip(grads, ctx.out_dtypes)]
        return (*out, None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- validation
_OP = "tiled_cross_entropy"


def _shape(x: object) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check(hidden, weight, labels, bias, chunk_size, reduction, num_items_in_batch, logit_scale, softcap,  # noqa: ANN001
           ignore_index, recompute) -> torch.dtype:
    """Raise on bad input; return the compute dtype (the autocast dtype under autocast, else the inputs')."""
    check_int(_OP, "chunk_size", chunk_size, min=1, errors=BUILTIN)
    check_choice(_OP, "reduction", reduction, _REDUCTIONS, errors=BUILTIN)
    check_number(_OP, "logit_scale", logit_scale, errors=BUILTIN)
    if softcap is not None:
        check_number(_OP, "softcap", softcap, min=0.0, min_exclusive=True, want="None or a number > 0",
                     errors=BUILTIN)
    check_int(_OP, "ignore_index", ignore_index, errors=BUILTIN)
    if not isinstance(recompute, bool):
        raise TypeError(f"{_OP}.recompute must be a bool (True or False), got {describe(recompute)}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{_OP}: hidden must be a 2-D tensor [N, H] (flatten batch and time first, e.g. "
                         f"hidden.reshape(-1, hidden.shape[-1])), got {_shape(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be a 2-D tensor [V, H] (lm_head.weight), got {_shape(weight)}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{_OP}: weight [V, H] = {tuple(weight.shape)} does not match hidden [N, H] = "
                         f"{tuple(hidden.shape)}: H must agree (pass lm_head.weight, not its transpose)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{_OP}: labels must be a 1-D tensor [N] = [{hidden.shape[0]}] (one per hidden row), got "
                         f"{_shape(labels)}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{_OP}: labels must be an int64 or int32 tensor of class indices, got {labels.dtype}; "
                        "convert with labels.long() (probabilities / soft labels are not supported)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{_OP}: bias must be None or a 1-D tensor [V] = [{weight.shape[0]}], got {_shape(bias)}")
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"{_OP}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but hidden is on {hidden.device}; move it with "
                             f".to(hidden.device)")
    dev = hidden.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = hidden.dtype
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            raise TypeError(f"{_OP}: hidden is {hidden.dtype} but weight is {weight.dtype}"
                            + ("" if bias is None else f" and bias {bias.dtype}")
                            + "; cast them to one dtype, or run under torch.autocast")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"{_OP}: num_items_in_batch must be a number or a one-element tensor, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
        elif isinstance(num_items_in_batch, numbers.Real) and not isinstance(num_items_in_batch, bool):
            check_number(_OP, "num_items_in_batch", num_items_in_batch, min=0.0, min_exclusive=True, errors=BUILTIN)
        else:
            raise TypeError(f"{_OP}.num_items_in_batch must be None, a number > 0 or a one-element tensor, got "
                            f"{describe(num_items_in_batch)}")
        if reduction != "mean":
            raise ValueError(f"{_OP}: num_items_in_batch divides the summed loss (it replaces reduction='mean'); "
                             f"got reduction={reduction!r} with it: drop one of the two")
    if labels.numel():
        bad = ((labels < 0) | (labels >= weight.shape[0])) & (labels != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"{_OP}: labels must lie in [0, V) = [0, {weight.shape[0]}) or equal ignore_index "
                             f"({ignore_index}); got {labels[bad][:5].tolist()} (first offending values)")
    return dtype


# ----------------------------------------------------------------------------- public function
def _compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, created on the first call: the decorator imports ``torch._dynamo`` (and with it
    Triton), which ``import longkit`` must not (as ``torch._compile._disable_dynamo`` does it inside torch)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


@_compile_disabled
def tiled_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    recompute: bool = True,
) -> torch.Tensor:
    """LM head + cross-entropy in tiles of ``chunk_size`` rows: the ``[N, V]`` logits never exist.

    Same value and gradients as :func:`~longkit.kernels.tiled_ce.naive_cross_entropy` (transformers'
    ``ForCausalLMLoss`` on shifted rows). Plain PyTorch, CPU and CUDA alike; ``torch.compile`` does not trace into it
    (the function is marked ``@torch.compiler.disable``: it runs eagerly inside a compiled model). Memory and the
    recompute trade-off are described in :mod:`longkit.kernels.tiled_ce.interface`.

    Args:
        hidden: ``[N, H]`` hidden states (float32/bfloat16/float16), rows aligned with ``labels`` (already shifted).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden`` (or any float dtype under ``torch.autocast``,
            which then decides the GEMM dtype as it does for ``nn.Linear``).
        labels: ``[N]`` int64/int32 class indices in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: rows (tokens) per tile, ``>= 1``; memory is about ``chunk_size × V × 6`` bytes for 16-bit inputs
            (``× 4`` for fp32). Need not divide ``N``.
        reduction: ``"mean"`` over the rows that count (NaN if none does, as ``F.cross_entropy``; the gradients are
            then zero) or ``"sum"``.
        num_items_in_batch: divide the summed loss by this instead of the count (transformers' rule under gradient
            accumulation): a number > 0 or a one-element tensor. Only with ``reduction="mean"``.
        logit_scale: the fp32 logits are multiplied by it (before the cap).
        softcap: if given (> 0), logits become ``softcap · tanh(logits / softcap)`` (Gemma 2's
            ``final_logit_softcapping``).
        ignore_index: label of rows that do not count.
        recompute: ``True`` (default): save only the inputs and ``lse [N]``, recompute each tile's logits in backward
            (4 GEMMs per tile in all); ``False``: compute the gradients during the forward (3 GEMMs) and hold them,
            ``[N, H]`` + fp32 ``[V, H]``, until backward. Only matters when grad mode is on.

    Returns:
        The loss: a 0-dim float32 tensor.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, options, or labels outside ``[0, V)`` that are not
        ``ignore_index`` (checked with one host synchronisation).

    Examples::

        >>> h = torch.randn(10, 16, requires_grad=True); w = torch.randn(50, 16, requires_grad=True)
        >>> y = torch.randint(0, 50, (10,)); y[:3] = -100
        >>> loss = tiled_cross_entropy(h, w, y, chunk_size=4)
        >>> loss.backward()
        >>> torch.allclose(loss, naive_cross_entropy(h, w, y))
        True
    """
    compute_dtype = _check(hidden, weight, labels, bias, chunk_size, reduction, num_items_in_batch, logit_scale,
                           softcap, ignore_index, recompute)
    softcap = None if softcap is None else float(softcap)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch).to(device=hidden.device, dtype=torch.float32).reshape(())
    elif reduction == "mean":
        denom = (labels != ignore_index).sum().to(torch.float32)
    else:
        denom = None
    wants_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    grads_in_forward = not recompute and torch.is_grad_enabled() and wants_grad
    loss = TiledCrossEntropyFunction.apply(hidden, weight, bias, labels, denom, int(chunk_size), float(logit_scale),
                                           softcap, int(ignore_index), compute_dtype, grads_in_forward)
    return loss
