"""Offline replay: how a drafter would do on known greedy outputs, without running a model.

Under greedy verification a draft token is accepted iff it equals the token the model would emit, so
given the model's output for a prompt, the speculative run is fully determined: each step accepts the
draft's longest prefix that agrees with the output, plus one token from the model. :func:`replay`
emulates that loop (the same calls vLLM makes: ``update`` with the committed tokens, then
``propose``), which makes drafter behaviour testable and tunable on recorded outputs in milliseconds.
:func:`replay_batch` drives a :class:`BatchDrafter` the way vLLM's runner does (a persistent NumPy token
buffer, rows compacted when requests finish, finish notices one step late), so the vLLM glue is
timed and tested too.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .drafter import SuffixDrafter

if TYPE_CHECKING:
    from .proposer import BatchDrafter

__all__ = ["ReplayResult", "SimulatedEngineClock", "replay", "replay_batch"]


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


class SimulatedEngineClock:
    """A clock for replays: each decode step takes ``t0 + t1 * tokens`` seconds (tokens = rows + draft tokens
    verified), the prefill step ``t0``. Pass it as ``BatchDrafter(..., clock=clock)`` and to
    :func:`replay_batch`; ``now`` is then the modelled decode time of everything replayed.

    Args:
        t0: seconds per engine step.
        t1: seconds per verified token.
    """

    def __init__(self, t0: float, t1: float) -> None:
        self.t0, self.t1 = t0, t1
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, tokens: int) -> None:
        """One engine step that verified ``tokens`` tokens."""
        self.now += self.t0 + self.t1 * tokens


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
        # Drafts stop at max_tokens (= the output length here), as BatchDrafter stops them inside vLLM:
        # at most remaining - 1 draft tokens plus the model's own token can count.
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


def replay_batch(
    drafter: BatchDrafter,
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    req_ids: Sequence[Hashable] | None = None,
    max_tokens: Sequence[int] | None = None,
    clock: SimulatedEngineClock | None = None,
) -> tuple[list[ReplayResult], int]:
    """Replay a batch of greedy requests through ``drafter`` as vLLM's runner would (no model).

    Per engine step: the runner hook gets the batch and the ids that finished in the previous step,
    then ``propose`` gets every row's newly sampled tokens, ``num_tokens_no_spec`` and the shared
    ``token_ids_cpu`` buffer. All requests start together (one prefill step); a request that emitted
    its last token is still drafted for in that step (vLLM learns it finished only afterwards) and
    its row is removed, the rows after it moving up, in the next step. As in vLLM 0.32, every draft
    token is verified, also past the request's ``max_tokens`` (the runner hook's ``requests`` mapping
    gives the drafter each request's ``max_tokens``, as vLLM's does); draft tokens past the end of the
    recorded output count as rejected.

    Args:
        drafter: the batch drafter (its global cache and acceptance estimates carry over).
        prompts: prompt token ids per request.
        outputs: the model's greedy output per request (at least one token each).
        req_ids: ids (default ``"0"``, ``"1"``, ...).
        max_tokens: each request's ``max_tokens`` (default: its output length, i.e. every output
            ended at the length limit; pass the real limit for outputs that ended at EOS).
        clock: advanced once per engine step; the hook then also gets a ``SchedulerOutput``-like
            record of the step (new requests in the first, decode rows with their drafts after), so a
            cost-aware drafter learns the modelled step cost. Without it, no step cost is learned.

    Returns:
        ``(per-request results, engine steps)``; the steps include the final one that delivers the
        last finish notices.
    """
    import numpy as np

    if len(prompts) != len(outputs):
        raise ValueError("replay_batch needs one output per prompt")
    if any(len(o) == 0 for o in outputs):
        raise ValueError("replay_batch needs at least one output token per request")
    ids = list(req_ids) if req_ids is not None else [str(i) for i in range(len(prompts))]
    limits = list(max_tokens) if max_tokens is not None else [len(o) for o in outputs]
    if any(m < len(o) for m, o in zip(limits, outputs)):
        raise ValueError("replay_batch: an output is longer than its max_tokens")
    # What the runner hook passes as live requests: id -> state with ``sampling_params.max_tokens``.
    requests = {
        i: SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=m)) for i, m in zip(ids, limits)
    }
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    buf = np.zeros((max(len(prompts), 1), width), dtype=np.int32)
    for row, (p, o) in enumerate(zip(prompts, outputs)):
        buf[row, : len(p)] = p
        buf[row, len(p)] = o[0]  # the prefill step samples the first output token
    batch = SimpleNamespace(
        req_ids=list(ids),
        num_prompt_tokens=np.array([len(p) for p in prompts], dtype=np.int32),
        token_ids_cpu=buf,
    )
    index = list(range(len(prompts)))  # request index of each row
    done = [1] * len(prompts)
    sampled = [[int(o[0])] for o in outputs]
    steps, drafted, accepted = [1] * len(prompts), [0] * len(prompts), [0] * len(prompts)
    finished: list[Hashable] = []
    engine_steps = 0
    # what the scheduler runs in the next step: the prefill first, then each row's token + its draft
    sched = SimpleNamespace(scheduled_new_reqs=list(ids), num_scheduled_tokens={}, scheduled_spec_decode_tokens={})
    while index:
        engine_steps += 1
        # without a simulated clock the hook gets no step record: real wall time of a replay is no step cost
        drafter.on_update_states(batch, finished, {i: requests[i] for i in batch.req_ids},
                                 sched if clock is not None else None)
        if clock is not None:
            clock.advance(sum(sched.num_scheduled_tokens.values()))
        num_tokens = np.array([len(prompts[j]) + done[j] for j in index], dtype=np.int32)
        drafts = drafter.propose(sampled, num_tokens, buf)
        spec = {ids[j]: list(drafts[row]) for row, j in enumerate(index) if done[j] < len(outputs[j])}
        sched = SimpleNamespace(scheduled_new_reqs=[], scheduled_spec_decode_tokens=spec,
                                num_scheduled_tokens={r: 1 + len(d) for r, d in spec.items()})
        finished, keep = [], []
        for row, j in enumerate(index):
            out, d = outputs[j], done[j]
            if d == len(out):
                finished.append(ids[j])
                continue
            keep.append(j)
            draft = list(drafts[row])
            a, limit = 0, min(len(draft), len(out) - d)
            while a < limit and draft[a] == out[d + a]:
                a += 1
            new = [int(t) for t in out[d : d + a + 1]]
            drafted[j] += len(draft)
            accepted[j] += a
            steps[j] += 1
            start = len(prompts[j]) + d
            buf[row, start : start + len(new)] = new
            sampled[row] = new
            done[j] += len(new)
        if finished:  # condense: rows of finished requests are removed, later rows move up
            kept = set(keep)
            rows = [row for row, j in enumerate(index) if j in kept]
            buf[: len(rows)] = buf[rows]
            batch.num_prompt_tokens[: len(rows)] = batch.num_prompt_tokens[rows]
            sampled = [sampled[row] for row in rows]
            index = keep
            batch.req_ids = [ids[j] for j in index]
    drafter.on_update_states(batch, finished, {}, None)
    engine_steps += 1
    results = [
        ReplayResult(steps[j], len(outputs[j]), drafted[j], accepted[j]) for j in range(len(prompts))
    ]
    return results, engine_steps
