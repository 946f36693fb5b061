"""Online suffix automaton over token ids: the index behind the suffix drafter.

A suffix automaton (Blumer et al., 1985) of a sequence ``S`` is the smallest automaton that accepts
every substring of ``S``. It has at most ``2 |S|`` states and is built online: appending one token costs
amortised O(1). Two queries serve speculative decoding:

* after each append, the **longest suffix of ``S`` that also occurred earlier** (its length and the
  end position of an earlier occurrence): the drafter copies what followed that occurrence;
* for an external context, the **longest suffix of the context that occurs anywhere in ``S``**
  (matching statistics), used against the global cache of earlier outputs.

Each state keeps ``pos``: the end position of *one* occurrence of its strings. It starts as the first
occurrence and is moved to the newest occurrence whenever the state becomes "the longest earlier suffix"
of a new append, so copies come from the most recent repetition (what an edit or a loop repeats).

Examples::

    >>> sam = SuffixAutomaton()
    >>> sam.extend([5, 6, 7, 8, 5, 6])
    >>> sam.match_len, sam.match_end    # "5 6" occurred before, ending at index 1
    (2, 1)
    >>> sam.copy_from(sam.match_end, 3)  # what followed it (the copy may overlap the end)
    [7, 8, 5]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["SEPARATOR", "SuffixAutomaton"]

# Token id that separates sequences in a multi-sequence automaton. Real token ids are >= 0, so no
# context ever contains it and no match can cross from one stored sequence into the next.
SEPARATOR = -1


class SuffixAutomaton:
    """Suffix automaton of a growing token sequence (pure Python, O(1) amortised per token).

    Attributes:
        tokens: the indexed sequence (read-only for callers).
        match_len: after the last :meth:`extend`, length of the longest suffix that occurred earlier
            (0 if none).
        match_end: end index of that earlier occurrence (``-1`` if none).
    """

    __slots__ = ("tokens", "_next", "_link", "_len", "_pos", "_last", "match_len", "match_end")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        # Parallel per-state arrays (lists beat small objects on memory and speed in CPython).
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._len: list[int] = [0]
        self._pos: list[int] = [-1]
        self._last = 0
        self.match_len = 0
        self.match_end = -1

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_states(self) -> int:
        """Number of automaton states (<= 2 * len + 1)."""
        return len(self._len)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens (amortised O(1) each) and update :attr:`match_len` / :attr:`match_end`."""
        # One loop with everything in locals: this is the drafter's hottest code (every prompt token
        # and every generated token passes here once), so no per-token method call or attribute load.
        toks, nxt, link, length, pos = self.tokens, self._next, self._link, self._len, self._pos
        last = self._last
        match_len, match_end = self.match_len, self.match_end
        for token in tokens:
            token = int(token)
            i = len(toks)
            toks.append(token)
            cur = len(length)
            nxt.append({})
            length.append(length[last] + 1)
            link.append(0)
            pos.append(i)
            p = last
            while p != -1 and token not in nxt[p]:
                nxt[p][token] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][token]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:
                    clone = len(length)
                    nxt.append(dict(nxt[q]))
                    length.append(length[p] + 1)
                    link.append(link[q])
                    pos.append(pos[q])
                    while p != -1 and nxt[p].get(token) == q:
                        nxt[p][token] = clone
                        p = link[p]
                    link[q] = clone
                    link[cur] = clone
            last = cur
            # link[cur] holds the longest suffix that also ends earlier. Read its earlier end before
            # recording this newer one, so later copies prefer the most recent repetition.
            v = link[cur]
            if token == SEPARATOR or v <= 0:
                match_len, match_end = 0, -1
            else:
                match_len, match_end = length[v], pos[v]
                pos[v] = i
        self._last = last
        self.match_len, self.match_end = match_len, match_end

    def walk(
        self, context: Iterable[int], state: tuple[int, int] = (0, 0), max_len: int | None = None
    ) -> tuple[int, int]:
        """Matching statistics, resumable: feed a context in pieces and get the same answer.

        Args:
            context: tokens to feed.
            state: ``(state, length)`` returned by the previous call for the tokens before
                ``context`` (``(0, 0)``: nothing fed yet). Valid only while the automaton is unchanged.
            max_len: consider only suffixes of at most this many tokens (``None``: any length), i.e.
                the answer for the last ``max_len`` tokens of everything fed so far.

        Returns:
            ``(state, length)``: the automaton state holding the longest suffix of everything fed that
            occurs in the indexed sequence, and that suffix's length (``(0, 0)`` if none).
        """
        nxt, link, length = self._next, self._link, self._len
        v, n = state
        for t in context:
            t = int(t)
            # Fall back along suffix links on a mismatch, then step.
            while v and t not in nxt[v]:
                v = link[v]
                n = length[v]
            step = nxt[v].get(t)
            if step is None:
                v, n = 0, 0
                continue
            v, n = step, n + 1
            if max_len is not None and n > max_len:
                n = max_len
                while length[link[v]] >= n:  # the state that holds the suffix of length max_len
                    v = link[v]
        return v, n

    def suffix_matches(self, state: int, length: int) -> Iterator[tuple[int, int]]:
        """``(length, end)`` of the match ``(state, length)`` from :meth:`walk`, then of its shorter
        suffixes along suffix links (their stored occurrence may lie elsewhere), longest first."""
        if length == 0:
            return
        link, lens, pos = self._link, self._len, self._pos
        yield length, pos[state]
        v = link[state]
        while v > 0:
            yield lens[v], pos[v]
            v = link[v]

    def match(self, context: Sequence[int]) -> tuple[int, int]:
        """Longest suffix of ``context`` that occurs in the indexed sequence, O(len(context)).

        Returns:
            ``(length, end)``: the match length and the end index of one occurrence (``(0, -1)`` if
            not even the last token occurs).
        """
        v, n = self.walk(context)
        return (n, self._pos[v]) if n else (0, -1)

    def matches(self, context: Sequence[int]) -> list[tuple[int, int]]:
        """``(length, end)`` for the context's matching suffixes, longest first.

        The first entry equals :meth:`match`; the others follow suffix links: shorter matches whose
        stored occurrence may lie elsewhere (the global cache uses them to skip evicted sequences).
        """
        return list(self.suffix_matches(*self.walk(context)))

    def copy_from(self, end: int, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed position ``end``, LZ77-style.

        When the copy runs past the end of the sequence it continues from its own output, so a
        periodic tail ("a b a b a b") keeps drafting its period. Stops at a :data:`SEPARATOR`.
        """
        toks = self.tokens
        src = end + 1
        out = toks[src : src + max_tokens]
        if SEPARATOR in out:
            del out[out.index(SEPARATOR) :]
        elif out and len(out) < max_tokens:
            # Ran into the present: token j repeats token j - period of the copy itself.
            period = len(out)
            for j in range(period, max_tokens):
                out.append(out[j - period])
        return out
