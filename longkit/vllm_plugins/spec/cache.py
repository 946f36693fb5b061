"""Global cache of earlier outputs: one suffix automaton over many sequences, LRU-evicted.

Finished requests store ``prompt tail + output`` here (the tail lets a re-asked prompt match before
the first output token). All stored sequences live in one :class:`SuffixAutomaton`, separated by
:data:`SEPARATOR`, so a lookup costs O(context) whatever the number of sequences.

A suffix automaton cannot delete, so eviction is lazy: an evicted sequence is marked dead, lookups
skip occurrences that lie in dead sequences, and the automaton is rebuilt from the live sequences
once dead tokens outnumber live ones. Every token is therefore re-indexed at most a constant number
of times on average (amortised O(1) per stored token), and an evicted sequence is never drafted from.
Between rebuilds a lookup can miss (or find a shorter) live match whose stored occurrence was in an
evicted sequence; after a rebuild lookups are exact.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from .automaton import SEPARATOR, SuffixAutomaton

__all__ = ["CacheMatcher", "OutputCache"]


class OutputCache:
    """Bounded LRU cache of token sequences with suffix lookups.

    Args:
        max_sequences: most sequences kept (LRU order; 0 disables the cache).
        max_tokens: most tokens kept over all live sequences (LRU order; 0 disables the cache).
    """

    def __init__(self, max_sequences: int, max_tokens: int) -> None:
        self.max_sequences = max_sequences
        self.max_tokens = max_tokens
        # key -> (start, end) of the sequence in the automaton's token store; order = LRU (oldest first).
        self._live: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()
        self._by_content: dict[tuple[int, ...], Hashable] = {}
        self._content_of: dict[Hashable, tuple[int, ...]] = {}
        self._live_tokens = 0
        # Bumped whenever the automaton changes (a sequence indexed, a rebuild): CacheMatcher states
        # are valid only for the version they were computed on.
        self._version = 0
        self._rebuild([])

    # -- bookkeeping -------------------------------------------------------------------------
    def _rebuild(self, order: list[Hashable]) -> None:
        """Re-index the given live sequences (most recent first, so first occurrences are the newest)."""
        self._sam = SuffixAutomaton()
        self._version += 1
        self._starts: list[int] = []
        self._keys: list[Hashable] = []
        self._dead_tokens = 0
        old = self._live
        self._live = OrderedDict()
        for key in order:
            self._index(key, self._content_of[key])
        # Restore LRU order (indexing appended them in reverse).
        self._live = OrderedDict((k, self._live[k]) for k in old if k in self._live)

    def _index(self, key: Hashable, seq: tuple[int, ...]) -> None:
        start = len(self._sam)
        self._version += 1
        self._sam.extend(seq)
        self._sam.extend((SEPARATOR,))
        self._starts.append(start)
        self._keys.append(key)
        self._live[key] = (start, start + len(seq))

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    @property
    def num_tokens(self) -> int:
        """Tokens in live sequences."""
        return self._live_tokens

    @property
    def indexed_tokens(self) -> int:
        """Tokens in the automaton, dead ones and separators included (memory is proportional to it)."""
        return len(self._sam)

    def keys(self) -> list[Hashable]:
        """Live keys, least recently used first."""
        return list(self._live)

    # -- public API ----------------------------------------------------------------------------
    def add(self, key: Hashable, tokens: Sequence[int]) -> None:
        """Store ``tokens`` under ``key`` as the most recently used entry, then evict to the bounds.

        Identical content already cached is not stored twice: the existing entry is refreshed.
        """
        seq = tuple(int(t) for t in tokens)
        if not seq or self.max_sequences <= 0 or self.max_tokens <= 0 or len(seq) > self.max_tokens:
            return
        if key in self._live:
            self._evict(key)
        existing = self._by_content.get(seq)
        if existing is not None:
            self.touch(existing)
            return
        self._content_of[key] = seq
        self._by_content[seq] = key
        self._index(key, seq)
        self._live_tokens += len(seq)
        while len(self._live) > self.max_sequences or self._live_tokens > self.max_tokens:
            self._evict(next(iter(self._live)))

    def compact(self) -> None:
        """Re-index the live sequences now (lookups are then exact until the next eviction)."""
        self._rebuild(list(reversed(self._live)))

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` as most recently used."""
        if key in self._live:
            self._live.move_to_end(key)

    def _evict(self, key: Hashable) -> None:
        start, end = self._live.pop(key)
        seq = self._content_of.pop(key)
        del self._by_content[seq]
        self._live_tokens -= end - start
        self._dead_tokens += end - start + 1
        if self._dead_tokens > max(self._live_tokens, 1024):
            self.compact()

    def _owner(self, position: int) -> Hashable | None:
        i = bisect.bisect_right(self._starts, position) - 1
        key = self._keys[i] if i >= 0 else None
        return key if key in self._live and self._live[key][0] == self._starts[i] else None

    def lookup(self, context: Sequence[int], max_tokens: int) -> tuple[int, list[int], Hashable | None]:
        """Longest match of the context's suffix in a live sequence, and what followed it there.

        Returns:
            ``(match_len, continuation, key)``; ``(0, [], None)`` if nothing live matches.
        """
        if not self._live or max_tokens <= 0:
            return 0, [], None
        return self._continuation(*self._sam.walk(context), max_tokens)

    def matcher(self, depth: int) -> CacheMatcher:
        """An incremental :meth:`lookup` of the last ``depth`` tokens of one growing context."""
        return CacheMatcher(self, depth)

    def _continuation(self, state: int, length: int, max_tokens: int) -> tuple[int, list[int], Hashable | None]:
        for n, end in self._sam.suffix_matches(state, length):
            key = self._owner(end)
            if key is not None:
                return n, self._sam.copy_from(end, max_tokens), key
        return 0, [], None


class CacheMatcher:
    """:meth:`OutputCache.lookup` of a growing context's last ``depth`` tokens, in O(new tokens).

    Matching statistics capped at ``depth`` carry over from one call to the next, so each call feeds
    only the tokens appended since the previous one (a fresh lookup walks all ``depth``). The answer is
    the same as ``cache.lookup(tokens[-depth:], max_tokens)``. When the cache's automaton changed (a
    sequence was added, or it was rebuilt) the state is recomputed from the last ``depth`` tokens.

    Args:
        cache: the cache to match against.
        depth: context tokens considered (the drafter's ``max_depth``).
    """

    __slots__ = ("_cache", "_depth", "_version", "_state", "_len", "_seen")

    def __init__(self, cache: OutputCache, depth: int) -> None:
        self._cache = cache
        self._depth = depth
        self._version = -1
        self._state = self._len = self._seen = 0

    def lookup(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, list[int], Hashable | None]:
        """Like ``cache.lookup(tokens[-depth:], max_tokens)``; ``tokens`` must extend the previous call's.

        Returns:
            ``(match_len, continuation, key)``; ``(0, [], None)`` if nothing live matches.
        """
        cache = self._cache
        if not cache._live or max_tokens <= 0:
            return 0, [], None
        total, start = len(tokens), self._seen
        if self._version != cache._version or not 0 <= total - start <= self._depth:
            self._version = cache._version
            self._state = self._len = 0
            start = max(0, total - self._depth)
        if start < total:
            self._state, self._len = cache._sam.walk(
                tokens[start:total], (self._state, self._len), self._depth
            )
        self._seen = total
        return cache._continuation(self._state, self._len, max_tokens)
