"""The one mask specification shared by every masked-attention caller.

Layout convention (used by every kernel in :mod:`longkit.kernels`):
``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (GQA, K/V never repeated).
Keys sit at positions ``0 .. Tk-1``; query ``i`` sits at position ``q_offset + i`` (``q_offset =
Tk - Tq`` for the usual "queries are the last tokens" case of chunked prefill and decoding).

A key ``j`` is visible to query ``i`` (positions ``p = q_offset + i`` and ``j``) when all hold:

* causal: ``j <= p``;
* window (``n_local``): ``p - j < n_local`` — the *local branch* — or ``j < n_global`` — the *global
  branch* (LM-Infinite's Λ shape; StreamingLLM's sinks). Without a window every causal key is local;
* documents (``cu_seqlens``, packed rows, ``B == 1``, ``Tq == Tk``): ``j`` and ``p`` in the same document,
  and windows/sinks are counted from the document start;
* shared prefix (one prompt, ``G >= 2`` branches; :func:`shared_prefix`): per document (or per batch row
  without documents) ``G`` branch starts ``s_1 <= s_2 <= ... <= s_G``, offsets from its start. Keys
  ``[0, s_1)`` are the shared prefix; branch ``b`` spans ``[s_b, s_{b+1})``, the last one ``[s_G, end)``
  of its row/document. A query in branch ``b`` sees the prefix and branch ``b`` only (causally: it cannot
  see the keys ``[s_1, s_b)`` of the branches before its own); a query in the prefix sees the prefix.
  A position belongs to the branch of the last start at or before its offset (to the prefix if ``s_1`` is
  after it): an empty branch (``s_b == s_{b+1}``) holds no token, and starts equal to (or past) the
  row/document length give empty trailing branches, which is how rows with fewer branches are padded to a
  common ``G``; ``s_1`` equal to the length makes the whole row/document prefix (plain causal).
  ``G = 2`` is prefix-shared DPO with ``(s_1, s_2) = (chosen_start, rejected_start)``: a query at
  ``>= rejected_start`` cannot see ``[chosen_start, rejected_start)``; the packed row is
  ``prompt + chosen + prompt[-1] + rejected`` with ``chosen_start = P - 1``, ``rejected_start = P + C``.
  The same layout for ``G`` completions of one prompt (GRPO) is
  ``prompt[:-1] + (prompt[-1] + c_1) + ... + (prompt[-1] + c_G)``: ``s_1 = P - 1``,
  ``s_{b+1} = s_b + 1 + len(c_b)``.

The LM-Infinite *distance limit* is not a visibility rule: global-branch keys outside the window are
scored with a second query/key pair (``q_global``/``k_global``) that the caller rotates so that their
relative distance is the clamped one. See :func:`longkit.kernels.masked_attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from longkit._validate import BUILTIN, check_bool, check_int, describe

__all__ = ["AttentionMask", "causal", "sink_window", "documents", "shared_prefix"]


def tensor_version(t: torch.Tensor | None) -> int | None:
    """``t``'s in-place modification counter (-1 for no tensor), or None where torch keeps none (inference
    tensors): callers that memoise on it must then not memoise."""
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def _position(name: str, value: Any, low: int, allow_none: bool) -> Any:  # noqa: ANN401
    """A position or count field as an ``int`` (TypeError for floats, strings, bools; ValueError below ``low``).

    A ``torch.SymInt`` (a shape under ``torch.compile``) passes unchecked: comparing it would add a guard.
    """
    if isinstance(value, torch.SymInt):
        return value
    return check_int("AttentionMask", name, value, min=low, allow_none=allow_none, errors=BUILTIN)


def _tensor(name: str, value: Any, example: str) -> torch.Tensor:  # noqa: ANN401
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"AttentionMask.{name} must be a torch.Tensor, got {describe(value)}; e.g. {example}")
    return value


@dataclass(frozen=True)
class AttentionMask:
    """Visibility rule between queries and keys (see module docstring for the exact semantics).

    Build it with :func:`causal`, :func:`sink_window`, :func:`documents`, :func:`shared_prefix` and
    combine with ``&`` (e.g. ``documents(cu) & shared_prefix(segs)`` for packed prefix-shared DPO).
    """

    causal: bool = True
    q_offset: int = 0
    n_global: int = 0
    n_local: int | None = None
    cu_seqlens: torch.Tensor | None = None
    prefix_segments: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_bool("AttentionMask", "causal", self.causal, errors=BUILTIN)
        if not self.causal:
            raise ValueError("only causal masks are supported (causal=False given)")
        object.__setattr__(self, "q_offset", _position("q_offset", self.q_offset, 0, False))
        object.__setattr__(self, "n_global", _position("n_global", self.n_global, 0, False))
        object.__setattr__(self, "n_local", _position("n_local", self.n_local, 1, True))
        if self.n_global and self.n_local is None:
            raise ValueError("n_global (sink tokens) only makes sense together with a window n_local")
        if self.cu_seqlens is not None:
            cu = _tensor("cu_seqlens", self.cu_seqlens, "documents(torch.tensor([0, 5, 9], dtype=torch.int32))")
            if cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    "cu_seqlens must be a 1-D int32/int64 tensor [num_docs + 1] starting at 0, "
                    f"got shape {tuple(cu.shape)} dtype {cu.dtype}"
                )
        if self.prefix_segments is not None:
            seg = _tensor("prefix_segments", self.prefix_segments, "shared_prefix(torch.tensor([[3, 7]]))")
            if seg.dim() != 2 or seg.shape[1] < 2 or seg.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    "shared-prefix segments must be an int32/int64 tensor [rows_or_docs, G] of branch starts "
                    "s_1 <= ... <= s_G (G >= 2 branches, offsets from each row's/document's start; DPO passes "
                    "an int tensor [rows_or_docs, 2] of (chosen_start, rejected_start)), got shape "
                    f"{tuple(seg.shape)} dtype {seg.dtype}; pad rows with fewer branches with starts equal to "
                    "their length (empty branches), and cast with .to(torch.int32)"
                )

    # ------------------------------------------------------------------ composition
    def __and__(self, other: AttentionMask) -> AttentionMask:
        if not isinstance(other, AttentionMask):
            return NotImplemented
        merged = {}
        for name, default in (("q_offset", 0), ("n_global", 0), ("n_local", None),
                              ("cu_seqlens", None), ("prefix_segments", None)):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a is not default and b is not default:
                same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                if not same:
                    raise ValueError(f"cannot combine two masks that both set {name} ({a!r} vs {b!r})")
            merged[name] = b if (a is None or a is default) else a
        return AttentionMask(**merged)

    def with_offset(self, q_offset: int) -> AttentionMask:
        """The same rule with queries starting at absolute position ``q_offset``."""
        return replace(self, q_offset=q_offset)

    @property
    def kind(self) -> str:
        """Short name used in benchmark tables and error messages."""
        parts = []
        if self.cu_seqlens is not None:
            parts.append("documents")
        if self.prefix_segments is not None:
            parts.append("shared_prefix")
        if self.n_local is not None:
            parts.append(f"sink_window(n_global={self.n_global}, n_local={self.n_local})")
        return " & ".join(parts) or "causal"

    # ------------------------------------------------------------------ validation
    def check(self, batch: int, tq: int, tk: int) -> None:
        """Raise ``ValueError`` if this mask cannot apply to the given shapes."""
        if self.q_offset + tq > tk:
            raise ValueError(
                f"queries end at position q_offset + Tq = {self.q_offset} + {tq} > Tk = {tk}; "
                "queries must be the last tokens of the keys (use q_offset = Tk - Tq)"
            )
        if self.cu_seqlens is None and self.prefix_segments is None:
            return
        first, last, increasing, segs_ok = self._tensor_facts()
        if self.cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"batch size must be 1 with cu_seqlens (packed documents), got {batch}")
            if tq != tk or self.q_offset != 0:
                raise ValueError("documents(cu_seqlens) needs Tq == Tk and q_offset == 0 (packed prefill)")
            if first != 0 or last != tk:
                raise ValueError(f"cu_seqlens must start at 0 and end at Tk={tk}, got [{first} .. {last}]")
            if not increasing:
                raise ValueError("cu_seqlens must be non-decreasing")
        if self.prefix_segments is not None:
            rows = self.cu_seqlens.numel() - 1 if self.cu_seqlens is not None else batch
            if self.prefix_segments.shape[0] != rows:
                what = "document" if self.cu_seqlens is not None else "batch row"
                raise ValueError(
                    f"shared-prefix segments must have one row of G branch starts per {what} (for DPO "
                    f"(chosen_start, rejected_start)): expected {rows} rows, got {self.prefix_segments.shape[0]}"
                )
            if not segs_ok:
                raise ValueError(self._bad_segments_message())

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(cu_seqlens, prefix_segments)`` on ``device``: copied once per device and mask (again after an
        in-place change of the originals), so that every layer passes the kernels the same tensors (whose
        tables are then memoised) and a CPU-held mask costs one host-to-device copy, not one per call."""
        cu, seg = self.cu_seqlens, self.prefix_segments
        if all(t is None or t.device == device for t in (cu, seg)):
            return cu, seg
        return self._memo("_on_device", (str(device), tensor_version(cu), tensor_version(seg)),
                          lambda: tuple(t.to(device) if t is not None else None for t in (cu, seg)))

    def _bad_segments_message(self) -> str:
        """Which segments row is invalid and why (only on the error path, so its extra reads cost nothing)."""
        seg = self.prefix_segments.long()
        bad = (seg[:, 0] < 0) | (seg[:, 1:] < seg[:, :-1]).any(1)
        r = int(bad.nonzero()[0, 0]) if bool(bad.any()) else 0
        starts = seg[r].tolist()
        why = "a negative start" if min(starts) < 0 else "decreasing starts"
        return (f"shared-prefix segments need branch starts 0 <= s_1 <= s_2 <= ... <= s_G in every row (for DPO "
                f"0 <= chosen_start <= rejected_start); row {r} has {why}: {starts}. Starts are offsets from the "
                "row's/document's start, in branch order; an empty branch repeats the next start")

    def _tensor_facts(self) -> tuple[int, int, bool, bool]:
        """(cu_seqlens[0], cu_seqlens[-1], cu_seqlens non-decreasing, segments valid: every start >= 0 and
        non-decreasing along each row), read from the tensors once
        per mask and again only after one of them was modified in place (its ``_version`` changed).

        Reading a CUDA tensor's values syncs the host with the GPU; done on every call (every layer, forward and
        backward), the GPU would idle while the host validates and launches the next kernel. Inference tensors
        have no version counter: those are re-read on every call."""
        cu, seg = self.cu_seqlens, self.prefix_segments
        return self._memo("_facts", (tensor_version(cu), tensor_version(seg)), self._read_tensor_facts)

    def _read_tensor_facts(self) -> tuple[int, int, bool, bool]:
        cu, seg = self.cu_seqlens, self.prefix_segments
        dev = cu.device if cu is not None else seg.device
        one = torch.ones((), dtype=torch.int64, device=dev)
        if cu is not None:
            first, last, increasing = cu[0].long(), cu[-1].long(), (cu[1:] >= cu[:-1]).all().long()
        else:
            first, last, increasing = one, one, one
        if seg is not None:
            segs_ok = ((seg[:, 0] >= 0) & (seg[:, 1:] >= seg[:, :-1]).all(1)).all().long().to(dev)
        else:
            segs_ok = one
        first, last, increasing, segs_ok = torch.stack([first, last, increasing, segs_ok]).tolist()  # one sync
        return first, last, bool(increasing), bool(segs_ok)

    def _memo(self, name: str, key: tuple, compute: Callable[[], Any]) -> Any:  # noqa: ANN401
        """``compute()``, kept on this mask under ``name`` while ``key`` (which holds its tensors' version
        counters) is unchanged. A key holding None (an inference tensor: no version counter) is never reused."""
        memo = self.__dict__.get(name)
        if memo is not None and memo[0] == key and None not in key:
            return memo[1]
        value = compute()
        object.__setattr__(self, name, (key, value))  # frozen dataclass: a private memo, not a field
        return value

    # ------------------------------------------------------------------ dense form (references, tests)
    def dense(self, batch: int, tq: int, tk: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Materialise the rule as a bool tensor ``[B, 1, Tq, Tk]`` (True = visible).

        O(Tq·Tk) memory: for references and tests only, never for long inputs.
        """
        self.check(batch, tq, tk)
        p = torch.arange(tq, device=device)[:, None] + self.q_offset  # [Tq, 1] absolute query positions
        j = torch.arange(tk, device=device)[None, :]  # [1, Tk]
        visible = (j <= p).expand(batch, tq, tk).clone()
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.to(device=device, dtype=torch.long)
            doc = torch.bucketize(torch.arange(tk, device=device), cu[1:], right=True)  # doc id per token
            start = cu[doc]  # document start per token
            q_doc = doc[p.squeeze(1)][:, None]
            visible &= (doc[None, :] == q_doc)[None]
            j_rel = j - start[None, :]  # key offset within its document
        else:
            j_rel = j
        if self.n_local is not None:
            local = (p - j) < self.n_local
            glob = j_rel < self.n_global
            visible &= (local | glob)[None]
        if self.prefix_segments is not None:
            # branch of every token: the number of starts at or before its offset (0 = prefix, b = branch b);
            # a key is visible if it is in the prefix or in the query's own branch
            seg = self.prefix_segments.to(device=device, dtype=torch.long)
            t = torch.arange(tk, device=device)
            if self.cu_seqlens is not None:
                branch = (seg[doc] <= (t - start)[:, None]).sum(1)[None]  # [1, Tk]
            else:
                branch = (seg[:, None, :] <= t[None, :, None]).sum(2)  # [B, Tk]
            kb = branch[:, None, :]  # [B or 1, 1, Tk]
            qb = branch[:, p.squeeze(1), None]  # [B or 1, Tq, 1]
            visible &= (kb == 0) | (kb == qb)
        return visible[:, None]

    def global_branch(self, batch: int, tq: int, tk: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool ``[B, 1, Tq, Tk]``: visible keys reached only through the global branch (outside the window).

        These are the pairs scored with ``q_global``/``k_global`` when the distance limit is used.
        """
        vis = self.dense(batch, tq, tk, device)
        if self.n_local is None:
            return torch.zeros_like(vis)
        p = torch.arange(tq, device=device)[:, None] + self.q_offset
        j = torch.arange(tk, device=device)[None, :]
        return vis & ((p - j) >= self.n_local)


def causal(q_offset: int = 0) -> AttentionMask:
    """Plain causal attention; ``q_offset`` = absolute position of query 0 (chunked prefill, decode)."""
    return AttentionMask(q_offset=q_offset)


def sink_window(n_global: int, n_local: int, q_offset: int = 0) -> AttentionMask:
    """LM-Infinite's Λ mask: the first ``n_global`` keys plus the nearest ``n_local`` keys (causal).

    ``n_global=0`` gives plain causal sliding-window attention.
    """
    return AttentionMask(q_offset=q_offset, n_global=n_global, n_local=n_local)


def documents(cu_seqlens: torch.Tensor) -> AttentionMask:
    """Packed documents: block-diagonal causal over ``cu_seqlens`` (FlashAttention convention, B=1)."""
    return AttentionMask(cu_seqlens=cu_seqlens)


def shared_prefix(segments: torch.Tensor) -> AttentionMask:
    """One shared prompt and ``G >= 2`` branches per row (or per document, with :func:`documents`).

    ``segments`` is an int32/int64 tensor ``[rows_or_docs, G]``: row ``r`` holds the branch starts
    ``s_1 <= s_2 <= ... <= s_G`` (all ``>= 0``), offsets from the row's (document's) start. Keys ``[0, s_1)`` are
    the shared prefix; branch ``b`` spans ``[s_b, s_{b+1})`` and the last one ``[s_G, end)``. A query in
    branch ``b`` sees (causally) the prefix and branch ``b`` only, i.e. not ``[s_1, s_b)``; a query in the prefix
    sees the prefix. Empty branches are allowed (``s_b == s_{b+1}``, or starts equal to the row's/document's
    length: pad groups with fewer branches to a common ``G`` that way; ``s_1`` equal to the length makes the whole
    row/document prefix).

    ``G = 2`` is prefix-shared DPO, ``segments[r] = (chosen_start, rejected_start)``: queries at or after
    ``rejected_start`` cannot see ``[chosen_start, rejected_start)``. ``G`` completions of one prompt (GRPO) are
    the same with more columns. The starts are checked (non-negative, non-decreasing) when the mask is first used,
    in the one host read of :meth:`AttentionMask.check`.

    Examples::

        >>> import torch
        >>> from longkit.kernels import shared_prefix
        >>> m = shared_prefix(torch.tensor([[2, 4, 5]]))  # prefix [0, 2), branches [2, 4), [4, 5), [5, 7)
        >>> m.dense(1, 7, 7)[0, 0, 6].int().tolist()  # the last query: prefix and its own branch
        [1, 1, 0, 0, 0, 1, 1]
    """
    return AttentionMask(prefix_segments=segments)
