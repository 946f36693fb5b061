"""Plain-PyTorch references for decayed linear attention and the gated delta rule (fp32 math).

Layout everywhere: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, states ``[B, H, Dk, Dv]`` (fp32), per-token log
gates ``[B, H, T]`` (fp32). Two kinds of function live here:

* ``naive_*``: the token-by-token recurrences, written straight from the definitions. They are the tests' oracle
  and are slow (a Python loop over ``T``).
* ``chunk_*_torch`` and ``*_summary_torch``: chunked algorithms in plain PyTorch with autograd. They are the CPU
  path of the public functions (and the CUDA path of the gated delta rule) and run ``T`` of a few thousand on
  small heads in well under a second.

Scalar-decay linear attention (lightning attention, RetNet, simple GLA)::

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t     (token t sees itself)

with ``g_t = log_decay[h]`` for a constant per-head decay. Gated delta rule (Gated DeltaNet, Qwen3-Next)::

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t          o_t = scale * q_t S_t

(``k_t`` a row vector, so ``k_t^T k_t`` is ``[Dk, Dk]``). Both are linear in the state, which gives the chunk
summaries that sequence parallelism (LASP-2) exchanges: ``S_end = exp(total) * S_in + state`` for the first and
``S_end = A @ S_in + state`` for the second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "acc_dtype",
    "as_log_gates",
    "l2norm",
    "naive_linear_attention",
    "chunk_linear_attention_torch",
    "linear_attention_summary_torch",
    "naive_gated_delta_rule",
    "chunk_gated_delta_rule_torch",
    "gated_delta_summary_torch",
]

_Tensor = torch.Tensor


def as_log_gates(log_decay: _Tensor, B: int, H: int, T: int, dtype: torch.dtype = torch.float32) -> _Tensor:
    """Per-token log gates ``[B, H, T]`` (``dtype``) from ``log_decay`` of shape ``[H]`` (constant) or ``[B, H, T]``.

    The ``[H]`` case is an expanded view, so autograd sums the per-token gradients into ``d log_decay``.
    """
    g = log_decay.to(dtype)
    if g.dim() == 1:
        return g.view(1, H, 1).expand(B, H, T)
    return g


def l2norm(x: _Tensor, eps: float = 1e-6) -> _Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, the form transformers' Qwen3-Next (and fla) use."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def acc_dtype(x: _Tensor) -> torch.dtype:
    """The math dtype: fp64 for fp64 inputs (gradcheck), fp32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_state(B: int, H: int, Dk: int, Dv: int, ref: _Tensor) -> _Tensor:
    return torch.zeros(B, H, Dk, Dv, dtype=acc_dtype(ref), device=ref.device)


# ----------------------------------------------------------------------------- scalar-decay linear attention
def naive_linear_attention(q: _Tensor, k: _Tensor, v: _Tensor, log_decay: _Tensor, scale: float = 1.0,
                           initial_state: _Tensor | None = None,
                           output_final_state: bool = False) -> tuple[_Tensor, _Tensor | None]:
    """Token-by-token recurrence ``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` (the oracle).

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``.
        log_decay: ``[H]`` per-head constant log decay or ``[B, H, T]`` per-token log gates (``<= 0``).
        scale: multiplies the output (``1.0`` for MiniMax / lightning attention).
        initial_state: ``[B, H, Dk, Dv]`` state before token 0 (zeros if ``None``).
        output_final_state: also return the state after the last token.

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32 or None)``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    acc = acc_dtype(q)
    g = as_log_gates(log_decay, B, H, T, acc)
    S = _zero_state(B, H, Dk, Dv, q) if initial_state is None else initial_state.to(acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None] + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        outs.append(scale * (qf[:, :, t, None, :] @ S).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, Dv, dtype=acc)
    return o.to(q.dtype), (S if output_final_state else None)


def chunk_linear_attention_torch(q: _Tensor, k: _Tensor, v: _Tensor, log_decay: _Tensor, scale: float = 1.0,
                                 initial_state: _Tensor | None = None, output_final_state: bool = False,
                                 chunk_size: int = 64) -> tuple[_Tensor, _Tensor | None]:
    """Chunked form of :func:`naive_linear_attention` (same arguments, plus ``chunk_size``), differentiable.

    Inside a chunk with local cumulative log gates ``G_i``: ``o_i = scale (exp(G_i) q_i S_0 + sum_{j<=i}
    exp(G_i - G_j) (q_i . k_j) v_j)`` and ``S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j^T v_j``. Every exponent
    is ``<= 0`` (the masked pairs are set to ``-inf`` before ``exp``), so nothing overflows.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    acc = acc_dtype(q)
    g = as_log_gates(log_decay, B, H, T, acc)
    S = _zero_state(B, H, Dk, Dv, q) if initial_state is None else initial_state.to(acc)
    pad = (-T) % C
    # zero padding is harmless: g = 0 is "no decay" and zero k, v add nothing to the state
    qf, kf, vf = (F.pad(x.to(acc), (0, 0, 0, pad)) for x in (q, k, v))
    g = F.pad(g, (0, pad))
    N = (T + pad) // C
    qf, kf, vf = (x.reshape(B, H, N, C, x.shape[-1]) for x in (qf, kf, vf))
    G = g.reshape(B, H, N, C).cumsum(-1)
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    pair = (G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [B, H, N, C, C]
    intra = ((qf @ kf.transpose(-1, -2)) * pair) @ vf                                    # [B, H, N, C, Dv]
    q_dec = qf * G.exp()[..., None]
    k_dec = kf * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()                                                        # [B, H, N]
    outs = []
    for n in range(N):
        outs.append(intra[:, :, n] + q_dec[:, :, n] @ S)
        S = S * chunk_decay[:, :, n, None, None] + k_dec[:, :, n].transpose(-1, -2) @ vf[:, :, n]
    if not outs:  # T == 0
        return q.new_zeros(B, H, 0, Dv), (S if output_final_state else None)
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T] * scale
    return o.to(q.dtype), (S if output_final_state else None)


def linear_attention_summary_torch(k: _Tensor, v: _Tensor, log_decay: _Tensor) -> tuple[_Tensor, _Tensor]:
    """One chunk's LASP-2 summary: ``(state [B, H, Dk, Dv] fp32, total log decay [B, H] fp32)``.

    ``state = sum_t exp(sum_{s>t} g_s) k_t^T v_t`` is the state the chunk leaves from a zero initial state, and
    ``S_end = exp(total) * S_in + state`` for any ``S_in``. One matmul; differentiable.
    """
    B, H, T, _ = k.shape
    acc = acc_dtype(k)
    g = as_log_gates(log_decay, B, H, T, acc)
    # suffix sums sum_{s>t} g_s without the cancellation of total - cumsum
    after = torch.cat([g.flip(-1).cumsum(-1).flip(-1)[..., 1:], g.new_zeros(B, H, 1)], dim=-1)
    state = (k.to(acc) * after.exp()[..., None]).transpose(-1, -2) @ v.to(acc)
    return state, g.sum(-1)


# ----------------------------------------------------------------------------- gated delta rule
def _prepare_qk(q: _Tensor, k: _Tensor, scale: float | None, use_qk_l2norm: bool) -> tuple[_Tensor, _Tensor, float]:
    qf, kf = q.to(acc_dtype(q)), k.to(acc_dtype(q))
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    return qf, kf, (q.shape[-1] ** -0.5 if scale is None else scale)


def naive_gated_delta_rule(q: _Tensor, k: _Tensor, v: _Tensor, g: _Tensor, beta: _Tensor, scale: float | None = None,
                           initial_state: _Tensor | None = None, output_final_state: bool = False,
                           use_qk_l2norm: bool = False) -> tuple[_Tensor, _Tensor | None]:
    """Token-by-token gated delta rule (the oracle); same semantics as transformers' Qwen3-Next torch path.

    ``S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t``, ``o_t = scale q_t S_t``; with
    ``use_qk_l2norm`` q and k are first l2-normalised (eps ``1e-6``), and ``scale`` defaults to ``Dk ** -0.5``.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``; g: ``[B, H, T]`` log gates (``<= 0``); beta: ``[B, H, T]``.
        scale, initial_state, output_final_state, use_qk_l2norm: as in the public ``gated_delta_rule``.

    Returns:
        ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] fp32 or None)``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    qf, kf, scale = _prepare_qk(q, k, scale, use_qk_l2norm)
    acc = acc_dtype(q)
    vf, gf, bf = v.to(acc), g.to(acc), beta.to(acc)
    S = _zero_state(B, H, Dk, Dv, q) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        S = S * gf[:, :, t].exp()[..., None, None]
        k_t = kf[:, :, t]                                              # [B, H, Dk]
        predicted = (k_t[..., None, :] @ S).squeeze(-2)                 # k_t S, [B, H, Dv]
        delta = (vf[:, :, t] - predicted) * bf[:, :, t, None]
        S = S + k_t[..., :, None] * delta[..., None, :]
        outs.append(scale * (qf[:, :, t, None, :] @ S).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, Dv, dtype=acc)
    return o.to(q.dtype), (S if output_final_state else None)


def _gdr_chunks(kf: _Tensor, vf: _Tensor, g: _Tensor, beta: _Tensor, C: int):  # noqa: ANN202
    """Chunk-local quantities of the gated delta rule (padded to a multiple of ``C``, zero = identity step).

    With ``w_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i)`` the state inside a chunk is ``S_i = exp(G_i) S_0 +
    sum_{j<=i} exp(G_i - G_j) k_j^T w_j``; substituting gives the unit lower-triangular system ``(I + L) W = beta V
    - beta exp(G) K S_0`` with ``L_ij = beta_i exp(G_i - G_j) (k_i . k_j)`` for ``j < i``, so ``W = U - Wk S_0``
    with ``U = (I + L)^-1 beta V`` and ``Wk = (I + L)^-1 beta exp(G) K``.
    Returns ``(k, G, U, Wk, pair)`` reshaped ``[B, H, N, C, ...]``; ``pair[i, j] = exp(G_i - G_j)`` for ``j <= i``.
    """
    B, H, T, _ = kf.shape
    pad = (-T) % C
    kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (kf, vf))
    g, beta = (F.pad(x.to(kf.dtype), (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    kf, vf = (x.reshape(B, H, N, C, x.shape[-1]) for x in (kf, vf))
    G = g.reshape(B, H, N, C).cumsum(-1)
    beta = beta.reshape(B, H, N, C)
    upper_incl = torch.ones(C, C, dtype=torch.bool, device=kf.device).triu(0)
    diff = G[..., :, None] - G[..., None, :]
    pair = diff.masked_fill(upper_incl.triu(1), float("-inf")).exp()
    strict = diff.masked_fill(upper_incl, float("-inf")).exp()
    L = beta[..., :, None] * (kf @ kf.transpose(-1, -2)) * strict
    eye = torch.eye(C, dtype=L.dtype, device=L.device)
    system = eye + L
    U = torch.linalg.solve_triangular(system, vf * beta[..., None], upper=False, unitriangular=True)
    Wk = torch.linalg.solve_triangular(system, kf * (beta * G.exp())[..., None], upper=False, unitriangular=True)
    return kf, G, U, Wk, pair


def chunk_gated_delta_rule_torch(q: _Tensor, k: _Tensor, v: _Tensor, g: _Tensor, beta: _Tensor,
                                 scale: float | None = None, initial_state: _Tensor | None = None,
                                 output_final_state: bool = False, chunk_size: int = 64,
                                 use_qk_l2norm: bool = False) -> tuple[_Tensor, _Tensor | None]:
    """Chunked form of :func:`naive_gated_delta_rule` (WY / UT transform per chunk), differentiable.

    Per chunk: ``W = U - Wk S_0`` (see ``_gdr_chunks``), ``o_i = scale (exp(G_i) q_i S_0 + sum_{j<=i}
    exp(G_i - G_j) (q_i . k_j) w_j)`` and ``S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j^T w_j``.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    qf, kf, scale = _prepare_qk(q, k, scale, use_qk_l2norm)
    kc, G, U, Wk, pair = _gdr_chunks(kf, v.to(kf.dtype), g, beta, C)
    N = G.shape[2]
    qc = F.pad(qf, (0, 0, 0, N * C - T)).reshape(B, H, N, C, Dk)
    attn = (qc @ kc.transpose(-1, -2)) * pair
    q_dec = qc * G.exp()[..., None]
    k_dec = kc * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()
    S = _zero_state(B, H, Dk, Dv, q) if initial_state is None else initial_state.to(kf.dtype)
    outs = []
    for n in range(N):
        w = U[:, :, n] - Wk[:, :, n] @ S
        outs.append(q_dec[:, :, n] @ S + attn[:, :, n] @ w)
        S = S * chunk_decay[:, :, n, None, None] + k_dec[:, :, n].transpose(-1, -2) @ w
    if not outs:  # T == 0
        return q.new_zeros(B, H, 0, Dv), (S if output_final_state else None)
    o = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T] * scale
    return o.to(q.dtype), (S if output_final_state else None)


def gated_delta_summary_torch(k: _Tensor, v: _Tensor, g: _Tensor, beta: _Tensor,
                              chunk_size: int = 64) -> tuple[_Tensor, _Tensor]:
    """One chunk's LASP-2 summary for the gated delta rule: ``(state [B, H, Dk, Dv], A [B, H, Dk, Dk])``, fp32.

    ``S_end = A @ S_in + state`` for any ``S_in``: ``A = M_T ... M_1`` with ``M_t = exp(g_t) (I - beta_t k_t^T
    k_t)``. Per chunk ``A_c = exp(G_C) I - K_dec^T Wk`` and ``state_c = K_dec^T U`` (``K_dec`` the keys decayed to
    the chunk end); chunks compose left to right. Differentiable. ``k`` is used as given (normalise it first if
    the layer uses ``use_qk_l2norm``).
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    acc = acc_dtype(k)
    kc, G, U, Wk, _ = _gdr_chunks(k.to(acc), v.to(acc), g, beta, chunk_size)
    k_dec = kc * (G[..., -1:] - G).exp()[..., None]
    eye = torch.eye(Dk, dtype=acc, device=k.device)
    A = eye.expand(B, H, Dk, Dk)
    S = _zero_state(B, H, Dk, Dv, k)
    for n in range(G.shape[2]):
        kt = k_dec[:, :, n].transpose(-1, -2)
        A_n = G[:, :, n, -1].exp()[..., None, None] * eye - kt @ Wk[:, :, n]
        A = A_n @ A
        S = A_n @ S + kt @ U[:, :, n]
    return S, A
