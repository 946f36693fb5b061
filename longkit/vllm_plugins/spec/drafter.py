"""Model-free drafter: suffix matching over the request and over earlier outputs, with copying.

For each request the drafter keeps a :class:`SuffixAutomaton` over prompt + output so far (updated in
O(new tokens)). Each step it considers two candidates:

* **local** (CopySpec): the longest suffix of the request that occurred earlier in it; the draft
  copies what followed, and a copy that runs into the present continues from its own output, so long
  repeated spans (a file being re-emitted with edits, a loop) are drafted in full;
* **global** (SuffixDecoding): the longest suffix of the last ``max_depth`` tokens found in the
  :class:`OutputCache` of earlier requests' prompt tails + outputs (LRU-bounded).

Draft length adapts to the match length ``L`` (at most ``max_spec_factor * L + max_spec_offset``) and to
acceptance measured online: per source and per match-length bucket the drafter keeps an estimate
``a`` of the probability that a draft token is accepted given the previous one was, and drafts the
longest prefix whose joint probability ``a**j`` stays >= ``min_token_prob``. The candidate with the
larger expected number of accepted tokens wins.

Acceptance is measured from the tokens themselves: the tokens appended to a request after a draft,
compared with that draft, give the accepted prefix. No host-specific feedback is needed.

Examples::

    >>> d = SuffixDrafter(SuffixSpecConfig(num_speculative_tokens=8))
    >>> d.update("r1", [1, 2, 3, 4, 5, 6, 9, 1, 2, 3], num_prompt_tokens=10)
    >>> d.propose("r1")      # "1 2 3" repeats: copy what followed it (a 3-token match drafts 2 at first)
    [4, 5]
    >>> d.finish("r1")                        # state freed, output kept in the global cache
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .automaton import SuffixAutomaton
from .cache import CacheMatcher, OutputCache
from .config import SuffixSpecConfig

__all__ = ["DraftStats", "SuffixDrafter"]

LOCAL, GLOBAL = 0, 1
# Match-length buckets: 1, 2-3, 4-7, 8-15, 16-31, 32+ (bucket = bit length, capped).
_NUM_BUCKETS = 7
# Prior per-token acceptance by bucket: short matches are often coincidences, long ones are copies.
_PRIOR = (0.0, 0.3, 0.45, 0.6, 0.75, 0.85, 0.9)
_PRIOR_WEIGHT = 8.0
# Forget old evidence slowly so the estimate follows a workload that changes (half-life ~350 drafts).
_DECAY = 0.998


def _bucket(match_len: int) -> int:
    return min(_NUM_BUCKETS - 1, match_len.bit_length())


def _as_list(tokens: Any) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else [int(t) for t in tokens]


@dataclass
class DraftStats:
    """Counters over all requests (for logs, tests and benchmarks)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # Per source (local, global): [drafts, draft tokens, accepted tokens].
    by_source: list[list[int]] = field(default_factory=lambda: [[0, 0, 0], [0, 0, 0]])

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass
class _Request:
    sam: SuffixAutomaton
    num_prompt_tokens: int
    # The last draft (tokens, source, bucket), compared with the tokens appended next.
    pending: tuple[list[int], int, int] | None = None
    # Incremental global-cache lookup of this request's last ``max_depth`` tokens (made on first use).
    matcher: CacheMatcher | None = None


class SuffixDrafter:
    """Per-request suffix automata + global output cache + adaptive draft length (no model, no vLLM).

    Args:
        config: drafter options.
    """

    def __init__(self, config: SuffixSpecConfig | None = None) -> None:
        self.config = config or SuffixSpecConfig()
        self.cache = OutputCache(self.config.max_cached_requests, self.config.max_cached_tokens)
        self._requests: dict[Hashable, _Request] = {}
        # Per (source, bucket): [accepted, rejected] pseudo-counts, starting from the prior.
        self._counts = [
            [[_PRIOR[b] * _PRIOR_WEIGHT, (1 - _PRIOR[b]) * _PRIOR_WEIGHT] for b in range(_NUM_BUCKETS)]
            for _ in (LOCAL, GLOBAL)
        ]
        self.stats = DraftStats()

    # -- request lifecycle -------------------------------------------------------------------
    @property
    def active_requests(self) -> set[Hashable]:
        """Ids of requests with live per-request state."""
        return set(self._requests)

    def num_indexed(self, req_id: Hashable) -> int:
        """Tokens of ``req_id`` indexed so far (0 if unknown)."""
        r = self._requests.get(req_id)
        return len(r.sam) if r else 0

    def update(self, req_id: Hashable, tokens: Sequence[int], num_prompt_tokens: int) -> None:
        """Bring the request's index up to date with its committed tokens (prompt + output so far).

        Only ``tokens[already_indexed:]`` is read, so a step costs O(new tokens). If the history no
        longer extends what was indexed (e.g. the host rewrote it), the request is re-indexed.

        Args:
            req_id: the request's id.
            tokens: all committed tokens of the request (a list or a NumPy row slice).
            num_prompt_tokens: how many of them are the prompt.
        """
        n = len(tokens)
        r = self._requests.get(req_id)
        if r is not None:
            have = len(r.sam)
            if n < have or (have and int(tokens[have - 1]) != r.sam.tokens[have - 1]):
                r = None  # history diverged from what was indexed
        if r is None:
            r = _Request(SuffixAutomaton(), num_prompt_tokens)
            self._requests[req_id] = r
            r.sam.extend(_as_list(tokens))
            return
        new = _as_list(tokens[len(r.sam) : n])
        if r.pending is not None and new:
            self._observe(r.pending, new)
            r.pending = None
        r.sam.extend(new)

    def finish(self, req_id: Hashable) -> None:
        """Free the request's state and add its prompt tail + output to the global cache."""
        r = self._requests.pop(req_id, None)
        if r is None:
            return
        toks = r.sam.tokens
        if len(toks) > r.num_prompt_tokens:
            tail = max(0, r.num_prompt_tokens - self.config.max_depth)
            self.cache.add(req_id, toks[tail:])

    # -- acceptance model ----------------------------------------------------------------------
    def _observe(self, pending: tuple[list[int], int, int], new: list[int]) -> None:
        draft, source, bucket = pending
        accepted = 0
        for d, t in zip(draft, new):
            if d != t:
                break
            accepted += 1
        # The token after the accepted prefix was checked against the draft only if the model emitted
        # one (a request can stop inside the accepted prefix).
        rejected = 1 if accepted < len(draft) and accepted < len(new) else 0
        self.stats.accepted_tokens += accepted
        self.stats.by_source[source][2] += accepted
        if self.config.adaptive:
            c = self._counts[source][bucket]
            c[0] = c[0] * _DECAY + accepted
            c[1] = c[1] * _DECAY + rejected

    def acceptance(self, source: int, match_len: int) -> float:
        """Estimated probability that a draft token is accepted (given the previous one was)."""
        a, r = self._counts[source][_bucket(match_len)]
        return a / (a + r)

    def _plan(self, source: int, match_len: int, available: int, limit: int, min_prob: float) -> tuple[int, float]:
        """Draft length and expected accepted tokens for a candidate."""
        cfg = self.config
        cap = min(limit, available, math.floor(cfg.max_spec_factor * match_len + cfg.max_spec_offset))
        if cap <= 0:
            return 0, 0.0
        a = self.acceptance(source, match_len)
        if a <= 0.0:
            return 0, 0.0
        # Longest j with a**j >= min_prob.
        if a >= 1.0 or min_prob <= 0.0:
            k = cap
        else:
            k = min(cap, int(math.log(max(min_prob, 1e-12)) / math.log(a) + 1e-9))
        expected = a * (1 - a**k) / (1 - a) if a < 1.0 else float(k)
        return k, expected

    # -- drafting ------------------------------------------------------------------------------
    def propose(self, req_id: Hashable, max_tokens: int | None = None, min_prob: float | None = None) -> list[int]:
        """Draft tokens to follow the request's indexed tokens (call :meth:`update` first).

        Args:
            req_id: a request known to :meth:`update`.
            max_tokens: hard cap for this step (e.g. room left before the model's max length);
                ``None`` = ``num_speculative_tokens``.
            min_prob: least estimated probability that a draft token (and all before it) is accepted;
                ``None`` = ``min_token_prob`` (a caller that knows the cost of verification passes more).

        Returns:
            Between 0 and ``min(max_tokens, num_speculative_tokens)`` token ids.
        """
        r = self._requests[req_id]
        limit = (
            self.config.num_speculative_tokens
            if max_tokens is None
            else min(max_tokens, self.config.num_speculative_tokens)
        )
        r.pending = None
        if limit <= 0 or len(r.sam) == 0:
            return []
        min_prob = self.config.min_token_prob if min_prob is None else max(min_prob, self.config.min_token_prob)
        best: tuple[float, list[int], int, int, Hashable | None] = (0.0, [], LOCAL, 0, None)
        sam = r.sam
        if sam.match_len > 0:
            # Copies can always run on (they continue from their own output), so ``available`` = limit.
            k, exp = self._plan(LOCAL, sam.match_len, limit, limit, min_prob)
            if k > 0:
                best = (exp, sam.copy_from(sam.match_end, k), LOCAL, sam.match_len, None)
        if len(self.cache):
            if r.matcher is None:
                r.matcher = self.cache.matcher(self.config.max_depth)
            n, cont, key = r.matcher.lookup(sam.tokens, limit)
            if n > 0 and cont:
                k, exp = self._plan(GLOBAL, n, len(cont), limit, min_prob)
                if k > 0 and exp > best[0]:
                    best = (exp, cont[:k], GLOBAL, n, key)
        exp, draft, source, match_len, key = best
        if not draft:
            return []
        if key is not None:
            self.cache.touch(key)
        r.pending = (draft, source, _bucket(match_len))
        self.stats.drafts += 1
        self.stats.draft_tokens += len(draft)
        self.stats.by_source[source][0] += 1
        self.stats.by_source[source][1] += len(draft)
        return draft
