"""Shared prefix with G branches (GRPO: G completions of one prompt; G = 2 is prefix-shared DPO).

Three views of the rule in :mod:`longkit.kernels.masks` are compared:

* an oracle written from the docstring (pure Python, per (query, key) pair: the branch span that holds the key
  and whether the query lies in it; no longkit code),
* ``AttentionMask.dense()``, which the reference ``naive_masked_attention`` uses (a branch count per token),
* the Triton kernels (Triton's interpreter on CPU), which read the per-token tables of ``masked_attn/tables.py``,

forward (out, lse) and backward (dq, dk, dv), per-row segments and packed documents, GQA, uneven, length-1 and empty
branches, at the interpreter's 16 x 16 tiles, which branch boundaries cut and which lie whole inside hidden spans
and inside non-last branches (asserted from the tables, so the schedules' skip paths run). G = 2 is checked bit for
bit against the two-branch tables and mask of before. Then the validation of the segments.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch.overrides import TorchFunctionMode

from longkit.kernels import AttentionMask, documents, masked_attention, naive_masked_attention, shared_prefix
from longkit.kernels import sink_window as sink_window_mask
from longkit.kernels.testing import assert_close

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1" or importlib.util.find_spec("triton") is None,
    reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter tier)")

TILE = 16  # the interpreter's BLOCK_M = BLOCK_N (masked_attn/configs.py)


@dataclass(frozen=True)
class Case:
    """One mask as plain Python values (the oracle never reads the mask object)."""

    name: str
    batch: int
    tq: int
    tk: int
    segs: tuple[tuple[int, ...], ...]  # branch starts s_1..s_G per row (per document with cu)
    q_offset: int = 0
    cu: tuple[int, ...] | None = None
    window: tuple[int, int] | None = None  # (n_global, n_local)
    hq: int = 4
    hkv: int = 2
    d: int = 16

    @property
    def g(self) -> int:
        return len(self.segs[0])

    def __str__(self) -> str:
        return f"{self.name}-G{self.g}-B{self.batch}-Tq{self.tq}-Tk{self.tk}-H{self.hq}x{self.hkv}"

    def mask(self, dtype: torch.dtype = torch.int64) -> AttentionMask:
        m = AttentionMask(q_offset=self.q_offset) & shared_prefix(torch.tensor(self.segs, dtype=dtype))
        if self.cu is not None:
            m = documents(torch.tensor(self.cu, dtype=dtype)) & m
        if self.window is not None:
            m = m & sink_window_mask(*self.window, q_offset=self.q_offset)
        return m


# ------------------------------------------------------------------------------------------------- the oracle
def oracle_visible(case: Case, b: int, i: int, j: int) -> bool:
    """The docstring's rule for query ``i`` of row ``b`` and key ``j``."""
    p = case.q_offset + i
    if j > p:  # causal
        return False
    if case.cu is not None:  # documents: the row is the query's document
        row = next(d for d in range(len(case.cu) - 1) if case.cu[d] <= p < case.cu[d + 1])
        start, end = case.cu[row], case.cu[row + 1]
        if j < start:
            return False
    else:
        row, start, end = b, 0, case.tk
    if case.window is not None:
        n_global, n_local = case.window
        if not (p - j < n_local or j - start < n_global):
            return False
    s = [start + x for x in case.segs[row]]
    if j < s[0]:  # the shared prefix: every later query of the row/document sees it
        return True
    spans = [(s[k], s[k + 1] if k + 1 < len(s) else end) for k in range(len(s))]
    lo, hi = next((lo, hi) for lo, hi in spans if lo <= j < hi)  # the branch holding the key
    return lo <= p < hi  # visible to the queries of that branch only


def oracle_table(case: Case) -> torch.Tensor:
    rows = [[[oracle_visible(case, b, i, j) for j in range(case.tk)] for i in range(case.tq)]
            for b in range(case.batch)]
    return torch.tensor(rows, dtype=torch.bool).reshape(case.batch, 1, case.tq, case.tk)


def oracle_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention over the oracle's visible pairs, fp64, differentiable."""
    group = q.shape[1] // k.shape[1]
    kf, vf = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, kf).mul(scale).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1).nan_to_num(0.0), vf), lse


def test_oracle_on_hand_checked_cases() -> None:
    # prefix [0, 2), branches [2, 4), [4, 5) (length 1), [5, 5) (empty), [5, 8)
    c = Case("hand", 1, 8, 8, ((2, 4, 5, 5),))
    vis = [[int(oracle_visible(c, 0, i, j)) for j in range(8)] for i in range(8)]
    assert vis == [[1, 0, 0, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 1, 0, 0, 0],
                   [1, 1, 0, 0, 0, 1, 0, 0],
                   [1, 1, 0, 0, 0, 1, 1, 0],
                   [1, 1, 0, 0, 0, 1, 1, 1]]
    # DPO (G = 2) as test_mask_oracle.py words it: a query at >= rejected_start misses [chosen_start, rejected_start)
    dpo = Case("dpo", 1, 8, 8, ((2, 5),))
    assert [oracle_visible(dpo, 0, 7, j) for j in range(8)] == [True, True, False, False, False, True, True, True]
    # documents: offsets from each document's start; s_1 at the length = no branches; starts at the end = padding
    docs = Case("docs", 1, 9, 9, ((1, 2, 4), (3, 3, 3), (0, 1, 2)), cu=(0, 4, 7, 9))
    assert [oracle_visible(docs, 0, 3, j) for j in range(9)] == [True, False, True, True] + [False] * 5
    assert [oracle_visible(docs, 0, 6, j) for j in range(9)] == [False] * 4 + [True] * 3 + [False] * 2
    assert [oracle_visible(docs, 0, 8, j) for j in range(9)] == [False] * 7 + [False, True]


# ------------------------------------------------------------------------------------------------- cases
CASES = [
    # G = 2 (DPO): row 0's first branch [3, 40) holds kv block [16, 32), seen by query block [32, 48), and hidden
    # from query block [48, 50); row 1 has a length-1 first branch [16, 17)
    Case("rows", 2, 50, 50, ((3, 40), (16, 17))),
    # G = 3: row 0's last-branch queries [48, 50) hide [7, 33) (kv block [16, 32) skipped); row 1's first branch
    # has length 1 and its last is empty (start = length)
    Case("rows", 2, 50, 50, ((7, 20, 33), (16, 17, 50))),
    # G = 5: row 0 has an empty middle branch [22, 22); row 1 no prefix, 16-token branches, an empty last branch
    Case("rows", 2, 64, 64, ((5, 21, 22, 22, 40), (0, 16, 32, 48, 64))),
    # queries are the last 27 of 61 keys (chunked prefill): the tables' rows start mid-row
    Case("rows_offset", 2, 27, 61, ((3, 30, 47), (12, 12, 40)), q_offset=34),
    # packed documents with different numbers of branches padded with empty trailing ones, a one-token document
    # without branches (s_1 = its length), a second branch [18, 68) holding kv block [32, 48) whole (its dk/dv
    # stops at query 67, not at the document end), and in the last document a length-1 branch [100, 101) that the
    # next branch [101, 130) hides
    Case("docs", 1, 130, 130, ((1, 2, 3), (1, 1, 1), (2, 4, 6), (5, 8, 58), (20, 21, 50)),
         cu=(0, 3, 4, 10, 80, 130)),
    # doc 0: third branch [13, 45) holds kv block [16, 32), seen by query block [32, 48); doc 2: an empty first
    # branch, query block [112, 120) in the last branch hides [57, 105) (kv blocks [64, 96) skipped)
    Case("docs", 1, 120, 120, ((4, 12, 13, 45, 50), (1, 1, 1, 1, 1), (6, 6, 22, 38, 54)), cu=(0, 50, 51, 120)),
    Case("docs_window", 1, 130, 130, ((1, 2, 3), (1, 1, 1), (2, 4, 6), (5, 8, 58), (20, 21, 50)),
         cu=(0, 3, 4, 10, 80, 130), window=(2, 24)),
    Case("rows_mqa", 2, 50, 50, ((7, 20, 33), (16, 17, 50)), hq=2, hkv=1, d=24),
]


def _rint(lo: int, hi: int) -> int:
    """A random int in ``[lo, hi]`` from torch's RNG (seeded freshly per test by tests/conftest.py)."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _random_starts(n: int, g: int) -> tuple[int, ...]:
    """``g`` sorted starts in ``[0, n]``: empty branches (repeats), starts at the length (padding) included."""
    return tuple(sorted(_rint(0, n) for _ in range(g)))


def random_case(g: int, packed: bool) -> Case:
    if packed:
        t = _rint(60, 110)
        cuts = sorted(_rint(1, t - 1) for _ in range(_rint(1, 3)))
        cu = (0, *cuts, t)
        segs = tuple(_random_starts(cu[d + 1] - cu[d], g) for d in range(len(cu) - 1))
        return Case("random_docs", 1, t, t, segs, cu=cu)
    tk = _rint(40, 70)
    tq = tk if _rint(0, 1) else _rint(1, tk)
    return Case("random_rows", 2, tq, tk, (_random_starts(tk, g), _random_starts(tk, g)), q_offset=tk - tq)


def test_cases_exercise_the_skip_paths() -> None:
    """Read from the kernels' tables at the interpreter's tiles, for every G in {2, 3, 5}: a branch boundary inside
    a tile; a query block whose rows share one hidden span holding a whole kv block (the schedule skips it,
    ``_jit._kv_schedule``); a kv block inside a branch that is not the last, which later query blocks of the branch
    see (its dk/dv stops at that branch's end, ``_jit._kv_block_rows``); a query block whose rows hide different
    spans (the elementwise mask)."""
    from longkit.kernels.masked_attn.tables import build_mask_tables

    seen: dict[int, set[str]] = {2: set(), 3: set(), 5: set()}
    for c in CASES:
        cu = torch.tensor(c.cu) if c.cu else None
        meta_q, meta_k = build_mask_tables(c.batch, c.tq, c.tk, c.q_offset, cu, torch.tensor(c.segs),
                                           torch.device("cpu"))
        for b in range(meta_q.shape[0]):
            ds, de, kcs, krs = meta_k[b].tolist()
            lo, hlo, hhi = meta_q[b].tolist()
            starts = {s + (c.cu[r] if c.cu else 0) for r, row in enumerate(c.segs) for s in row}
            if any(s % TILE for s in starts if 0 < s < c.tk):
                seen[c.g].add("boundary inside a tile")
            for m0 in range(0, c.tq, TILE):
                m1 = min(m0 + TILE, c.tq) - 1
                span = (hlo[m0], hhi[m0])
                if (span == (hlo[m1], hhi[m1]) and lo[m0] == lo[m1] and span[0] < span[1]
                        and -(-span[0] // TILE) < span[1] // TILE):
                    seen[c.g].add("kv block skipped")
                if len({(hlo[m], hhi[m]) for m in range(m0, m1 + 1)}) > 1:
                    seen[c.g].add("query block with mixed spans")
            for j0 in range(0, c.tk - TILE + 1, TILE):
                j1 = j0 + TILE - 1
                if (ds[j0] == ds[j1] and kcs[j0] <= j0 and j1 + 1 < krs[j0] < de[j0]
                        and (j1 + 1 - c.q_offset) % TILE == 0 and j1 + 1 - c.q_offset < c.tq):
                    seen[c.g].add("kv block inside a non-last branch, seen by a later query block")
    want = {"boundary inside a tile", "kv block skipped", "kv block inside a non-last branch, seen by a later "
            "query block", "query block with mixed spans"}
    assert all(s == want for s in seen.values()), seen


# ------------------------------------------------------------------------------------------------- dense()
@pytest.mark.parametrize("c", CASES, ids=str)
def test_dense_matches_oracle(c: Case) -> None:
    for dtype in (torch.int32, torch.int64):
        got = c.mask(dtype).dense(c.batch, c.tq, c.tk)
        want = oracle_table(c)
        assert torch.equal(got, want), f"{c}: dense() differs at {(got != want).nonzero().tolist()[:10]}"


@pytest.mark.parametrize("g", [2, 3, 5])
def test_dense_matches_oracle_random(g: int) -> None:
    for trial in range(30):
        c = random_case(g, packed=bool(trial % 2))
        got = c.mask().dense(c.batch, c.tq, c.tk)
        want = oracle_table(c)
        assert torch.equal(got, want), f"{c}: dense() differs at {(got != want).nonzero().tolist()[:10]}"


# ------------------------------------------------------------------------------------------------- kernels
def _run(fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor, **kw) -> dict[str, torch.Tensor]:  # noqa: ANN001
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    out, lse = fn(**leaves, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return {"out": out.detach(), "lse": lse.detach(), **{f"d{n}": g_ for n, g_ in zip(leaves, grads)}}


def _triton(**kw):  # noqa: ANN003, ANN202
    return masked_attention(**kw, impl="triton", return_lse=True)


def _compare(c: Case) -> None:
    """Triton (fp32) vs the reference (fp64, with fp32 as PyTorch's own error) vs the oracle (fp64), forward and
    backward, on fresh random inputs and upstream gradients."""
    inputs = {"q": torch.randn(c.batch, c.hq, c.tq, c.d), "k": torch.randn(c.batch, c.hkv, c.tk, c.d),
              "v": torch.randn(c.batch, c.hkv, c.tk, c.d)}
    grad_out = torch.randn(c.batch, c.hq, c.tq, c.d)
    mask = c.mask(torch.int32 if c.batch == 2 else torch.int64)
    scale = 1 / math.sqrt(c.d)
    ref = _run(naive_masked_attention, {n: t.double() for n, t in inputs.items()}, grad_out, mask=mask)
    low = _run(naive_masked_attention, inputs, grad_out, mask=mask)
    vis = oracle_table(c)
    orc = _run(lambda **t: oracle_attention(t["q"], t["k"], t["v"], vis, scale),
               {n: t.double() for n, t in inputs.items()}, grad_out)
    tri = _run(_triton, inputs, grad_out, mask=mask)
    for name in ("out", "lse", "dq", "dk", "dv"):
        torch.testing.assert_close(ref[name], orc[name], rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        assert_close(name, ref[name], tri[name], lowprec_ref=low[name], atol_floor=1e-4)


VARIANTS = {
    # the defaults under the interpreter: the TMA-descriptor dk/dv, one kv loop in the forward and dq
    "tma-dkdv": {"LONGKIT_ATTN_TMA_DKDV": "1"},
    # the pointer dk/dv (its GQA head split and masked / unmasked query-block loops) and three kv loops
    "pointer-dkdv-3loops": {"LONGKIT_ATTN_TMA_DKDV": "0", "LONGKIT_ATTN_MERGED_LOOPS": "none"},
}


@needs_interpreter
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("c", CASES, ids=str)
def test_triton_matches_reference_and_oracle(c: Case, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if c.d not in (16, 32, 64, 128) and variant == "tma-dkdv":
        pytest.skip("the TMA dk/dv runs for power-of-two head dims only")
    for name, value in VARIANTS[variant].items():
        monkeypatch.setenv(name, value)
    _compare(c)


@needs_interpreter
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "docs"])
@pytest.mark.parametrize("g", [2, 3, 5])
def test_triton_matches_reference_random_branches(g: int, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random lengths and starts (empty, length-1 and trailing padded branches come up often)."""
    monkeypatch.setenv("LONGKIT_ATTN_TMA_DKDV", "0" if _rint(0, 1) else "1")
    c = random_case(g, packed)
    _compare(c)


# ------------------------------------------------------------------------------------------------- G = 2 as before
def _two_branch_tables(batch, tq, tk, q_offset, cu_seqlens, segments, device):  # noqa: ANN001, ANN202
    """The two-branch ``build_mask_tables`` as it was before G branches (verbatim, for the bit-for-bit check)."""
    t = torch.arange(tk, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.bucketize(t, cu[1:], right=True).clamp_max(cu.numel() - 2)
        dstart, dend = cu[doc], cu[doc + 1]
    else:
        doc = None
        dstart, dend = torch.zeros_like(t), torch.full_like(t, tk)
    seg = segments.to(device=device, dtype=torch.long)
    if doc is not None:
        cs, rs = (seg[doc, 0] + dstart)[None], (seg[doc, 1] + dstart)[None]
    else:
        cs = seg[:, 0:1].expand(batch, tk)
        rs = seg[:, 1:2].expand(batch, tk)
    bm = cs.shape[0]
    meta_k = torch.stack([dstart[None].expand(bm, tk), dend[None].expand(bm, tk), cs, rs], dim=1)
    p = torch.arange(tq, device=device) + q_offset
    hidden = p[None] >= rs[:, p]
    meta_q = torch.stack([
        dstart[p][None].expand(bm, tq),
        torch.where(hidden, cs[:, p], 0),
        torch.where(hidden, rs[:, p], 0),
    ], dim=1)
    return meta_q.to(torch.int32).contiguous(), meta_k.to(torch.int32).contiguous()


def _two_branch_dense(c: Case) -> torch.Tensor:
    """The two-branch rule of before: causal, same document, and a query at >= rejected_start misses
    [chosen_start, rejected_start)."""
    p = torch.arange(c.tq)[:, None] + c.q_offset
    j = torch.arange(c.tk)[None, :]
    vis = (j <= p).expand(c.batch, c.tq, c.tk).clone()
    seg = torch.tensor(c.segs)
    if c.cu is not None:
        cu = torch.tensor(c.cu)
        doc = torch.bucketize(torch.arange(c.tk), cu[1:], right=True)
        vis &= (doc[None, :] == doc[p.squeeze(1)][:, None])[None]
        cs, rs = seg[doc, 0] + cu[doc], seg[doc, 1] + cu[doc]
        q_cs, q_rs = cs[p.squeeze(1)][:, None], rs[p.squeeze(1)][:, None]
        vis &= ~((p >= q_rs) & (j >= q_cs) & (j < q_rs))[None]
    else:
        cs, rs = seg[:, 0].view(-1, 1, 1), seg[:, 1].view(-1, 1, 1)
        vis &= ~((p[None] >= rs) & (j[None] >= cs) & (j[None] < rs))
    return vis[:, None]


G2_CASES = [c for c in CASES if c.g == 2] + [
    Case("docs_dpo", 1, 60, 60, ((1, 3), (0, 0), (0, 1), (8, 15), (4, 12)), cu=(0, 5, 5, 6, 30, 60)),
    Case("rows_past_end", 2, 20, 45, ((10, 25), (5, 50)), q_offset=25),  # rejected_start past the row's end
]


@pytest.mark.parametrize("c", G2_CASES, ids=str)
def test_two_branches_tables_and_mask_are_bit_identical_to_before(c: Case) -> None:
    from longkit.kernels.masked_attn.tables import build_mask_tables

    cu = torch.tensor(c.cu, dtype=torch.int32) if c.cu else None
    seg = torch.tensor(c.segs, dtype=torch.int32)
    new = build_mask_tables(c.batch, c.tq, c.tk, c.q_offset, cu, seg, torch.device("cpu"))
    old = _two_branch_tables(c.batch, c.tq, c.tk, c.q_offset, cu, seg, torch.device("cpu"))
    for a, b in zip(new, old):
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(c.mask().dense(c.batch, c.tq, c.tk), _two_branch_dense(c))


@needs_interpreter
def test_two_branches_kernel_outputs_bit_identical_to_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels given the old two-branch tables and the new ones return the same bits (fixed case, GQA)."""
    from longkit.kernels.masked_attn import tables

    c = G2_CASES[-2]  # packed DPO documents
    inputs = {"q": torch.randn(1, 4, c.tq, 16), "k": torch.randn(1, 2, c.tk, 16), "v": torch.randn(1, 2, c.tk, 16)}
    grad_out = torch.randn(1, 4, c.tq, 16)
    results = []
    for build in (tables.build_mask_tables, _two_branch_tables):
        monkeypatch.setattr(tables, "_TABLE_CACHE", OrderedDict())
        monkeypatch.setattr(tables, "build_mask_tables", build)
        results.append(_run(_triton, inputs, grad_out, mask=c.mask()))
    for name, got in results[0].items():
        assert torch.equal(got, results[1][name]), name


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("segs, message", [
    (torch.tensor([1, 2, 3]), "int32/int64 tensor [rows_or_docs, G]"),
    (torch.tensor([[[1, 2, 3]]]), "int32/int64 tensor [rows_or_docs, G]"),
    (torch.tensor([[1], [2]]), "G >= 2 branches"),
    (torch.empty(2, 0, dtype=torch.int64), "got shape (2, 0)"),
    (torch.tensor([[1.0, 2.0, 3.0]]), "got shape (1, 3) dtype torch.float32"),
    (torch.tensor([[True, True, True]]), "dtype torch.bool"),
    (torch.tensor([[1, 2, 3]], dtype=torch.int16), "cast with .to(torch.int32)"),
])
def test_bad_segments_shape_or_dtype(segs: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError) as e:
        shared_prefix(segs)
    assert message in str(e.value)
    assert "(chosen_start, rejected_start)" in str(e.value)  # names the DPO case, which is G = 2


@pytest.mark.parametrize("segs, message", [
    ([[2, 5, 4], [1, 2, 3]], "row 0 has decreasing starts: [2, 5, 4]"),
    ([[1, 2, 3, 4, 5], [1, 2, 3, 5, 4]], "row 1 has decreasing starts: [1, 2, 3, 5, 4]"),
    ([[1, 2, 3], [-1, 2, 3]], "row 1 has a negative start: [-1, 2, 3]"),
    ([[0, 0], [3, 1]], "row 1 has decreasing starts: [3, 1]"),
])
def test_bad_segments_values(segs: list, message: str) -> None:
    for dtype in (torch.int32, torch.int64):
        mask = shared_prefix(torch.tensor(segs, dtype=dtype))
        with pytest.raises(ValueError) as e:
            mask.check(2, 8, 8)
        assert message in str(e.value) and "0 <= s_1 <= s_2 <= ... <= s_G" in str(e.value)
        q = torch.randn(2, 2, 8, 16)
        with pytest.raises(ValueError, match="decreasing|negative"):  # before any kernel runs
            masked_attention(q, q, q, mask=mask, impl="naive")


def test_bad_segments_rows() -> None:
    m = documents(torch.tensor([0, 4, 8])) & shared_prefix(torch.tensor([[1, 2, 3]] * 3))
    with pytest.raises(ValueError, match="one row of G branch starts per document .* expected 2 rows, got 3"):
        m.check(1, 8, 8)
    with pytest.raises(ValueError, match="per batch row .* expected 2 rows, got 1"):
        shared_prefix(torch.tensor([[1, 2, 3]])).check(2, 8, 8)


def test_segments_rechecked_after_in_place_change() -> None:
    seg = torch.tensor([[1, 2, 3], [0, 3, 8]])
    m = documents(torch.tensor([0, 4, 8])) & shared_prefix(seg)
    m.check(1, 8, 8)
    seg[1, 2] = 2
    with pytest.raises(ValueError, match=r"row 1 has decreasing starts: \[0, 3, 2\]"):
        m.check(1, 8, 8)


def test_valid_segments_edge_cases_accepted() -> None:
    """Starts at (or past) the length (padding, no branches), repeats (empty branches), G = 8."""
    for segs in ([[8, 8, 8], [0, 0, 0]], [[3, 8, 9], [0, 4, 4]], [list(range(8)), [1] * 8]):
        seg = torch.tensor(segs)
        shared_prefix(seg).check(2, 8, 8)
        vis = shared_prefix(seg).dense(2, 8, 8)
        assert vis.shape == (2, 1, 8, 8) and vis.diagonal(dim1=2, dim2=3).all()  # a query always sees itself
    assert torch.equal(shared_prefix(torch.tensor([[8, 8, 8]])).dense(1, 8, 8),
                       AttentionMask().dense(1, 8, 8))  # no branches = causal


class _HostReads(TorchFunctionMode):
    """Records the tensor methods that read values back to the host (a GPU sync on CUDA)."""

    NAMES = {"tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_checking_segments_reads_the_host_once() -> None:
    """The non-decreasing check rides the one host read of ``_tensor_facts`` (one ``tolist``), and a second
    check of the same mask reads nothing."""
    m = documents(torch.tensor([0, 4, 8])) & shared_prefix(torch.tensor([[1, 2, 3, 3, 4], [0, 1, 4, 4, 4]]))
    with _HostReads() as first:
        m.check(1, 8, 8)
    with _HostReads() as second:
        m.check(1, 8, 8)
    assert first.reads == ["tolist"] and second.reads == []
