"""Linear attention and the gated delta rule (``longkit.kernels.linear_attn``).

The token-by-token recurrences (``naive_*``) are the oracle: the chunked PyTorch path and the Triton kernels (under
the interpreter on CPU) must match them forward and backward (outputs, final states and the gradients of q, k, v,
the decay / gates, beta and the initial state), state passing must equal one pass, the LASP-2 summaries must compose,
the gated delta rule must match transformers' own Qwen3-Next torch functions, and our linear attention with
``log_decay = -slope`` and ``scale=1`` must reproduce transformers' MiniMax lightning-attention layer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from longkit.kernels.linear_attn import (
    gated_delta_rule,
    gated_delta_summary,
    linear_attention,
    linear_attention_summary,
    naive_gated_delta_rule,
    naive_linear_attention,
)
from longkit.kernels.testing import assert_close, assert_rms_close

B, H = 2, 2
LENGTHS = (1, 37, 64, 130)


# ----------------------------------------------------------------------------- helpers
def qkv(T: int, Dk: int, Dv: int, dtype: torch.dtype = torch.float64, b: int = B, h: int = H):
    """Inputs of realistic size: q, k at ~1/sqrt(Dk) norm so outputs stay O(1) over a few hundred tokens."""
    q = torch.randn(b, h, T, Dk, dtype=dtype) / Dk ** 0.5
    k = torch.randn(b, h, T, Dk, dtype=dtype) / Dk ** 0.5
    v = torch.randn(b, h, T, Dv, dtype=dtype)
    return q, k, v


def log_decay_of(kind: str, T: int, dtype: torch.dtype = torch.float64, b: int = B, h: int = H) -> torch.Tensor:
    if kind == "head":
        return -torch.rand(h, dtype=dtype) * 0.2 - 0.01
    return -torch.rand(b, h, T, dtype=dtype) * 0.3


def run(fn: Callable, tensors: dict[str, torch.Tensor | None], **kwargs) -> dict[str, torch.Tensor]:
    """Call ``fn`` on leaf copies of ``tensors`` with fixed upstream gradients; return outputs and every grad."""
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in tensors.items()}
    o, s = fn(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(1234)  # same upstream grads for every implementation in one test
    # drawn on the CPU (one generator for every device), then moved: the same upstream grads on CPU and GPU
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    loss = (o * do).sum()
    res = {"o": o.detach()}
    if s is not None:
        ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(device=s.device, dtype=s.dtype)
        loss = loss + (s * ds).sum()
        res["final_state"] = s.detach()
    loss.backward()
    for n, t in leaves.items():
        if t is not None:
            res["d" + n] = t.grad
    return res


def compare(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor], tol: float,
            lowprec: dict[str, torch.Tensor] | None = None, scale: dict[str, float] | None = None) -> None:
    """Every output / grad: within ``tol`` relative to the reference's largest entry (or to ``scale[name]`` where
    given), plus, with ``lowprec``, twice the low-precision reference's own error."""
    assert ref.keys() == out.keys(), (sorted(ref), sorted(out))
    for name in ref:
        r = ref[name].double()
        size = (scale or {}).get(name, r.abs().max().item())
        floor = tol * max(1.0, size)
        assert_close(name, r, out[name].double(), atol_floor=floor,
                     lowprec_ref=None if lowprec is None else lowprec[name])


def la_inputs(T: int, Dk: int, Dv: int, decay: str, with_h0: bool, dtype=torch.float64) -> dict:
    q, k, v = qkv(T, Dk, Dv, dtype)
    h0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32)
    return {"q": q, "k": k, "v": v, "log_decay": log_decay_of(decay, T, dtype if dtype == torch.float64 else
                                                              torch.float32),
            "initial_state": h0 if with_h0 else None}


def gdr_inputs(T: int, Dk: int, Dv: int, with_h0: bool, dtype=torch.float64) -> dict:
    q, k, v = qkv(T, Dk, Dv, dtype)
    k = torch.nn.functional.normalize(k, dim=-1)  # the delta rule is contractive for ||k|| = 1, beta in (0, 1)
    g = -torch.rand(B, H, T, dtype=dtype) * 0.3
    beta = torch.rand(B, H, T, dtype=dtype)
    h0 = torch.randn(B, H, Dk, Dv, dtype=dtype)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0 if with_h0 else None}


# ----------------------------------------------------------------------------- chunked PyTorch == recurrence
@pytest.mark.parametrize("decay", ["head", "token"])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (32, 16)], ids=["D16", "Dk32-Dv16"])
@pytest.mark.parametrize("T", LENGTHS)
def test_linear_attention_chunked_matches_recurrence(T: int, Dk: int, Dv: int, decay: str) -> None:
    x = la_inputs(T, Dk, Dv, decay, with_h0=True)
    ref = run(naive_linear_attention, x, scale=0.7, output_final_state=True)
    out = run(linear_attention, x, scale=0.7, output_final_state=True, chunk_size=32, impl="naive")
    compare(ref, out, 1e-10)
    assert set(out) == {"o", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"}


@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (16, 32)], ids=["D16", "Dk16-Dv32"])
@pytest.mark.parametrize("T", LENGTHS)
def test_gated_delta_chunked_matches_recurrence(T: int, Dk: int, Dv: int, l2norm: bool) -> None:
    x = gdr_inputs(T, Dk, Dv, with_h0=True)
    kw = {"output_final_state": True, "use_qk_l2norm": l2norm}
    ref = run(naive_gated_delta_rule, x, **kw)
    out = run(gated_delta_rule, x, chunk_size=16, **kw)
    compare(ref, out, 1e-9)
    assert "dbeta" in out and "dg" in out and "dinitial_state" in out


def test_outputs_dtypes_and_no_final_state() -> None:
    q, k, v = qkv(20, 16, 16, torch.bfloat16)
    o, s = linear_attention(q, k, v, -torch.rand(H) * 0.1)
    assert o.dtype == torch.bfloat16 and s is None
    o, s = linear_attention(q, k, v, -torch.rand(H) * 0.1, output_final_state=True)
    assert s.dtype == torch.float32 and s.shape == (B, H, 16, 16)
    o, s = gated_delta_rule(q, k, v, -torch.rand(B, H, 20), torch.rand(B, H, 20), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_chunk_size_does_not_change_results() -> None:
    x = la_inputs(130, 16, 16, "token", with_h0=True)
    ref = run(linear_attention, x, output_final_state=True, chunk_size=16, impl="naive")
    for c in (32, 64, 128):
        compare(ref, run(linear_attention, x, output_final_state=True, chunk_size=c, impl="naive"), 1e-10)
    y = gdr_inputs(130, 16, 16, with_h0=True)
    ref = run(gated_delta_rule, y, output_final_state=True, chunk_size=16)
    compare(ref, run(gated_delta_rule, y, output_final_state=True, chunk_size=128), 1e-9)


# ----------------------------------------------------------------------------- Triton (interpreter) == PyTorch
@pytest.mark.parametrize("decay,with_h0", [("head", True), ("token", True), ("token", False)],
                         ids=["head-h0", "token-h0", "token-no-h0"])
@pytest.mark.parametrize("Dk,Dv", [(16, 32), (32, 16)], ids=["Dk16-Dv32", "Dk32-Dv16"])
@pytest.mark.parametrize("T", LENGTHS)
def test_triton_matches_reference(T: int, Dk: int, Dv: int, decay: str, with_h0: bool) -> None:
    x64 = la_inputs(T, Dk, Dv, decay, with_h0)
    x32 = {n: (t.float() if t is not None else None) for n, t in x64.items()}
    kw = {"scale": 0.5, "output_final_state": True, "chunk_size": 32}
    ref = run(linear_attention, x64, impl="naive", **kw)           # fp64 chunked (== recurrence, tested above)
    low = run(linear_attention, x32, impl="naive", **kw)           # PyTorch's own fp32 error
    tri = run(linear_attention, x32, impl="triton", **kw)
    compare(ref, tri, 2e-6, lowprec=low, scale=head_decay_grad_scale(x64, **kw) if decay == "head" else None)


def head_decay_grad_scale(x: dict, **kw) -> dict[str, float]:
    """A per-head decay's gradient is the sum of the per-token decay gradients over every batch row and token. fp32
    rounds each term, so its error scales with the sum of their magnitudes, which can be tens of times the (partly
    cancelling) total: measured over 150 seeds, |error| <= 4e-7 x that sum, but up to 1.6e-5 x the total."""
    b, h, t = x["q"].shape[:3]
    per_token = dict(x, log_decay=x["log_decay"][None, :, None].expand(b, h, t).contiguous())
    grads = run(linear_attention, per_token, impl="naive", **kw)["dlog_decay"]
    return {"dlog_decay": grads.abs().sum(dim=(0, 2)).max().item()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_low_precision(dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs: the kernel rounds the dot operands to the input dtype (as flash-linear-attention does),
    so it is held to an RMS bound against the fp32 math on the same (rounded) inputs."""
    x = la_inputs(100, 32, 32, "token", with_h0=True, dtype=dtype)
    kw = {"output_final_state": True, "chunk_size": 32}
    xr = {n: (t.float() if t is not None and t.dtype != torch.float32 else t) for n, t in x.items()}
    ref = run(linear_attention, xr, impl="naive", **kw)
    tri = run(linear_attention, x, impl="triton", **kw)
    for name in ref:
        assert_rms_close(name, ref[name], tri[name].float(), ratio=2e-2)


def test_triton_reads_strided_views() -> None:
    """transformers' [B, T, H, D] tensors passed as .transpose(1, 2) views (no copy) give the same result."""
    T, D = 70, 16
    q, k, v = (torch.randn(B, T, H, D) / D ** 0.5 for _ in range(3))
    ld = -torch.rand(H) * 0.1
    o_view, s_view = linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ld,
                                      output_final_state=True, impl="triton")
    o_cont, s_cont = linear_attention(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), ld,
                                      output_final_state=True, impl="triton")
    assert torch.equal(o_view, o_cont) and torch.equal(s_view, s_cont)


# ----------------------------------------------------------------------------- state passing == one pass
@pytest.mark.parametrize("impl", ["naive", "triton"])
@pytest.mark.parametrize("split", [1, 37, 64])
def test_linear_attention_state_passing(split: int, impl: str) -> None:
    T = 130
    dtype = torch.float64 if impl == "naive" else torch.float32
    x = la_inputs(T, 16, 16, "token", with_h0=True, dtype=dtype)

    def two_halves(q, k, v, log_decay, initial_state, **kw):  # noqa: ANN001, ANN202
        o1, s1 = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], log_decay[..., :split],
                                  initial_state=initial_state, output_final_state=True, impl=impl)
        o2, s2 = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], log_decay[..., split:],
                                  initial_state=s1, output_final_state=True, impl=impl)
        return torch.cat([o1, o2], dim=2), s2

    one = run(linear_attention, x, output_final_state=True, impl=impl)
    two = run(two_halves, x)
    compare(one, two, 1e-10 if impl == "naive" else 2e-5)


@pytest.mark.parametrize("split", [1, 37, 64])
def test_gated_delta_state_passing(split: int) -> None:
    x = gdr_inputs(130, 16, 16, with_h0=True)

    def two_halves(q, k, v, g, beta, initial_state, **kw):  # noqa: ANN001, ANN202
        a = slice(None, split)
        b = slice(split, None)
        o1, s1 = gated_delta_rule(q[:, :, a], k[:, :, a], v[:, :, a], g[..., a], beta[..., a],
                                  initial_state=initial_state, output_final_state=True, use_qk_l2norm=True)
        o2, s2 = gated_delta_rule(q[:, :, b], k[:, :, b], v[:, :, b], g[..., b], beta[..., b],
                                  initial_state=s1, output_final_state=True, use_qk_l2norm=True)
        return torch.cat([o1, o2], dim=2), s2

    one = run(gated_delta_rule, x, output_final_state=True, use_qk_l2norm=True)
    compare(one, run(two_halves, x), 1e-9)


# ----------------------------------------------------------------------------- LASP-2 summaries compose
@pytest.mark.parametrize("decay", ["head", "token"])
@pytest.mark.parametrize("T", [1, 37, 130])
def test_linear_attention_summary_composes(T: int, decay: str) -> None:
    """S_end = exp(total) S_in + state equals the recurrence's final state, values and gradients."""
    x = la_inputs(T, 16, 32, decay, with_h0=True)
    del x["q"]

    def by_summary(k, v, log_decay, initial_state):  # noqa: ANN001, ANN202
        state, total = linear_attention_summary(k, v, log_decay)
        assert state.dtype == total.dtype == torch.float64 and total.shape == (B, H)
        return state, torch.exp(total)[..., None, None] * initial_state + state

    def by_recurrence_states(k, v, log_decay, initial_state):  # noqa: ANN001, ANN202
        _, zero = naive_linear_attention(k, k, v, log_decay, output_final_state=True)
        _, s = naive_linear_attention(k, k, v, log_decay, initial_state=initial_state, output_final_state=True)
        return zero, s

    compare(run(by_recurrence_states, x), run(by_summary, x), 1e-10)
    if decay == "head":  # the constant-decay total is T * log_decay
        _, total = linear_attention_summary(x["k"], x["v"], x["log_decay"])
        torch.testing.assert_close(total, (T * x["log_decay"]).expand(B, H))


@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("T", [1, 37, 130])
def test_gated_delta_summary_composes(T: int, l2norm: bool) -> None:
    """S_end = A S_in + state equals the recurrence's final state, values and gradients (k, v, g, beta, S_in)."""
    x = gdr_inputs(T, 16, 32, with_h0=True)
    del x["q"]

    def by_summary(k, v, g, beta, initial_state):  # noqa: ANN001, ANN202
        state, A = gated_delta_summary(k, v, g, beta, chunk_size=16, use_qk_l2norm=l2norm)
        assert A.shape == (B, H, 16, 16) and state.shape == (B, H, 16, 32)
        return state, A @ initial_state + state

    def by_recurrence(k, v, g, beta, initial_state):  # noqa: ANN001, ANN202
        kw = {"output_final_state": True, "use_qk_l2norm": l2norm}
        _, zero = naive_gated_delta_rule(k, k, v, g, beta, **kw)
        _, s = naive_gated_delta_rule(k, k, v, g, beta, initial_state=initial_state, **kw)
        return zero, s

    compare(run(by_recurrence, x), run(by_summary, x), 1e-9)


def test_summaries_chain_over_ranks() -> None:
    """Four 'ranks' each summarise their chunk; the prefix combination gives every rank the state the full
    sequential run has at its chunk boundary (what LASP-2 computes after its all-gather)."""
    T, parts = 120, (0, 25, 64, 90, 120)
    x = la_inputs(T, 16, 16, "token", with_h0=False)
    y = gdr_inputs(T, 16, 16, with_h0=False)
    s_la = torch.zeros(B, H, 16, 16, dtype=torch.float64)
    s_gd = torch.zeros(B, H, 16, 16, dtype=torch.float64)
    for a, b in zip(parts[:-1], parts[1:]):
        st, tot = linear_attention_summary(x["k"][:, :, a:b], x["v"][:, :, a:b], x["log_decay"][..., a:b])
        s_la = tot.exp()[..., None, None] * s_la + st
        st, A = gated_delta_summary(y["k"][:, :, a:b], y["v"][:, :, a:b], y["g"][..., a:b], y["beta"][..., a:b])
        s_gd = A @ s_gd + st
        _, want_la = naive_linear_attention(x["q"][:, :, :b], x["k"][:, :, :b], x["v"][:, :, :b],
                                            x["log_decay"][..., :b], output_final_state=True)
        _, want_gd = naive_gated_delta_rule(y["q"][:, :, :b], y["k"][:, :, :b], y["v"][:, :, :b], y["g"][..., :b],
                                            y["beta"][..., :b], output_final_state=True)
        torch.testing.assert_close(s_la, want_la, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s_gd, want_gd, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- transformers' Qwen3-Next functions
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("l2norm", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("T", [1, 37, 130])
def test_gated_delta_matches_transformers(T: int, l2norm: bool, with_h0: bool) -> None:
    """Same inputs through transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule (their
    layout [B, T, H, D], fixed scale Dk ** -0.5) and through ours ([B, H, T, D], scale=None): equal outputs and
    final states; and the gradients of ours equal autograd through transformers' chunked function."""
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    chunk_fn = getattr(qn.torch_chunk_gated_delta_rule, "__wrapped__", qn.torch_chunk_gated_delta_rule)
    rec_fn = getattr(qn.torch_recurrent_gated_delta_rule, "__wrapped__", qn.torch_recurrent_gated_delta_rule)
    x = gdr_inputs(T, 16, 32, with_h0, dtype=torch.float32)
    x["q"], x["k"] = x["q"] * 3, x["k"] * 2  # away from unit norm, so the l2norm option matters

    def hf(fn, q, k, v, g, beta, initial_state):  # noqa: ANN001, ANN202
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        o, s = fn(tr(q), tr(k), tr(v), g=tr(g), beta=tr(beta), initial_state=initial_state,
                  output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
        return tr(o), s

    ours = run(gated_delta_rule, x, output_final_state=True, use_qk_l2norm=l2norm)
    theirs_chunk = run(lambda **t: hf(chunk_fn, **t), x)
    compare(theirs_chunk, ours, 2e-5)
    with torch.no_grad():
        o_rec, s_rec = hf(rec_fn, **x)
    torch.testing.assert_close(ours["o"], o_rec, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(ours["final_state"], s_rec, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- transformers' MiniMax layer
def _minimax_layer(layer_idx: int, block_size: int):  # noqa: ANN202
    mm = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    from transformers import MiniMaxConfig

    cfg = MiniMaxConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=4,
                        block_size=block_size, intermediate_size=64, num_local_experts=2, num_experts_per_tok=1)
    return mm, mm.MiniMaxLightningAttention(cfg, layer_idx).eval()


def _our_minimax_layer(layer, x: torch.Tensor, state: torch.Tensor | None, impl: str):  # noqa: ANN001, ANN202
    """The layer's projections, gate and norm around our linear_attention (log_decay = -slope, scale = 1)."""
    Bx, T, _ = x.shape
    Hn, D = layer.num_attention_heads, layer.head_dim
    qkv_states = layer.act_fn(layer.qkv_proj(x)).reshape(Bx, T, Hn, 3 * D)
    q, k, v = (t.transpose(1, 2) for t in torch.split(qkv_states, D, dim=3))
    o, s = linear_attention(q, k, v, -layer.slope_rate.reshape(Hn), scale=1.0, initial_state=state,
                            output_final_state=True, impl=impl)
    o = layer.norm(o.transpose(1, 2).reshape(Bx, T, Hn * D))
    o = torch.sigmoid(layer.output_gate(x)) * o
    return layer.out_proj(o), s


@pytest.mark.parametrize("impl", ["naive", "triton"])
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_minimax_lightning_attention_matches_transformers(layer_idx: int, impl: str) -> None:
    """transformers' MiniMaxLightningAttention: block-wise prefill (several blocks, a partial last one) and then
    its one-token-at-a-time path from the cached state both equal our linear_attention with
    log_decay = -slope_rate (per head, per layer) and no q scaling; outputs, states and gradients."""
    mm, layer = _minimax_layer(layer_idx, block_size=16)
    T = 40  # 2.5 blocks of 16
    x = torch.randn(2, T, 64)
    # prefill: no cache -> the block-wise path
    x_ref = x.clone().requires_grad_()
    ref_out, ref_state = layer(x_ref, position_embeddings=None, attention_mask=None)
    x_our = x.clone().requires_grad_()
    out, state = _our_minimax_layer(layer, x_our, None, impl)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(out)
    (ref_out * gy).sum().backward()
    (out * gy).sum().backward()
    torch.testing.assert_close(x_our.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    # decode: a cache holding a state -> the token-by-token path for 5 more tokens
    cache = mm.MiniMaxCache()
    cache.set_linear_cache(layer_idx, ref_state.detach().clone())
    x2 = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref2, ref_state2 = layer(x2, position_embeddings=None, attention_mask=None, past_key_values=cache)
        out2, state2 = _our_minimax_layer(layer, x2, state.detach(), impl)
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state2, ref_state2, rtol=1e-4, atol=1e-5)


def test_minimax_slope_is_the_decay() -> None:
    """The slope rate transformers builds is 2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5), one exp(-slope) per token."""
    _, layer = _minimax_layer(2, block_size=16)
    Hn, L = 4, 4
    want = 2.0 ** (-8.0 * (torch.arange(Hn) + 1) / Hn) * (1 - 2 / (L - 1 + 1e-5) + 1e-5)
    torch.testing.assert_close(layer.slope_rate.reshape(Hn), want)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises() -> None:
    q, k, v = qkv(10, 16, 16, torch.float32)
    ld = -torch.rand(H)
    with pytest.raises(ValueError, match=r"rank-4 tensor \[B, H, T, Dk\]"):
        linear_attention(q[0], k, v, ld)
    with pytest.raises(ValueError, match="same shape"):
        linear_attention(q[:, :, :5], k, v, ld)
    with pytest.raises(ValueError, match="v must be"):
        linear_attention(q, k, v[:, :1], ld)
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention(q, k.half(), v, ld)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        linear_attention(q.int(), k.int(), v.int(), ld)
    with pytest.raises(ValueError, match=r"finite and <= 0"):
        linear_attention(q, k, v, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match=r"finite and <= 0"):
        linear_attention(q, k, v, torch.tensor([float("nan"), -0.1]))
    with pytest.raises(ValueError, match=r"log_decay must have shape \[H\] = \[2\] or \[B, H, T\]"):
        linear_attention(q, k, v, -torch.rand(3))
    with pytest.raises(TypeError, match="floating-point tensor"):
        linear_attention(q, k, v, -0.1)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        linear_attention(q, k, v, ld, initial_state=torch.zeros(B, H, 16, 8))
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        linear_attention(q, k, v, ld, chunk_size=48)
    with pytest.raises(TypeError, match="chunk_size"):
        linear_attention(q, k, v, ld, chunk_size=64.0)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        linear_attention(q, k, v, ld, scale=torch.tensor(1.0))
    with pytest.raises(TypeError, match="output_final_state"):
        linear_attention(q, k, v, ld, output_final_state=1)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attention(q, k, v, ld, impl="cuda")
    with pytest.raises(TypeError, match="use impl='naive' for float64"):
        linear_attention(q.double(), k.double(), v.double(), ld, impl="triton")
    with pytest.raises(ValueError, match=r"finite and <= 0"):
        linear_attention_summary(k, v, torch.rand(B, H, 10))
    g, beta = -torch.rand(B, H, 10), torch.rand(B, H, 10)
    with pytest.raises(ValueError, match=r"g must have shape \[B, H, T\]"):
        gated_delta_rule(q, k, v, -torch.rand(H), beta)
    with pytest.raises(ValueError, match=r"beta must have shape"):
        gated_delta_rule(q, k, v, g, beta[:, :, :5])
    with pytest.raises(ValueError, match=r"g must be finite and <= 0"):
        gated_delta_rule(q, k, v, -g, beta)
    with pytest.raises(ValueError, match="grouped heads"):
        gated_delta_rule(q[:, :1], k, v, g, beta)
    with pytest.raises(TypeError, match="use_qk_l2norm"):
        gated_delta_rule(q, k, v, g, beta, use_qk_l2norm="yes")
    with pytest.raises(ValueError, match=r"g must be finite and <= 0"):
        gated_delta_summary(k, v, torch.rand(B, H, 10), beta)


def test_empty_sequence() -> None:
    q, k, v = qkv(0, 16, 16, torch.float32)
    h0 = torch.randn(B, H, 16, 16)
    o, s = linear_attention(q, k, v, -torch.rand(H), initial_state=h0, output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, h0)
    o, s = gated_delta_rule(q, k, v, -torch.rand(B, H, 0), torch.rand(B, H, 0), initial_state=h0,
                            output_final_state=True)
    assert o.shape == (B, H, 0, 16) and torch.equal(s, h0)


# ----------------------------------------------------------------------------- GPU
def _gpu_case(dtype: torch.dtype = torch.bfloat16, T: int = 4096, D: int = 128, Hn: int = 8, decay: str = "token"):
    dev = "cuda"
    q, k, v = (torch.randn(1, Hn, T, D, device=dev) / D ** 0.5 for _ in range(3))
    v = v * D ** 0.5
    ld = (-torch.rand(1, Hn, T, device=dev) * 0.05) if decay == "token" else -torch.rand(Hn, device=dev) * 0.05
    h0 = torch.randn(1, Hn, D, D, device=dev)
    return {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "log_decay": ld, "initial_state": h0}


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["head", "token"])
def test_gpu_triton_matches_torch_bf16(decay: str) -> None:
    """bf16, T=4096, D=128, H=8: Triton vs the chunked PyTorch path in fp32 on the same bf16 inputs, fwd + bwd.
    RMS bound: the kernel rounds its dot operands (states, decayed q/k, scores) to bf16, as fla does."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _gpu_case(decay=decay)
    xr = {n: (t.float() if t.dtype == torch.bfloat16 else t) for n, t in x.items()}
    kw = {"output_final_state": True}
    ref = run(linear_attention, xr, impl="naive", **kw)
    tri = run(linear_attention, x, impl="triton", **kw)
    low = run(linear_attention, x, impl="naive", **kw)  # PyTorch path on bf16 tensors (fp32 math, bf16 output)
    for name in ref:
        assert_rms_close(name, ref[name], tri[name].float(), ratio=1e-2)
        assert_rms_close(name, ref[name], low[name].float(), ratio=1e-2)


@pytest.mark.gpu
def test_gpu_tolerance_catches_a_wrong_result() -> None:
    """The bound of the bf16 test fails on a slightly wrong decay (1% off), so it can catch a real bug."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _gpu_case()
    xr = {n: (t.float() if t.dtype == torch.bfloat16 else t) for n, t in x.items()}
    ref = run(linear_attention, xr, impl="naive", output_final_state=True)
    wrong = dict(x, log_decay=x["log_decay"] * 1.01)
    bad = run(linear_attention, wrong, impl="triton", output_final_state=True)
    with pytest.raises(AssertionError):
        for name in ("o", "final_state", "dlog_decay"):
            assert_rms_close(name, ref[name], bad[name].float(), ratio=1e-2)


@pytest.mark.gpu
def test_gpu_fp32_triton_matches_torch() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _gpu_case(torch.float32, T=1000, D=64, Hn=4)
    x64 = {n: t.double() for n, t in x.items()}
    kw = {"output_final_state": True}
    compare(run(linear_attention, x64, impl="naive", **kw), run(linear_attention, x, impl="triton", **kw), 2e-5,
            lowprec=run(linear_attention, x, impl="naive", **kw))


@pytest.mark.gpu
def test_gpu_gated_delta_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = gdr_inputs(300, 64, 64, with_h0=True, dtype=torch.float32)
    cpu = run(gated_delta_rule, x, output_final_state=True, use_qk_l2norm=True)
    gpu = run(gated_delta_rule, {n: t.cuda() for n, t in x.items()}, output_final_state=True, use_qk_l2norm=True)
    compare(cpu, {n: t.cpu() for n, t in gpu.items()}, 1e-4)
