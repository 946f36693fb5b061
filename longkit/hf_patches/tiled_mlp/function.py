"""Run a token-wise module over tiles of the sequence, recomputing each tile in backward.

``tiled_apply(fn, x, params, chunk_size)`` equals ``fn(x)`` for a ``fn`` that treats every token independently
(an MLP: ``[..., hidden] -> [..., hidden]``), but autograd keeps only ``x``: the forward runs ``fn`` tile by tile
without grad, and the backward recomputes one tile at a time and takes its gradients with
:func:`torch.autograd.grad`. The intermediates of ``fn`` (for a Llama MLP: gate, up, their activation and product,
``4 × intermediate`` values per token, about 4× the hidden state when ``intermediate = 4 × hidden``) then exist for
``chunk_size`` tokens at a time instead of the whole sequence.

The trainable parameters are inputs of the autograd function, so their gradients (summed over the tiles in fp32)
reach autograd once per backward, as from an untiled call: DDP's and ZeRO-1/2's gradient hooks see one gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["tiled_apply"]


class _TiledApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int, x: torch.Tensor,  # noqa: ANN001
                *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunk = fn, chunk
        # backward recomputes under the forward's autocast state (as torch.utils.checkpoint does)
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x, *params)  # parameters are never offloaded (longkit.offload skips them)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with torch.no_grad():
            for start in range(0, flat.shape[0], chunk):
                y = fn(flat[start:start + chunk])
                if out is None:  # the output's width and dtype are fn's (allocated once: no cat of the tiles)
                    out = y.new_empty(flat.shape[0], y.shape[-1])
                out[start:start + y.shape[0]] = y
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        x, *params = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        g_flat = grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in wanted]
        for start in range(0, flat.shape[0], ctx.chunk):
            xt = flat[start:start + ctx.chunk].detach().requires_grad_(dx is not None)
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                y = ctx.fn(xt)
                inputs = ([xt] if dx is not None else []) + wanted
                grads = torch.autograd.grad(y, inputs, g_flat[start:start + ctx.chunk], allow_unused=True)
            if dx is not None:
                dx[start:start + ctx.chunk] = grads[0]
                grads = grads[1:]
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc += g
        it = iter(sums)
        dparams = [next(it).to(p.dtype) if need else None for p, need in zip(params, ctx.needs_input_grad[3:])]
        return (None, None, None if dx is None else dx.reshape(x.shape), *dparams)


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                chunk_size: int) -> torch.Tensor:
    """``fn(x)`` computed ``chunk_size`` tokens at a time, with only ``x`` kept for backward.

    Args:
        fn: a token-wise function of ``[tokens, hidden]`` (it sees 2-D tiles of the flattened leading dims).
        x: ``[..., hidden]``.
        params: every tensor ``fn`` uses that needs a gradient (the module's trainable parameters); a parameter
            left out gets no gradient.
        chunk_size: tokens per tile (>= 1).
    """
    if chunk_size < 1:
        raise ValueError(f"tiled_apply: chunk_size must be >= 1, got {chunk_size}")
    if x.dim() < 2 or x.shape[-1] == 0 or x.numel() == 0:
        return fn(x)
    return _TiledApply.apply(fn, chunk_size, x, *params)
