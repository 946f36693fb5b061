"""Helpers shared by the quantized-KV test modules (no tests here): comparing packed caches field by field and the
"PyTorch in the query's dtype" decode that sets the kernels' tolerance (``longkit.kernels.testing`` rule)."""

from __future__ import annotations

import torch

from longkit.kernels.kv_quant import PackedKV, dequantize_kv, unpack_codes
from longkit.kernels.kv_quant.naive import prepare_query, qjl_scores, unrotate
from longkit.kernels.kv_quant.spec import KVQuantSpec
from longkit.kernels.kv_quant.state import KVQuantState
from longkit.kernels.testing import assert_close

__all__ = ["assert_packed_match", "lowprec_decode", "assert_decode_close"]


def _close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float, frac: float = 0.0) -> None:
    """At most a ``frac`` share of elements further apart than ``rtol`` relative (to the field's largest value)."""
    ref, out = ref.double(), out.double()
    tol = rtol * ref.abs().amax().clamp(min=1e-30) if ref.numel() else 0.0
    bad = (ref - out).abs() > tol
    assert bad.float().mean().item() <= frac, (
        f"{name}: {int(bad.sum())} / {bad.numel()} differ by more than {float(tol):.3g} "
        f"(max {(ref - out).abs().max().item():.3g})")


def assert_packed_match(ref: PackedKV, out: PackedKV, spec: KVQuantSpec, state: KVQuantState, *, exact: bool,
                        frac: float = 1e-3) -> None:
    """``out`` (kernel) holds the same cache as ``ref`` (reference).

    ``exact``: every byte equal (no rotation: same fp32 operations in the same order). Otherwise the rotation's sums
    run in another order, so a value on a rounding boundary may round the other way: codes differ by at most one
    step and in at most a ``frac`` share of values, scales and zeros by at most an fp16 step or two of the field's
    largest value, QJL signs (projections near 0) and residual norms (a changed code) in at most a ``frac`` share.
    """
    if exact:
        assert torch.equal(ref.buffer, out.buffer), (
            f"records differ in {int((ref.buffer != out.buffer).sum())} / {ref.buffer.numel()} bytes")
        if ref.key_scales is not None:
            assert torch.equal(ref.key_scales, out.key_scales), "KIVI key scales differ"
        return
    lay = ref.layout
    for name, bits, n in (("k_codes", spec.key_bits, lay.key_dim), ("v_codes", spec.value_bits, lay.head_dim)):
        a, b = getattr(ref, name), getattr(out, name)
        if bits == 16:
            _close(name, a.float(), b.float(), 2 ** -7, frac)
            continue
        ca, cb = unpack_codes(a, bits, n), unpack_codes(b, bits, n)
        diff = (ca - cb).abs()
        assert int(diff.max()) <= 1, f"{name}: codes differ by {int(diff.max())} steps"
        assert diff.float().mean().item() <= frac, f"{name}: {int((diff > 0).sum())} / {diff.numel()} codes differ"
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
        a = getattr(ref, name)
        if a is not None:
            _close(name, a.float(), getattr(out, name).float(), 2 ** -9, frac)
    if spec.qjl:
        sa, sb = unpack_codes(ref.k_qjl, 1, lay.sketch_dim), unpack_codes(out.k_qjl, 1, lay.sketch_dim)
        assert (sa != sb).float().mean().item() <= frac, f"QJL signs differ in {int((sa != sb).sum())} places"
        _close("k_rnorm", ref.k_rnorm.float(), out.k_rnorm.float(), 2 ** -9, 10 * frac)


def lowprec_decode(q: torch.Tensor, packed: PackedKV, spec: KVQuantSpec, state: KVQuantState, scale: float,
                   lengths: torch.Tensor | None, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention computed by PyTorch in ``q.dtype``: dequantized K/V, rotated query, scores, softmax and
    the output product all in that dtype. Returns ``(out [fp32], lse [fp32])``."""
    dt = q.dtype
    B, Hq, Tq, D = q.shape
    group = Hq // packed.num_kv_heads
    T = packed.num_tokens
    q_rot, q_sk = prepare_query(q, spec, state)
    k, v = dequantize_kv(packed, spec, state, rotated=True)
    s = q_rot.to(dt) @ k.to(dt).repeat_interleave(group, 1).transpose(-1, -2)
    if spec.qjl:  # the query's sketch in dt too, as a dt implementation holds it
        s = s + qjl_scores(q_sk.to(dt).float(), packed, spec).to(dt)
    s = s * scale
    L = torch.full((B,), T, device=q.device) if lengths is None else lengths.clamp(max=T)
    j = torch.arange(T, device=q.device)
    vis = j.view(1, 1, 1, T) < L.view(B, 1, 1, 1)
    if causal:
        i = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
        vis = vis & (j.view(1, 1, 1, T) <= L.view(B, 1, 1, 1) - Tq + i)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = p @ v.to(dt).repeat_interleave(group, 1)
    if spec.rotate:
        out = unrotate(out.float(), state.value_signs).to(dt)
    return out.float(), lse


def assert_decode_close(name: str, ref: torch.Tensor, ref_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        low: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Kernel output and lse within twice PyTorch's own low-precision error of the fp32 reference. The lse has
    few elements (one per query row), so its low-precision error is a noisy baseline: it also gets a floor of half
    the dtype's relative step of its largest magnitude."""
    lowp = out.dtype != torch.float32
    floor = 1e-4 if lowp else 1e-5
    assert_close(f"{name} out", ref.float(), out.float(), lowprec_ref=low[0], atol_floor=floor)
    fin = ref_lse[torch.isfinite(ref_lse)]
    big = max(1.0, fin.abs().max().item()) if fin.numel() else 1.0
    lse_floor = torch.finfo(out.dtype).eps / 2 * big if lowp else 1e-4
    assert_close(f"{name} lse", ref_lse, lse, lowprec_ref=low[1], atol_floor=lse_floor)
