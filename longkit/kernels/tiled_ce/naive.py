"""Reference LM head + cross-entropy: full logits, plain PyTorch. The test oracle for :func:`tiled_cross_entropy`.

The math is transformers' ``ForCausalLMLoss`` applied to already-shifted rows: ``logits = hidden @ weight.T (+ bias)``
in the inputs' dtype (as ``nn.Linear`` computes it), upcast to fp32 (fp64 inputs stay fp64), optionally scaled and
soft-capped, then an fp32 log-softmax and the negative log-likelihood of each label; rows labelled ``ignore_index``
count for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["naive_cross_entropy", "transform_logits"]


def transform_logits(z: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``softcap · tanh(logit_scale · z / softcap)`` (just ``logit_scale · z`` without ``softcap``), out of place.

    The order is TRL's and Gemma's: the scale first, then the cap (Gemma 2's ``final_logit_softcapping``).
    """
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def naive_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, through the full ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` hidden states (rows already aligned with their labels: shift before calling).
        weight: ``[V, H]`` LM head (``lm_head.weight``), same dtype as ``hidden``.
        labels: ``[N]`` integer targets in ``[0, V)``, or ``ignore_index`` for rows that do not count.
        bias: optional ``[V]`` LM-head bias.
        reduction: ``"mean"`` (over the rows that count; NaN when none does, as ``F.cross_entropy``) or ``"sum"``.
        num_items_in_batch: if given, the summed loss divided by it (transformers' gradient-accumulation rule);
            replaces ``reduction``.
        logit_scale: multiplies the fp32 logits before the cap.
        softcap: if given, logits become ``softcap · tanh(logits / softcap)``.
        ignore_index: the label of rows that do not count.

    Returns:
        The loss, a 0-dim fp32 tensor (fp64 for fp64 inputs: the tests' high-precision oracle), differentiable by
        autograd.

    Examples::

        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> y = torch.tensor([1, 2, -100, 3, 10])
        >>> ref = F.cross_entropy(h @ w.T, y)
        >>> torch.allclose(naive_cross_entropy(h, w, y), ref)
        True
    """
    logits = F.linear(hidden, weight, bias)
    logits = transform_logits(logits.to(torch.promote_types(logits.dtype, torch.float32)), logit_scale, softcap)
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    nll = -logp.gather(-1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    total = torch.where(valid, nll, 0.0).sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / valid.sum()
