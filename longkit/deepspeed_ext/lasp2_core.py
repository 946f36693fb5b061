"""LASP-2 over a sequence-parallel group: the linear-attention recurrence of the whole sequence, each rank
holding one chunk.

Rank ``r`` holds tokens ``[r * T/P, (r + 1) * T/P)``. It computes its chunk's *summary* (what the chunk does to
a state passing through it, independent of that state), all ranks all-gather the summaries (one collective,
size independent of ``T``), rank ``r`` folds the summaries of ranks ``0 .. r-1`` into its initial state, and
runs its chunk from that state. The result equals one process running the whole sequence (up to float
rounding: only the summation order changes).

* Scalar decay (lightning attention / MiniMax, RetNet, simple GLA):
  ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``; summary ``(M, a)`` with ``S_end = exp(a) S_in + M``.
* Gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5):
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``; summary ``(M, A)`` with
  ``S_end = A S_in + M`` (``A`` is ``Dk x Dk`` per head).
* Kimi delta attention (KDA, Kimi-Linear): the same with one gate per key channel,
  ``S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T``; the same summary ``(M, A)``.

The math of one chunk is :mod:`longkit.kernels.linear_attn`'s, except KDA's: that is the host model's own chunked
function (transformers' PyTorch path, or the kernel transformers routes it to); this module adds the exchange and
the combine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .lasp2_comm import LASP2Comm, prefix_state

__all__ = ["combine_decay", "combine_transition", "lasp2_linear_attention", "lasp2_gated_delta_rule",
           "lasp2_host_delta_rule"]


def combine_decay(prefix: torch.Tensor, B: int, H: int, Dk: int, Dv: int) -> torch.Tensor:
    """Fold chunk summaries, in order, into the state they leave behind (scalar decay).

    Args:
        prefix: ``[n, B * H * (Dk * Dv + 1)]``: per chunk, per ``(b, h)``, the state ``M`` (``Dk * Dv``, row
            major) then the chunk's total log decay ``a``. ``n`` may be 0.

    Returns:
        ``[B, H, Dk, Dv]`` fp32: ``S = exp(a_{n-1}) (... (exp(a_0) 0 + M_0) ...) + M_{n-1}``.
    """
    x = prefix.reshape(prefix.shape[0], B, H, Dk * Dv + 1)
    state = prefix.new_zeros(B, H, Dk, Dv)
    for j in range(x.shape[0]):
        state = state * x[j, :, :, -1].exp()[..., None, None] + x[j, :, :, :-1].reshape(B, H, Dk, Dv)
    return state


def combine_transition(prefix: torch.Tensor, B: int, H: int, Dk: int, Dv: int) -> torch.Tensor:
    """Fold gated-delta-rule chunk summaries, in order: ``S = A_j S + M_j`` for each chunk ``j``.

    Args:
        prefix: ``[n, B * H * (Dk * Dv + Dk * Dk)]``: per chunk and ``(b, h)``, ``M`` (``Dk x Dv``) then ``A``
            (``Dk x Dk``), row major. ``n`` may be 0.
    """
    x = prefix.reshape(prefix.shape[0], B, H, Dk * Dv + Dk * Dk)
    state = prefix.new_zeros(B, H, Dk, Dv)
    for j in range(x.shape[0]):
        M = x[j, :, :, : Dk * Dv].reshape(B, H, Dk, Dv)
        A = x[j, :, :, Dk * Dv:].reshape(B, H, Dk, Dk)
        state = A @ state + M
    return state


def _kernels():  # noqa: ANN202
    from ..kernels import linear_attn

    return linear_attn


def lasp2_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                           scale: float, comm: LASP2Comm | None, layer: int, chunk_size: int = 64) -> torch.Tensor:
    """This rank's rows of decayed linear attention over the whole (sharded) sequence.

    Args:
        q, k: ``[B, H, T_local, Dk]``; v: ``[B, H, T_local, Dv]``: this rank's chunk.
        log_decay: ``[H]`` (fixed per head) or ``[B, H, T_local]`` (per token), ``<= 0``.
        scale: ``o_t = scale * q_t S_t``.
        comm: the group (``None`` or one rank: no communication).
        layer: recorded with the bytes in ``comm.stats``.

    Returns:
        ``o [B, H, T_local, Dv]`` in ``q``'s dtype.
    """
    la = _kernels()
    init = None
    if comm is not None and comm.world > 1:
        state, total = la.linear_attention_summary(k, v, log_decay)
        B, H, Dk, Dv = state.shape
        summary = torch.cat([state.float().reshape(B, H, Dk * Dv), total.float().reshape(B, H, 1)], dim=-1)
        init = prefix_state(summary, lambda p: combine_decay(p, B, H, Dk, Dv), comm, layer)
    out, _ = la.linear_attention(q, k, v, log_decay, scale=scale, initial_state=init, chunk_size=chunk_size)
    return out


def lasp2_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           *, scale: float, comm: LASP2Comm | None, layer: int, chunk_size: int = 64) -> torch.Tensor:
    """This rank's rows of the gated delta rule over the whole (sharded) sequence.

    Args:
        q, k: ``[B, H, T_local, Dk]`` (already L2-normalised where the model does so); v: ``[B, H, T_local, Dv]``.
        g: ``[B, H, T_local]`` log gates (``<= 0``); beta: ``[B, H, T_local]`` write strengths.
        scale, comm, layer: as in :func:`lasp2_linear_attention`.

    Returns:
        ``o [B, H, T_local, Dv]`` in ``q``'s dtype.
    """
    la = _kernels()
    init = None
    if comm is not None and comm.world > 1:
        state, trans = la.gated_delta_summary(k, v, g, beta)
        B, H, Dk, Dv = state.shape
        summary = torch.cat([state.float().reshape(B, H, Dk * Dv), trans.float().reshape(B, H, Dk * Dk)], dim=-1)
        init = prefix_state(summary, lambda p: combine_transition(p, B, H, Dk, Dv), comm, layer)
    out, _ = la.gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=init, chunk_size=chunk_size)
    return out


def lasp2_host_delta_rule(chunk_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                          comm: LASP2Comm | None, layer: int) -> torch.Tensor:
    """This rank's rows of a delta rule computed by the host model's own chunked function (Kimi-Linear's KDA).

    ``chunk_fn(q, k, v, g, beta, initial_state=..., output_final_state=..., use_qk_l2norm_in_kernel=True)`` works in
    the host's layout (``[B, T, H, D]``, state ``[B, H, Dk, Dv]``), as transformers' ``chunk_kimi_delta_attention``.
    The summary costs one extra call: the final state is linear in the initial one, so the chunk run on the values
    ``[v, 0]`` from the initial state ``[0, I]`` (value dims ``Dv + Dk``) ends in ``[M, A]``: ``M`` the state the
    chunk leaves from zero, ``A`` its transition.

    Args:
        chunk_fn: the host's chunked function.
        q, k: ``[B, T_local, H, Dk]``; v: ``[B, T_local, H, Dv]``; g: ``[B, T_local, H, Dk]`` log gates;
            beta: ``[B, T_local, H]``.
        comm, layer: as in :func:`lasp2_linear_attention`.

    Returns:
        ``o [B, T_local, H, Dv]`` as ``chunk_fn`` returns it.
    """
    init = None
    if comm is not None and comm.world > 1:
        B, _, H, Dk = k.shape
        Dv = v.shape[-1]
        eye = torch.eye(Dk, dtype=torch.float32, device=k.device).expand(B, H, Dk, Dk)
        start = torch.cat([eye.new_zeros(B, H, Dk, Dv), eye], dim=-1)
        _, end = chunk_fn(q, k, torch.cat([v, v.new_zeros(*v.shape[:3], Dk)], dim=-1), g, beta,
                          initial_state=start, output_final_state=True, use_qk_l2norm_in_kernel=True)
        M, A = end.float().split([Dv, Dk], dim=-1)
        summary = torch.cat([M.reshape(B, H, Dk * Dv), A.reshape(B, H, Dk * Dk)], dim=-1)
        init = prefix_state(summary, lambda p: combine_transition(p, B, H, Dk, Dv), comm, layer)
    out, _ = chunk_fn(q, k, v, g, beta, initial_state=init, output_final_state=False, use_qk_l2norm_in_kernel=True)
    return out
