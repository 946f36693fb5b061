"""Edits and their translation into token splices.

A *splice* ``(start, end, ids)`` replaces tokens ``[start, end)`` of the current sequence by ``ids``. Token edits
are splices already; a text edit (characters ``[start, end)`` → ``text``) becomes one by re-tokenizing a small
window around it:

1. widen the character span to whole lines (``window="line"``) or leave it (``window="token"``);
2. widen it to *clean* token boundaries: a token that straddles the span is part of the window, and so is a
   group of tokens that splits one character (byte-level BPE pieces of a multi-byte character);
3. tokenize the edited window text on its own and splice the result in. Tokens that straddle the edit are thus
   always replaced; tokens outside the window never change, even where tokenizing the whole new text would have
   merged across the window edge (the context's ids stay a valid tokenization of its text, not necessarily the
   one a fresh tokenization would give);
4. with ``trim_common``, tokens shared by the old and new window at either end are kept (not re-encoded).

Character offsets of token boundaries are kept in ``bounds`` (length ``T + 1``): ``bounds[i]`` is where token
``i`` starts, or ``-1`` where the boundary before token ``i`` falls inside a character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .checks import PIEEditError

__all__ = ["TextEdit", "TokenEdit", "Splice", "token_bounds", "run_bounds", "text_to_splices", "normalise_splices"]


@dataclass(frozen=True)
class TextEdit:
    """Replace characters ``[start, end)`` of the context's text by ``text`` (insert: ``start == end``;
    delete: ``text == ""``). Offsets refer to the text *before* the call, as do all edits of one call."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TokenEdit:
    """Replace tokens ``[start, end)`` by ``ids`` (insert: ``start == end``; delete: ``ids == ()``)."""

    start: int
    end: int
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Splice:
    """A token edit after validation, plus the character bounds of its new tokens (relative to its start)."""

    start: int
    end: int
    ids: tuple[int, ...]
    text: str | None = None  # the new tokens' text, when the context tracks text
    rel_bounds: tuple[int, ...] | None = None  # len(ids) + 1 boundaries relative to the splice's first char


def _check_int(name: str, v: Any) -> int:  # noqa: ANN401
    if isinstance(v, bool) or not isinstance(v, int):
        raise PIEEditError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    return v


def token_bounds(offsets: Sequence[tuple[int, int]], n_chars: int) -> list[int]:
    """``bounds`` (see the module doc) from a tokenizer's ``offset_mapping`` of a text of ``n_chars`` characters.

    A gap between two tokens (offsets trimmed of whitespace) goes to the following token; overlapping offsets
    (one character split over several tokens) make the boundary between them unclean (``-1``).
    """
    t = len(offsets)
    bounds = [0] * (t + 1)
    for i in range(1, t):
        prev_end, start = offsets[i - 1][1], offsets[i][0]
        bounds[i] = prev_end if prev_end <= start else -1
    bounds[t] = n_chars
    return bounds


def run_bounds(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[int]]:  # noqa: ANN401
    """Text of a token run and its bounds, by decoding growing prefixes (short runs: token edits only)."""
    text = _decode(tokenizer, ids)
    bounds = [0]
    for k in range(1, len(ids)):
        part = _decode(tokenizer, ids[:k])
        # A prefix ending inside a multi-byte character decodes to a replacement char: not a clean boundary.
        bounds.append(len(part) if text.startswith(part) and "\ufffd" not in part[-1:] else -1)
    bounds.append(len(text))
    return text, bounds


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:  # noqa: ANN401
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def normalise_splices(splices: Sequence[Splice], n_tokens: int) -> list[Splice]:
    """Sorted splices, checked to lie in ``[0, n_tokens]`` and not to overlap (touching ones are merged)."""
    out = sorted(splices, key=lambda s: (s.start, s.end))
    for sp in out:
        if not 0 <= sp.start <= sp.end <= n_tokens:
            raise PIEEditError(f"token span [{sp.start}, {sp.end}) is out of range for a context of {n_tokens} "
                               "tokens (need 0 <= start <= end <= length)")
    merged: list[Splice] = []
    for sp in out:
        if merged and sp.start < merged[-1].end:
            raise PIEEditError(f"edits overlap: tokens [{merged[-1].start}, {merged[-1].end}) and "
                               f"[{sp.start}, {sp.end}); merge them into one edit")
        if merged and sp.start == merged[-1].end and (sp.start != sp.end or merged[-1].start != merged[-1].end):
            prev = merged.pop()
            text = rel = None
            if prev.text is not None and sp.text is not None and prev.rel_bounds and sp.rel_bounds:
                text = prev.text + sp.text
                rel = prev.rel_bounds[:-1] + tuple(b + len(prev.text) if b >= 0 else -1 for b in sp.rel_bounds)
            merged.append(Splice(prev.start, sp.end, prev.ids + sp.ids, text, rel))
        elif merged and sp.start == sp.end == merged[-1].start == merged[-1].end:
            raise PIEEditError(f"two insertions at token {sp.start}: give them as one edit")
        else:
            merged.append(sp)
    return merged


def token_edit_to_splice(edit: TokenEdit, n_tokens: int, vocab: int | None) -> Splice:
    """Validate a :class:`TokenEdit` (range, id types, ids < vocab)."""
    start, end = _check_int("TokenEdit.start", edit.start), _check_int("TokenEdit.end", edit.end)
    ids = tuple(_check_int("TokenEdit.ids[i]", i) for i in edit.ids)
    if not 0 <= start <= end <= n_tokens:
        raise PIEEditError(f"TokenEdit span [{start}, {end}) is out of range for a context of {n_tokens} tokens")
    if vocab is not None and any(not 0 <= i < vocab for i in ids):
        raise PIEEditError(f"TokenEdit.ids must be in [0, {vocab}), got {[i for i in ids if not 0 <= i < vocab]}")
    return Splice(start, end, ids)


def text_to_splices(edits: Sequence[TextEdit], text: str, ids: Sequence[int], bounds: Sequence[int],
                    tokenizer: Any, window: str, trim_common: bool) -> list[Splice]:  # noqa: ANN401
    """Token splices (old coordinates) equivalent to the text ``edits`` applied to ``text`` (module doc)."""
    n_chars, n_tok = len(text), len(ids)
    edits = sorted(edits, key=lambda e: (e.start, e.end))
    for e in edits:
        if not isinstance(e, TextEdit):
            raise PIEEditError(f"expected TextEdit objects, got {type(e).__name__}")
        if not isinstance(e.text, str):
            raise PIEEditError(f"TextEdit.text must be a str, got {type(e.text).__name__}")
        s, t = _check_int("TextEdit.start", e.start), _check_int("TextEdit.end", e.end)
        if not 0 <= s <= t <= n_chars:
            raise PIEEditError(f"TextEdit span [{s}, {t}) is out of range for a text of {n_chars} characters "
                               "(need 0 <= start <= end <= len(text))")
    for a, b in zip(edits, edits[1:]):
        if b.start < a.end or (b.start == a.start == a.end == b.end):
            raise PIEEditError(f"text edits overlap: [{a.start}, {a.end}) and [{b.start}, {b.end})")

    # Token windows [s, e) per edit, then merge windows that touch (one re-tokenization each).
    windows: list[list[Any]] = []  # [tok_start, tok_end, [edits]]
    for e in edits:
        c0, c1 = e.start, e.end
        if window == "line":
            c0 = text.rfind("\n", 0, c0) + 1
            nl = text.find("\n", c1)
            c1 = n_chars if nl < 0 else nl + 1
        s = _token_at_or_before(bounds, c0, n_tok)
        t = _token_at_or_after(bounds, c1, n_tok)
        if windows and s <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], t)
            windows[-1][2].append(e)
        else:
            windows.append([s, t, [e]])

    splices = []
    for s, t, group in windows:
        w0, w1 = bounds[s], bounds[t]
        pieces, pos = [], w0
        for e in group:  # apply the group's edits to the window text, left to right
            pieces += [text[pos:e.start], e.text]
            pos = e.end
        pieces.append(text[pos:w1])
        new_text = "".join(pieces)
        enc = tokenizer(new_text, add_special_tokens=False, return_offsets_mapping=True)
        new_ids = list(enc["input_ids"])
        new_b = token_bounds(enc["offset_mapping"], len(new_text))
        old_ids = list(ids[s:t])
        lo, hi = 0, 0
        if trim_common:  # keep shared tokens at both ends (only at clean boundaries, so texts still line up)
            while (lo < min(len(old_ids), len(new_ids)) and old_ids[lo] == new_ids[lo]
                   and new_b[lo + 1] >= 0 and bounds[s + lo + 1] >= 0
                   and new_b[lo + 1] == bounds[s + lo + 1] - w0):
                lo += 1
            while (hi < min(len(old_ids), len(new_ids)) - lo and old_ids[-1 - hi] == new_ids[-1 - hi]
                   and new_b[len(new_ids) - 1 - hi] >= 0 and bounds[t - 1 - hi] >= 0
                   and len(new_text) - new_b[len(new_ids) - 1 - hi] == w1 - bounds[t - 1 - hi]):
                hi += 1
        kept = new_ids[lo:len(new_ids) - hi]
        rel0 = new_b[lo]
        rel = tuple(b - rel0 if b >= 0 else -1 for b in new_b[lo:len(new_ids) - hi + 1])
        seg_text = new_text[rel0:new_b[len(new_ids) - hi]]
        if (t - hi) - (s + lo) == 0 and not kept:
            continue  # the edit changed nothing at the token level (e.g. replaced a span by the same text)
        splices.append(Splice(s + lo, t - hi, tuple(kept), seg_text, rel))
    return splices


def _token_at_or_before(bounds: Sequence[int], c: int, n_tok: int) -> int:
    """Largest token index ``i`` with a clean boundary ``bounds[i] <= c``."""
    lo, hi = 0, n_tok  # binary search over clean boundaries is awkward with -1s; walk back from a bisect hit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        b = _clean_left(bounds, mid)
        if b <= c:
            lo = mid
        else:
            hi = mid - 1
    while lo > 0 and bounds[lo] < 0:
        lo -= 1
    return lo


def _token_at_or_after(bounds: Sequence[int], c: int, n_tok: int) -> int:
    """Smallest token index ``i`` with a clean boundary ``bounds[i] >= c`` (``n_tok`` at the end)."""
    lo, hi = 0, n_tok
    while lo < hi:
        mid = (lo + hi) // 2
        if _clean_left(bounds, mid) >= c:
            hi = mid
        else:
            lo = mid + 1
    while lo < n_tok and bounds[lo] < 0:
        lo += 1
    return lo


def _clean_left(bounds: Sequence[int], i: int) -> int:
    """The nearest clean boundary at or before index ``i`` (bounds are monotone where clean)."""
    while bounds[i] < 0:
        i -= 1
    return bounds[i]
