"""masked_attention: naive reference vs dense formula, Triton (interpreter on CPU, GPU tier) vs naive."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from longkit.kernels import (
    AttentionMask,
    causal,
    documents,
    masked_attention,
    naive_masked_attention,
    shared_prefix,
    sink_window,
)
from longkit.kernels.testing import assert_close, assert_rms_close

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
try:
    import importlib.util

    HAS_TRITON = importlib.util.find_spec("triton") is not None
except Exception:  # noqa: BLE001
    HAS_TRITON = False

needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and HAS_TRITON), reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter tier)")


@dataclass
class Case:
    name: str
    mask: AttentionMask
    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    Tq: int = 37
    Tk: int = 37
    D: int = 16
    use_global: bool = False
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        g = "-qglobal" if self.use_global else ""
        return f"{self.name}-B{self.B}-Tq{self.Tq}-Tk{self.Tk}-H{self.Hq}x{self.Hkv}-D{self.D}{g}-{dt}"


CU = torch.tensor([0, 5, 5, 6, 30, 60])  # an empty and a one-token document
CU_LONG = torch.tensor([0, 70, 71, 150])
CASES = [
    Case("causal", causal(), Tq=1, Tk=1),
    Case("causal", causal(), Tq=17, Tk=17),
    Case("causal", causal(), Tq=63, Tk=63, D=24),
    Case("causal", causal(), B=2, Hq=4, Hkv=2, Tq=100, Tk=100, D=32),
    Case("causal_offset", causal(q_offset=46), Tq=17, Tk=63),
    Case("causal_mqa", causal(), Hq=4, Hkv=1, Tq=40, Tk=40),
    Case("causal_fp16", causal(), Tq=50, Tk=50, D=32, dtype=torch.float16),
    Case("sink_window", sink_window(4, 16), Tq=63, Tk=63),
    Case("window_nosink", sink_window(0, 20), Tq=50, Tk=50),
    Case("sink_window_offset", sink_window(3, 10, q_offset=50), Tq=20, Tk=70),
    Case("sink_window", sink_window(4, 16), Hq=4, Hkv=2, Tq=63, Tk=63, use_global=True),
    # every window reaches key 0 (q_offset + Tq <= n_local): the launchers run the causal kernels
    Case("window_covers_all", sink_window(4, 50), Hq=4, Hkv=2, Tq=50, Tk=50, use_global=True),
    Case("window_covers_all_offset", sink_window(2, 40, q_offset=8), Tq=32, Tk=40),
    Case("sink_window_offset", sink_window(20, 9, q_offset=40), Tq=30, Tk=70, use_global=True),
    Case("documents", documents(CU), Tq=60, Tk=60),
    Case("documents_sink", documents(CU) & sink_window(2, 7), Tq=60, Tk=60),
    Case("shared_prefix_rows", shared_prefix(torch.tensor([[10, 25], [5, 30]])), B=2, Tq=45, Tk=45),
    Case("docs_shared_prefix", documents(CU) & shared_prefix(torch.tensor([[1, 3], [0, 0], [0, 1], [8, 15], [4, 12]])),
         Tq=60, Tk=60, D=24),
    Case("docs_prefix_sink", documents(CU) & shared_prefix(torch.tensor([[1, 3], [0, 0], [0, 1], [8, 15], [4, 12]]))
         & sink_window(1, 9), Tq=60, Tk=60),
    # long enough (vs the interpreter's 16x16 tiles) for every backward loop to run: masked diagonal,
    # unmasked middle (kv blocks seen whole by later query blocks), masked window edge / document end
    Case("wide_window", sink_window(3, 45), Hq=4, Hkv=2, Tq=130, Tk=130),
    Case("wide_window_offset", sink_window(5, 40, q_offset=37), Tq=93, Tk=130, use_global=True),
    Case("long_documents", documents(CU_LONG), Tq=150, Tk=150),
    Case("long_documents_window", documents(CU_LONG) & sink_window(2, 37), Tq=150, Tk=150, D=24),
    Case("prefix_window_global", shared_prefix(torch.tensor([[40, 70]])) & sink_window(2, 50), Tq=120, Tk=120,
         use_global=True),
]


def _inputs(c: Case, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Fresh random inputs from torch's global generator, which tests/conftest.py seeds anew for every test and
    run (the seed is printed on failure; LONGKIT_RANDOM_SEED=0 replays seed 0)."""

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).to(device=device, dtype=c.dtype)

    t = {"q": r(c.B, c.Hq, c.Tq, c.D), "k": r(c.B, c.Hkv, c.Tk, c.D), "v": r(c.B, c.Hkv, c.Tk, c.D)}
    if c.use_global:
        t["q_global"] = r(c.B, c.Hq, c.Tq, c.D)
        t["k_global"] = r(c.B, c.Hkv, c.mask.n_global, c.D)
    return t


def _run(fn, inputs: dict[str, torch.Tensor], mask: AttentionMask, grad_out: torch.Tensor,  # noqa: ANN001
         cast: torch.dtype | None = None, **kw) -> dict[str, torch.Tensor]:
    leaves = {n: (t.to(cast) if cast else t).detach().clone().requires_grad_(True) for n, t in inputs.items()}
    out, lse = fn(**leaves, mask=mask, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    res = {"out": out.detach()}
    if lse is not None:
        res["lse"] = lse.detach()
    res.update({f"d{n}": g_ for n, g_ in zip(leaves, grads)})
    return res


def _triton(**kw):  # noqa: ANN003, ANN202
    return masked_attention(**kw, impl="triton", return_lse=True)


def _compare(c: Case, device: str = "cpu") -> None:
    inputs = _inputs(c, device)
    grad_out = torch.randn(c.B, c.Hq, c.Tq, c.D).to(device)
    ref = _run(naive_masked_attention, inputs, c.mask, grad_out, cast=torch.float64)
    low = _run(naive_masked_attention, inputs, c.mask, grad_out)
    tri = _run(_triton, inputs, c.mask, grad_out)
    floor = 1e-4 if c.dtype == torch.float32 else 2e-3
    for name in ref:
        assert tri[name].dtype == (torch.float32 if name == "lse" else c.dtype), name
        assert_close(name, ref[name], tri[name], lowprec_ref=low[name], atol_floor=floor)


# ----------------------------------------------------------------------------- reference sanity
def _dense_formula(q, k, v, mask: AttentionMask) -> torch.Tensor:  # noqa: ANN001
    B, Hq, Tq, D = q.shape
    g = Hq // k.shape[1]
    vis = mask.dense(B, Tq, k.shape[2])
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=vis)


@pytest.mark.parametrize("c", [c for c in CASES if not c.use_global and c.Tq > 1], ids=str)
def test_naive_matches_sdpa_formula(c: Case) -> None:
    t = {n: x.double() for n, x in _inputs(c).items()}
    out, lse = naive_masked_attention(t["q"], t["k"], t["v"], mask=c.mask)
    torch.testing.assert_close(out, _dense_formula(t["q"], t["k"], t["v"], c.mask))
    assert torch.isfinite(lse).all()


def test_naive_global_equals_plain_when_global_is_same() -> None:
    c = CASES[10]
    t = {n: x.double() for n, x in _inputs(c).items()}
    a, la = naive_masked_attention(t["q"], t["k"], t["v"], mask=c.mask)
    b, lb = naive_masked_attention(t["q"], t["k"], t["v"], mask=c.mask, q_global=t["q"],
                                   k_global=t["k"][:, :, : c.mask.n_global])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


# ----------------------------------------------------------------------------- Triton vs naive (interpreter)
@needs_interpreter
@pytest.mark.parametrize("c", CASES, ids=str)
@pytest.mark.parametrize("dkdv", ["tma", "pointer"])
def test_triton_matches_naive(c: Case, dkdv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tma``: dk/dv from the TMA-descriptor kernel (``dkdv_tma.py``, the default on Hopper); ``pointer``: from
    ``bwd._bwd_dkdv_kernel`` (other GPUs, inputs TMA cannot read)."""
    if dkdv != "pointer" and c.D not in (16, 32, 64, 128):
        pytest.skip("the TMA dk/dv runs for power-of-two head dims only")
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV", "0" if dkdv == "pointer" else "1")
    _compare(c)


@needs_interpreter
@pytest.mark.parametrize("c", CASES, ids=str)
def test_triton_other_kv_loop_structure(c: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward and dq kernels walk a query block's kv blocks either in one loop (masked blocks by a run-time
    branch) or in three (masked head, unmasked middle, masked diagonal), picked per case by the launcher.
    ``test_triton_matches_naive`` runs the picked structure; this forces the other one, kernel by kernel."""
    from longkit.kernels.masked_attn import plan

    m = c.mask
    flags = {**plan.mask_flags(m.n_local or 0, m.cu_seqlens, m.prefix_segments, None), "USE_GLOBAL": c.use_global}
    other = [kernel for kernel in ("fwd", "dq") if not plan.merged_loops(kernel, c.D, flags)]
    monkeypatch.setenv("LONGKIT_ATTN_MERGED_LOOPS", ",".join(other) or "none")
    for kernel in ("fwd", "dq"):  # the override really flips both kernels
        assert plan.merged_loops(kernel, c.D, flags) == (kernel in other)
    _compare(c)


WS_FWD_CASES = [c for c in CASES if c.mask.cu_seqlens is None and c.mask.prefix_segments is None
                and not c.use_global and c.D in (16, 32, 64, 128)]


@needs_interpreter
@pytest.mark.parametrize("c", WS_FWD_CASES, ids=str)
def test_triton_ws_causal_forward(c: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warp-specialised forward (``fwd_ws.py``, the Hopper default at hd 128 for causal and Λ masks), forced on:
    causal, GQA, offsets, and Λ with and without sinks; the backward then uses its lse and output."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD", "1")
    _compare(c)


@needs_interpreter
@pytest.mark.parametrize("c", [c for c in WS_FWD_CASES if c.mask.n_local is None], ids=str)
def test_triton_ws_paired_forward(c: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The specialised forward's persistent pair schedule (3 programs walking query-block pairs; odd block counts
    compute the middle block twice), forced on: right against the reference, and bit for bit the per-tile
    schedule's output and lse."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD", "1")
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", "1")
    _compare(c)
    inputs = _inputs(c)
    paired = _triton(**inputs, mask=c.mask)
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", "0")
    per_tile = _triton(**inputs, mask=c.mask)
    for a, b in zip(paired, per_tile):
        assert torch.equal(a, b)


def test_ws_paired_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LONGKIT_ATTN_WS_FWD_PAIRED``: 0/1 only; forced either way it is obeyed; unset, off under the interpreter."""
    from longkit.kernels import envs
    from longkit.kernels.masked_attn import plan

    # plan reads TRITON_INTERPRET through envs.triton_interpreting: patched there
    monkeypatch.setattr(envs, "triton_interpreting", lambda: True)
    assert not plan.ws_fwd_paired(4096, 128)
    monkeypatch.setattr(envs, "triton_interpreting", lambda: False)
    assert plan.ws_fwd_paired(4096, 128)
    assert not plan.ws_fwd_paired(4096 + 128, 128)  # an odd number of blocks would repeat work
    assert not plan.ws_fwd_paired(2 * plan.PAIRED_MAX_TQ, 128)
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", "1")
    assert plan.ws_fwd_paired(4096 + 128, 128)
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", "0")
    assert not plan.ws_fwd_paired(4096, 128)
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", "auto")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        plan.ws_fwd_paired(4096, 128)


@needs_interpreter
@pytest.mark.parametrize("use_global", [False, True])
def test_window_covering_every_key_runs_causal(use_global: bool) -> None:
    """A Λ mask whose windows all reach key 0 gives causal attention's outputs and gradients bit for bit (the
    launchers run the causal kernels), and with the distance limit zero q_global / k_global gradients."""
    c = Case("w", sink_window(4, 45, q_offset=5), Hq=4, Hkv=2, Tq=40, Tk=45, use_global=use_global)
    inputs = _inputs(c)
    grad_out = torch.randn(c.B, c.Hq, c.Tq, c.D)
    lam = _run(_triton, inputs, c.mask, grad_out)
    plain = {n: t for n, t in inputs.items() if n in ("q", "k", "v")}
    cau = _run(_triton, plain, causal(q_offset=5), grad_out)
    for name, t in cau.items():
        assert torch.equal(lam[name], t), name
    if use_global:
        assert not lam["dq_global"].any() and not lam["dk_global"].any()


WS_DKDV_CASES = [c for c in CASES if c.mask.prefix_segments is None and c.D in (16, 32, 64, 128)
                 and not (c.mask.cu_seqlens is not None and c.mask.n_local)]


@needs_interpreter
@pytest.mark.parametrize("c", WS_DKDV_CASES, ids=str)
def test_triton_ws_dkdv(c: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """The warp-specialised TMA dk/dv (flattened 2-D descriptors made in the kernel, ``[1, BLOCK_M]`` row tables),
    forced on, for every mask kind it takes."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_DKDV", "1")
    _compare(c)


@needs_interpreter
def test_ws_dkdv_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LONGKIT_ATTN_WS_DKDV``: 0/1 only; off by default under the interpreter; ``=1`` on a mask the pass cannot
    compile (shared prefix, documents with a window) or on non-contiguous inputs is a clear error."""
    from longkit.kernels.masked_attn.plan import mask_flags, ws_dkdv_enabled

    x = torch.randn(1, 2, 12, 16)
    plain = mask_flags(0, None, None, None)
    assert not ws_dkdv_enabled(x, x, x, x, plain)
    monkeypatch.setenv("LONGKIT_ATTN_WS_DKDV", "1")
    assert ws_dkdv_enabled(x, x, x, x, plain)
    cu, seg = torch.tensor([0, 12]), torch.tensor([[2, 5]])
    for flags in (mask_flags(0, None, seg, None), mask_flags(4, cu, None, None)):
        with pytest.raises(ValueError, match="shared prefix, or documents with a window"):
            ws_dkdv_enabled(x, x, x, x, flags)
    assert ws_dkdv_enabled(x, x, x, x, mask_flags(4, None, None, None))
    with pytest.raises(ValueError, match="contiguous"):
        ws_dkdv_enabled(x, x, x, x.transpose(1, 2).contiguous().transpose(1, 2), plain)
    monkeypatch.setenv("LONGKIT_ATTN_WS_DKDV", "on")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        ws_dkdv_enabled(x, x, x, x, plain)


@needs_interpreter
def test_ws_forward_switch() -> None:
    """``LONGKIT_ATTN_WS_FWD``: 0/1 only; ``=1`` with a mask or inputs the kernel cannot take is a clear error;
    unset, it stays off under the interpreter (the pointer forward is the one the other tests check)."""
    from longkit.kernels.masked_attn.plan import mask_flags, ws_fwd_enabled

    x = torch.randn(1, 2, 9, 16)
    plain = mask_flags(0, None, None, None)
    mp = pytest.MonkeyPatch()
    try:
        assert not ws_fwd_enabled(x, x, x, plain)
        mp.setenv("LONGKIT_ATTN_WS_FWD", "1")
        assert ws_fwd_enabled(x, x, x, plain)
        assert ws_fwd_enabled(x, x, x, mask_flags(8, None, None, None), n_global=4)  # Λ
        with pytest.raises(ValueError, match="documents, a shared prefix or the distance limit"):
            ws_fwd_enabled(x, x, x, mask_flags(8, torch.tensor([0, 9]), None, None))
        with pytest.raises(ValueError, match="more than the 16 keys of a kv block"):  # the interpreter's tiles
            ws_fwd_enabled(x, x, x, mask_flags(8, None, None, None), n_global=17)
        with pytest.raises(ValueError, match="head dim 24"):
            ws_fwd_enabled(*(torch.randn(1, 2, 9, 24),) * 3, plain)
        with pytest.raises(ValueError, match="contiguous"):
            ws_fwd_enabled(x.transpose(1, 2).contiguous().transpose(1, 2), x, x, plain)
        mp.setenv("LONGKIT_ATTN_WS_FWD", "yes")
        with pytest.raises(ValueError, match="must be 0 or 1"):
            ws_fwd_enabled(x, x, x, plain)
    finally:
        mp.undo()


GQA_CASES = [c for c in CASES if c.Hq > c.Hkv]


@needs_interpreter
@pytest.mark.parametrize("c", GQA_CASES, ids=str)
def test_triton_gqa_narrow_backward_tiles(c: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """GQA with query tiles of 8 rows: the dk/dv kernel's flat (head, query block) loop then runs many blocks
    per head in every loop segment."""
    monkeypatch.setenv("LONGKIT_ATTN_BWD_CONFIG", "8,16,4,1;16,16,4,1")
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV_CONFIG", "8,16,4,1")
    _compare(c)


@needs_interpreter
@pytest.mark.parametrize("per_prog", ["whole", "2"])
@pytest.mark.parametrize("c", GQA_CASES, ids=str)
def test_triton_gqa_dkdv_heads_per_program(c: Case, per_prog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default each dk/dv program handles one query head of the GQA group (partials summed on the host); here
    the whole group in one program (used when the scratch would not fit) and 2 heads per program."""
    group = c.Hq // c.Hkv
    n = group if per_prog == "whole" else int(per_prog)
    if group % n:
        pytest.skip(f"{n} does not divide the group size {group}")
    monkeypatch.setenv("LONGKIT_ATTN_GQA_SPLIT", str(n))
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV", "0")  # the split belongs to the pointer kernel
    _compare(c)


GLOBAL_CASES = [c for c in CASES if c.use_global]


@needs_interpreter
@pytest.mark.parametrize("chunk", ["1", "3"])
@pytest.mark.parametrize("c", GLOBAL_CASES, ids=str)
def test_triton_distance_limit_sink_chunks(c: Case, chunk: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink kv blocks' dk/dv/dk_global as partial sums over query chunks of 1 and 3 blocks, added up on
    the host; the other kv blocks in their own launch."""
    monkeypatch.setenv("LONGKIT_ATTN_SINK_CHUNK", chunk)
    _compare(c)


@needs_interpreter
def test_tma_dkdv_switch_and_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LONGKIT_ATTN_TMA_DKDV`` accepts 0/1 only; ``=1`` on inputs TMA cannot read (a base address off by 2
    bytes) is a clear error, and by default such inputs fall back to the pointer kernel with the same result."""
    from longkit.kernels.masked_attn.plan import tma_dkdv_enabled

    x = torch.randn(1, 2, 9, 16)
    assert tma_dkdv_enabled(x, x, x, x)
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        tma_dkdv_enabled(x, x, x, x)
    odd = torch.randn(1 * 2 * 9 * 16 + 1)[1:].view(1, 2, 9, 16)  # 4 bytes past an aligned base
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV", "1")
    with pytest.raises(ValueError, match="TMA"):
        tma_dkdv_enabled(odd, x, x, x)
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV_CONFIG", "64,128,8")
    with pytest.raises(ValueError, match="bad kernel config"):
        _compare(Case("causal", causal(), Tq=20, Tk=20))
    monkeypatch.delenv("LONGKIT_ATTN_TMA_DKDV_CONFIG")
    with pytest.raises(ValueError, match="head dim 24"):
        tma_dkdv_enabled(*(torch.randn(1, 2, 9, 24),) * 4)
    monkeypatch.delenv("LONGKIT_ATTN_TMA_DKDV")
    assert not tma_dkdv_enabled(odd, x, x, x)
    assert not tma_dkdv_enabled(x, x.expand(1, 2, 9, 16)[:, :1].expand(1, 2, 9, 16), x, x)  # stride-0 heads
    c = Case("causal", causal(), Tq=40, Tk=40)
    inputs = _inputs(c)
    inputs["q"] = torch.randn(c.Hq * c.Tq * c.D + 1)[1:].view(1, c.Hq, c.Tq, c.D).copy_(inputs["q"])
    grad_out = torch.randn(c.B, c.Hq, c.Tq, c.D)
    ref = _run(naive_masked_attention, inputs, c.mask, grad_out, cast=torch.float64)
    low = _run(naive_masked_attention, inputs, c.mask, grad_out)
    tri = _run(_triton, inputs, c.mask, grad_out)
    for name in ("dq", "dk", "dv"):
        assert_close(name, ref[name], tri[name], lowprec_ref=low[name], atol_floor=1e-4)


def test_bad_kernel_config_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkit.kernels.masked_attn import configs, plan

    monkeypatch.setenv("LONGKIT_ATTN_BWD_CONFIG", "16,16,4;16,16,4,1")
    with pytest.raises(ValueError, match="expected 'BM,BN,warps,stages'"):
        configs.bwd_config(64, {})
    monkeypatch.setenv("LONGKIT_ATTN_SINK_CHUNK", "0")
    with pytest.raises(ValueError, match="LONGKIT_ATTN_SINK_CHUNK must be a positive integer"):
        plan.sink_chunk(8, 4, torch.device("cpu"))
    monkeypatch.setenv("LONGKIT_ATTN_GQA_SPLIT", "3")
    with pytest.raises(ValueError, match="must be a divisor of the GQA group size 4"):
        plan.gqa_heads_per_program(4, 1 << 20, 64)


def test_grid_limit_is_a_clear_error() -> None:
    from longkit.kernels.masked_attn import launch

    launch.check_grid(2047, 32)  # 65504 programs per kv/query block: fine
    with pytest.raises(ValueError, match="2048 x 32 = 65536 exceeds 65535.*at most 2047 rows"):
        launch.check_grid(2048, 32)


def test_gqa_split_respects_the_scratch_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkit.kernels.masked_attn import plan

    monkeypatch.delenv("LONGKIT_ATTN_GQA_SPLIT", raising=False)
    budget = plan.GQA_SPLIT_BUDGET
    assert plan.gqa_heads_per_program(8, budget, 64) == 1
    assert plan.gqa_heads_per_program(8, budget + 1, 64) == 2
    assert plan.gqa_heads_per_program(8, 4 * budget + 1, 64) == 8  # no divisor fits: the whole group
    assert plan.gqa_heads_per_program(1, 100 * budget, 64) == 1
    assert plan.gqa_heads_per_program(8, 1 << 20, 128) == 8  # not split above hd 64


@needs_interpreter
def test_triton_strided_views_and_lse_grad() -> None:
    """transformers-style [B, T, H, D] -> [B, H, T, D] transposed views; the loss also uses lse."""
    q = torch.randn(1, 33, 4, 16).transpose(1, 2)
    k = torch.randn(1, 33, 2, 16).transpose(1, 2)
    v = torch.randn(1, 33, 2, 16).transpose(1, 2)
    mask = sink_window(2, 8)
    res = []
    for impl in ("triton", "naive"):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = masked_attention(*leaves, mask=mask, impl=impl, return_lse=True)
        loss = (out * torch.arange(16.0)).sum() + (lse * torch.linspace(-1, 1, 33)).sum()
        res.append([out, lse, *torch.autograd.grad(loss, leaves)])
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *res):
        assert_close(name, b, a, atol_floor=1e-4)


@needs_interpreter
def test_opcheck() -> None:
    q = torch.randn(1, 2, 20, 16, requires_grad=True)
    k = torch.randn(1, 1, 20, 16, requires_grad=True)
    v = torch.randn(1, 1, 20, 16, requires_grad=True)
    qg = torch.randn(1, 2, 20, 16, requires_grad=True)
    kg = torch.randn(1, 1, 2, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.longkit.masked_attention_fwd.default,
                          (q, k, v, qg, kg, None, None, 0, 2, 5, 0.25))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    seg = torch.tensor([[2, 4], [3, 6]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.longkit.masked_attention_fwd.default,
                          (q, k, v, None, None, cu, seg, 0, 0, 0, 0.25))


# ----------------------------------------------------------------------------- dispatch and validation
def test_auto_dispatch_cpu_is_naive_and_explicit_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from longkit.kernels._dispatch import select_impl

    cpu = torch.device("cpu")
    assert select_impl(None, cpu, "op") == "naive"
    assert select_impl("naive", cpu, "op") == "naive"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        select_impl("triton", cpu, "op")
    monkeypatch.setenv("LONGKIT_KERNEL_IMPL", "triton")
    with pytest.raises(RuntimeError, match="LONGKIT_KERNEL_IMPL='triton'"):
        select_impl(None, cpu, "op")
    monkeypatch.setenv("LONGKIT_KERNEL_IMPL", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        select_impl(None, cpu, "op")
    monkeypatch.setattr("longkit.kernels._dispatch.triton_available", lambda: False)
    monkeypatch.setenv("LONGKIT_KERNEL_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="not installed"):
        select_impl(None, cpu, "op")


def test_validation_messages_quote_values() -> None:
    q, k = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="Hq=3, Hkv=2"):
        masked_attention(q, k, k, mask=causal())
    with pytest.raises(ValueError, match="rank-4"):
        masked_attention(q[0], k, k, mask=causal())
    with pytest.raises(ValueError, match="between 1 and 256, got 300"):
        x = torch.randn(1, 1, 4, 300)
        masked_attention(x, x, x, mask=causal())
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="n_global > 0"):
        masked_attention(q, k, k, mask=causal(), q_global=q, k_global=k[:, :, :2])
    with pytest.raises(ValueError, match=r"\(1, 1, 2, 16\)"):
        masked_attention(q, k, k, mask=sink_window(2, 4), q_global=q, k_global=k[:, :, :3])
    with pytest.raises(NotImplementedError):
        m = documents(torch.tensor([0, 4, 8])) & sink_window(2, 4)
        masked_attention(q, k, k, mask=m, q_global=q, k_global=k[:, :, :2])
    with pytest.raises(ValueError, match="dtype"):
        masked_attention(q, k.double(), k, mask=causal())


def test_mask_values_rechecked_after_in_place_change() -> None:
    """The tensor checks (a host sync on CUDA) run once per mask and again after an in-place change; under
    inference mode (no version counter) on every call."""
    cu = torch.tensor([0, 4, 8])
    m = documents(cu) & shared_prefix(torch.tensor([[1, 2], [0, 3]]))
    m.check(1, 8, 8)
    m.check(1, 8, 8)
    cu[1] = 9  # not non-decreasing any more
    with pytest.raises(ValueError, match="non-decreasing"):
        m.check(1, 8, 8)
    cu[1] = 4
    m.check(1, 8, 8)
    m.prefix_segments[1, 1] = -1
    with pytest.raises(ValueError, match="chosen_start <= rejected_start"):
        m.check(1, 8, 8)
    with torch.inference_mode():
        cu_inf = torch.tensor([0, 4, 8])
        mi = documents(cu_inf)
        mi.check(1, 8, 8)
        with pytest.raises(ValueError, match="end at Tk=9"):
            mi.check(1, 9, 9)
        cu_inf[2] = 7
        with pytest.raises(ValueError, match=r"\[0 .. 7\]"):
            mi.check(1, 8, 8)


def test_mask_tensors_moved_once_per_device() -> None:
    """A mask held on one device hands the kernels the same copy on another device on every call (so their
    tables stay memoised), and a fresh copy after its tensors changed in place."""
    cu = torch.tensor([0, 4, 8])
    m = documents(cu)
    assert m.tensors_on(torch.device("cpu"))[0] is cu
    meta = torch.device("meta")
    a = m.tensors_on(meta)
    assert a[0].device == meta and a[1] is None
    assert m.tensors_on(meta)[0] is a[0]
    cu[1] = 5
    assert m.tensors_on(meta)[0] is not a[0]


def test_mask_tables_memoised_per_tensor_and_version() -> None:
    """``tables.mask_tables`` returns the same tables for the same mask tensors, rebuilds them after an in-place
    change or for another tensor with equal values, and stays bounded."""
    pytest.importorskip("triton")
    from longkit.kernels.masked_attn import tables

    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    seg = torch.tensor([[1, 2], [2, 4]], dtype=torch.int32)
    a = tables.mask_tables(1, 10, 10, 0, cu, seg, torch.device("cpu"))
    assert tables.mask_tables(1, 10, 10, 0, cu, seg, torch.device("cpu"))[0] is a[0]
    cu[1] = 5
    b = tables.mask_tables(1, 10, 10, 0, cu, seg, torch.device("cpu"))
    assert b[0] is not a[0]
    for x, y in zip(b, tables.build_mask_tables(1, 10, 10, 0, cu, seg, torch.device("cpu"))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other = cu.clone()
    assert tables.mask_tables(1, 10, 10, 0, other, seg, torch.device("cpu"))[0] is not b[0]
    for i in range(tables._TABLE_CACHE_SIZE + 3):
        tables.mask_tables(1, 10 - i % 2, 10, i % 2, torch.tensor([0, 1 + i % 9, 10]), None, torch.device("cpu"))
    assert len(tables._TABLE_CACHE) <= tables._TABLE_CACHE_SIZE


@needs_interpreter
def test_documents_mask_changed_in_place_between_calls() -> None:
    """The Triton path after ``cu_seqlens`` changed in place uses the new documents (no stale tables)."""
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    mask = documents(cu)
    masked_attention(q, k, v, mask=mask, impl="triton")
    cu[1] = 17
    got = masked_attention(q, k, v, mask=mask, impl="triton")
    want, _ = naive_masked_attention(q, k, v, mask=documents(torch.tensor([0, 17, 24])))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_import_does_not_import_triton() -> None:
    code = "import sys, longkit, longkit.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_naive_dispatch_on_cpu_matches_reference() -> None:
    c = CASES[7]
    t = _inputs(c)
    out = masked_attention(t["q"], t["k"], t["v"], mask=c.mask)
    ref, _ = naive_masked_attention(t["q"], t["k"], t["v"], mask=c.mask)
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- GPU tier
GPU_CASES = [
    ("causal", lambda T: causal()),
    ("causal_offset", lambda T: causal(q_offset=T // 2)),
    ("sink_window", lambda T: sink_window(4, T // 4)),
    ("documents", lambda T: documents(torch.tensor([0, 300, 301, 1500, 1500, T - 1000, T], device="cuda"))),
    ("docs_prefix", lambda T: documents(torch.tensor([0, 1200, T], device="cuda"))
     & shared_prefix(torch.tensor([[500, 800], [1000, 1700]], device="cuda"))),
    ("docs_sink", lambda T: documents(torch.tensor([0, 1200, T], device="cuda")) & sink_window(4, 300)),
]


def _lowprec_reference(q, k, v, mask: AttentionMask, scale: float, q_global=None, k_global=None):  # noqa: ANN001, ANN202
    """Attention computed in the inputs' dtype with PyTorch ops (scores and P@V in bf16/fp16)."""
    B, Hq, Tq, D = q.shape
    g = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kr.transpose(-1, -2)) * scale
    if q_global is not None:
        n = k_global.shape[2]
        sg = (q_global @ k_global.repeat_interleave(g, 1).transpose(-1, -2)) * scale
        gb = mask.global_branch(B, Tq, k.shape[2], device=q.device)[..., :n]
        s = torch.cat([torch.where(gb, sg, s[..., :n]), s[..., n:]], -1)
    s = s.float().masked_fill(~mask.dense(B, Tq, k.shape[2], device=q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).to(q.dtype)
    return p @ vr, lse


def _gpu_vs_reference(name: str, make, D: int, T: int, hf_layout: bool) -> None:  # noqa: ANN001
    """bf16 Triton forward/backward vs the float64 reference on CUDA, within the error of a bf16 PyTorch run.
    ``hf_layout``: q/k/v/grad_out are ``[B, T, H, D]`` tensors seen as ``[B, H, T, D]`` (as HF models pass them)."""
    mask = make(T)
    Tq = T - mask.q_offset
    B, Hq, Hkv = 1, 4, 2
    c = Case(name, mask, B=B, Hq=Hq, Hkv=Hkv, Tq=Tq, Tk=T, D=D, dtype=torch.bfloat16,
             use_global=name == "sink_window")
    inputs = _inputs(c, "cuda")
    grad_out = torch.randn(B, Hq, Tq, D, device="cuda")
    if hf_layout:
        inputs = {n: t.transpose(1, 2).contiguous().transpose(1, 2) if n != "k_global" else t
                  for n, t in inputs.items()}
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
        assert inputs["q"].stride(2) == Hq * D
    scale = 1 / math.sqrt(D)
    ref = _run(naive_masked_attention, inputs, mask, grad_out, cast=torch.float64)
    low = _run(lambda **kw: _lowprec_reference(**kw, scale=scale), inputs, mask, grad_out)
    tri = _run(_triton, inputs, mask, grad_out)
    for n in ref:
        assert_close(n, ref[n], tri[n], lowprec_ref=low[n], atol_floor=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name,make", GPU_CASES, ids=[n for n, _ in GPU_CASES])
def test_gpu_bf16_vs_reference(name: str, make, D: int) -> None:  # noqa: ANN001
    _gpu_vs_reference(name, make, D, 4096, hf_layout=False)


GPU_VARIANTS = {"dkdv_tma": ("LONGKIT_ATTN_TMA_DKDV", "1"), "dkdv_pointer": ("LONGKIT_ATTN_TMA_DKDV", "0"),
                "one_kv_loop": ("LONGKIT_ATTN_MERGED_LOOPS", "fwd,dq"),
                "three_kv_loops": ("LONGKIT_ATTN_MERGED_LOOPS", "none"),
                "pointer_fwd": ("LONGKIT_ATTN_WS_FWD", "0")}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name,make", GPU_CASES, ids=[n for n, _ in GPU_CASES])
def test_gpu_variants_odd_length_hf_layout(name: str, make, D: int, variant: str,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel variant at a length that is no multiple of any tile, on HF-layout views: both dk/dv kernels
    (the TMA kernel's out-of-bounds rows come back as zeros from the hardware), and the forward / dq walking their
    kv blocks in one loop and in three (the launcher picks per case)."""
    monkeypatch.setenv(*GPU_VARIANTS[variant])
    _gpu_vs_reference(name, make, D, 4091, hf_layout=True)


WS_FWD_GPU_CASES = [*GPU_CASES[:2], ("lambda", lambda T: sink_window(4, T // 4)),
                    ("lambda_offset", lambda T: sink_window(4, T // 4, q_offset=T // 2)),
                    ("window_only", lambda T: sink_window(0, 700))]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name,make", WS_FWD_GPU_CASES, ids=[n for n, _ in WS_FWD_GPU_CASES])
def test_gpu_ws_forward_odd_length(name: str, make, D: int, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The warp-specialised forward forced on (the default at hd 128 on Hopper), causal and Λ, at a length that is
    no multiple of its tile, GQA 2:1: its flattened 2-D descriptors read the next head's rows past a head's end."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD", "1")
    _gpu_vs_reference(name, make, D, 4091, hf_layout=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("q_offset", [0, 300])
@pytest.mark.parametrize("T", [1000, 4091, 4224, 16384])
def test_gpu_ws_paired_equals_per_tile(T: int, q_offset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The specialised forward's persistent pair schedule gives the per-tile schedule's output and lse bit for bit
    (hd 128, GQA 4:1, even and odd numbers of query blocks, with and without a query offset). The per-tile kernel
    is the one checked against the reference above; at T = 4091 the default there is the paired one."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_FWD", "1")
    q = torch.randn(2, 8, T - q_offset, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    res = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LONGKIT_ATTN_WS_FWD_PAIRED", flag)
        res[flag] = masked_attention(q, k, v, mask=causal(q_offset=q_offset), return_lse=True)
    assert torch.equal(res["0"][0], res["1"][0])
    assert torch.equal(res["0"][1], res["1"][1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name,make", [c for c in GPU_CASES if c[0] not in ("docs_prefix", "docs_sink")],
                         ids=[n for n, _ in GPU_CASES if n not in ("docs_prefix", "docs_sink")])
def test_gpu_ws_dkdv_odd_length(name: str, make, D: int, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The warp-specialised TMA dk/dv forced on at a length that is no multiple of any tile, GQA 2:1."""
    monkeypatch.setenv("LONGKIT_ATTN_WS_DKDV", "1")
    _gpu_vs_reference(name, make, D, 4091, hf_layout=False)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ["causal", "docs_sink"])
def test_gpu_16k_vs_sdpa(name: str) -> None:
    T, D = 16384, 128
    mask = causal() if name == "causal" else (
        documents(torch.tensor([0, 5000, 5001, 12000, T], device="cuda")) & sink_window(4, 2048))
    q = torch.randn(1, 2, T, D, device="cuda")
    k = torch.randn(1, 1, T, D, device="cuda")
    v = torch.randn(1, 1, T, D, device="cuda")
    do = torch.randn(1, 2, T, D, device="cuda")
    dense = mask.dense(1, T, T, device="cuda") if name != "causal" else None

    def sdpa(q, k, v, mask=None):  # noqa: ANN001, ANN202
        kk, vv = k.expand(1, 2, T, D), v.expand(1, 2, T, D)
        if dense is None:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True), None
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=dense), None

    inputs = {"q": q, "k": k, "v": v}
    ref = _run(sdpa, inputs, mask, do)
    low = _run(sdpa, {n: x.bfloat16() for n, x in inputs.items()}, mask, do)
    tri = _run(_triton, {n: x.bfloat16() for n, x in inputs.items()}, mask, do)
    for n in ("out", "dq", "dk", "dv"):
        assert_close(n, ref[n], tri[n], lowprec_ref=low[n], atol_floor=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("name", ["causal", "lambda"])
def test_gpu_fp32_default_kernels(name: str, D: int) -> None:
    """fp32 inputs on the GPU take the kernels their dtype supports (the Hopper-specific ones are built for 16-bit
    inputs; the fp32 warp-specialised forward at hd 128 does not compile) and match the fp64 reference. Triton's
    fp32 dot products round their inputs to TF32, so the bound is the RMS rule, not PyTorch's fp32 error."""
    T = 1000
    mask = causal() if name == "causal" else sink_window(4, 256)
    inputs = {"q": torch.randn(2, 4, T, D, device="cuda"), "k": torch.randn(2, 2, T, D, device="cuda"),
              "v": torch.randn(2, 2, T, D, device="cuda")}
    grad_out = torch.randn(2, 4, T, D, device="cuda")
    ref = _run(naive_masked_attention, inputs, mask, grad_out, cast=torch.float64)
    tri = _run(_triton, inputs, mask, grad_out)
    for n in ref:
        assert tri[n].dtype == torch.float32, n
        assert_rms_close(n, ref[n], tri[n], ratio=5e-3)
