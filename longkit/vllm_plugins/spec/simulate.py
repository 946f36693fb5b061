"""Offline replay: how a drafter would do on known greedy outputs, without running a model.

Under greedy verification a draft token is accepted iff it equals the token the model would emit, so
given the model's output for a prompt, the speculative run is fully determined: each step accepts the
draft's longest prefix that agrees with the output, plus one token from the model. :func:`replay`
emulates that loop (the same calls vLLM makes: ``update`` with the committed tokens, then
``propose``), which makes drafter behaviour testable and tunable on recorded outputs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .drafter import SuffixDrafter

__all__ = ["ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """Outcome of replaying one request.

    Attributes:
        steps: model forward passes needed (1 for the prefill's token + one per decode step).
        output_tokens: tokens generated.
        draft_tokens: draft tokens that were verified (drafts past the end of the output are cut).
        accepted_tokens: draft tokens accepted.
    """

    steps: int
    output_tokens: int
    draft_tokens: int
    accepted_tokens: int

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per forward pass (vLLM's "mean acceptance length" counts decode steps only)."""
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


def replay(
    drafter: SuffixDrafter, req_id: Hashable, prompt: Sequence[int], output: Sequence[int], finish: bool = True
) -> ReplayResult:
    """Replay one greedy request through ``drafter``.

    Args:
        drafter: the drafter (its global cache and acceptance estimates carry over between calls).
        req_id: id for the request's state.
        prompt: prompt token ids.
        output: the model's greedy output for ``prompt`` (at least one token).
        finish: call ``drafter.finish`` at the end (the output then enters the global cache).

    Returns:
        Step and token counts.
    """
    if not output:
        raise ValueError("replay needs at least one output token")
    tokens = [int(t) for t in prompt] + [int(output[0])]  # the prefill step emits the first token
    done, steps, drafted, accepted = 1, 1, 0, 0
    while done < len(output):
        drafter.update(req_id, tokens, len(prompt))
        remaining = len(output) - done
        # vLLM never verifies drafts past max_tokens: at most remaining - 1 plus the model's own token.
        draft = drafter.propose(req_id)[: remaining - 1]
        a = 0
        while a < len(draft) and draft[a] == output[done + a]:
            a += 1
        drafted += len(draft)
        accepted += a
        new = output[done : done + a + 1]
        tokens.extend(int(t) for t in new)
        done += len(new)
        steps += 1
    drafter.update(req_id, tokens, len(prompt))
    if finish:
        drafter.finish(req_id)
    return ReplayResult(steps, len(output), drafted, accepted)
