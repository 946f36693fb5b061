"""The drafter as a vLLM proposer (``custom_class`` contract), plus the one runner hook it needs.

vLLM's ``custom_class`` route builds ``SuffixProposer(vllm_config)`` in each worker and calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)``: rows of the
runner's input batch, but no request ids and no notice when a request finishes. Suffix decoding needs
both (per-request state keyed by id, freed when the request ends). The proposer therefore wraps
``GPUModelRunner._update_states`` (which vLLM's CPU runner inherits) once per process: after the runner
applies each scheduler step, the wrapper hands the drafter the runner's ``input_batch`` (its
``req_ids`` name the rows ``propose`` gets), the step's ``finished_req_ids``, and the ``SchedulerOutput``
itself (its token counts time the steps for the cost-aware draft length, ``cost.py``). The wrapper is inert for
every other drafter; it is installed only when a ``SuffixProposer`` is built, i.e. only by users who
asked for it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import SuffixSpecConfig
from .cost import StepCostModel
from .drafter import SuffixDrafter

__all__ = [
    "PROPOSER_PATH",
    "BatchDrafter",
    "DrafterTiming",
    "SuffixProposer",
    "install_runner_hook",
    "worker_drafter_state",
]

PROPOSER_PATH = "longkit.vllm_plugins.spec.SuffixProposer"
_HOOK_TAG = "longkit.spec.runner_update_states"


@dataclass
class DrafterTiming:
    """Where the drafter's time goes inside vLLM (cumulative; ``perf_counter`` around each call).

    Attributes:
        steps: scheduler steps seen by the runner hook (prefill and decode steps alike).
        hook_s: seconds in :meth:`BatchDrafter.on_update_states` (finish notices, cache inserts).
        propose_calls: calls of :meth:`BatchDrafter.propose` (one per step that drafts).
        propose_rows: rows that were drafted for (request-steps; partial prefills excluded).
        propose_s: seconds in :meth:`BatchDrafter.propose` (index update + drafting + glue).
    """

    steps: int = 0
    hook_s: float = 0.0
    propose_calls: int = 0
    propose_rows: int = 0
    propose_s: float = 0.0


class BatchDrafter:
    """:class:`SuffixDrafter` behind vLLM's input-batch protocol (no vLLM import; unit-testable).

    Args:
        config: drafter options.
        max_model_len: the model's context limit; drafts never run past it.
        clock: seconds for the step-cost model (a simulated clock in replays).
    """

    def __init__(
        self, config: SuffixSpecConfig, max_model_len: int, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.drafter = SuffixDrafter(config)
        self.max_model_len = int(max_model_len)
        self._batch: Any = None
        self._requests: Mapping[Hashable, Any] | None = None
        self.timing = DrafterTiming()
        self.cost = StepCostModel()
        self._clock = clock
        self._step: tuple[float, int] | None = None  # (start, tokens) of the running decode-only step

    def on_update_states(
        self,
        input_batch: Any,
        finished_req_ids: Iterable[Hashable],
        live_req_ids: Iterable[Hashable] | None = None,
        scheduler_output: Any = None,
    ) -> None:
        """Called by the runner hook after each scheduler step is applied.

        Args:
            input_batch: the runner's persistent batch (``req_ids``, ``num_prompt_tokens``, ``token_ids_cpu``).
            finished_req_ids: requests that finished or were aborted: their state is freed now.
            live_req_ids: every request the runner still holds (scheduled or not); state of any other
                request is freed as well, so nothing can leak if a finish notice is missed.
            scheduler_output: the step's ``SchedulerOutput``; the time from one decode-only step's start
                to the next step's start, with the step's token count, feeds :attr:`cost`.
        """
        t0 = time.perf_counter()
        if self.drafter.config.cost_aware:
            now = self._clock()
            if self._step is not None:
                start, tokens = self._step
                self.cost.observe(tokens, now - start)
            tokens = _decode_only_tokens(scheduler_output)
            self._step = (now, tokens) if tokens else None
        self._batch = input_batch
        # vLLM passes the runner's ``requests`` dict (id -> CachedRequestState): it also gives each
        # request's ``max_tokens``, so no draft runs past the end of the output (see ``propose``).
        self._requests = live_req_ids if isinstance(live_req_ids, Mapping) else None
        for req_id in finished_req_ids:
            self.drafter.finish(req_id)
        if live_req_ids is not None:
            live = live_req_ids if isinstance(live_req_ids, set | dict) else set(live_req_ids)
            for req_id in [r for r in self.drafter.active_requests if r not in live]:
                self.drafter.finish(req_id)
        timing = self.timing
        timing.steps += 1
        timing.hook_s += time.perf_counter() - t0

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: Sequence[int],
        token_ids_cpu: Any,
        *args: Any,
        **kwargs: Any,
    ) -> list[list[int]]:
        """Drafts for each row of the batch (vLLM's ``custom_class`` call; extra arguments are ignored).

        Args:
            sampled_token_ids: per row, the tokens accepted this step (empty = partial prefill: no draft).
            num_tokens_no_spec: per row, committed tokens (prompt + output, new ones included).
            token_ids_cpu: ``[max_num_reqs, max_model_len]`` token ids of the persistent batch.

        Returns:
            One list of draft token ids per row (possibly empty, lengths vary).
        """
        t0 = time.perf_counter()
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                "longkit SuffixProposer.propose was called before the runner hook bound the input batch: "
                "this vLLM runner does not call GPUModelRunner._update_states (unsupported runner/platform)"
            )
        if token_ids_cpu is not batch.token_ids_cpu:
            raise RuntimeError(
                "longkit SuffixProposer: token_ids_cpu is not the bound input batch's array; refusing to draft "
                "with request ids that may not match the rows"
            )
        req_ids = batch.req_ids
        rows = len(sampled_token_ids)
        # Per-row scalars as Python ints in one call each (indexing NumPy arrays per row is slower).
        num_tokens = _ints(num_tokens_no_spec, rows)
        num_prompt = _ints(batch.num_prompt_tokens, rows)
        requests = self._requests
        drafter, max_model_len = self.drafter, self.max_model_len
        # least acceptance probability that pays for verifying a token, at this batch size (0 until fitted)
        min_prob = self.cost.break_even(rows) if drafter.config.cost_aware else None
        drafts: list[list[int]] = []
        drafted_rows = 0
        for i, sampled in enumerate(sampled_token_ids):
            if not len(sampled):  # partial prefill: nothing sampled, nothing to draft
                drafts.append([])
                continue
            drafted_rows += 1
            req_id = req_ids[i]
            n = num_tokens[i]
            drafter.update(req_id, token_ids_cpu[i, :n], num_prompt[i])
            room = max_model_len - n - 1
            if requests is not None:
                # vLLM verifies every draft token it is given, also past max_tokens (and then drops the
                # accepted surplus): at most max_tokens - outputs - 1 can count, the model adds one.
                params = getattr(requests.get(req_id), "sampling_params", None)
                max_tokens = getattr(params, "max_tokens", None)
                if max_tokens is not None:
                    room = min(room, max_tokens - (n - num_prompt[i]) - 1)
            drafts.append(drafter.propose(req_id, room, min_prob) if room > 0 else [])
        timing = self.timing
        timing.propose_calls += 1
        timing.propose_rows += drafted_rows
        timing.propose_s += time.perf_counter() - t0
        return drafts

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No model to load (vLLM calls this on every drafter)."""


def _decode_only_tokens(scheduler_output: Any) -> int | None:
    """Tokens the step verifies if every scheduled request decodes (1 + its draft), else ``None``."""
    if scheduler_output is None or getattr(scheduler_output, "scheduled_new_reqs", None):
        return None
    counts = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
    for req_id, n in counts.items():
        if n != 1 + len(spec.get(req_id, ())):
            return None  # a prefill chunk: prompt tokens cost differently from verified ones
    return sum(counts.values()) or None


def _ints(values: Any, n: int) -> list[int]:
    """The first ``n`` entries of a NumPy array or sequence as Python ints."""
    head = values[:n]
    return head.tolist() if hasattr(head, "tolist") else [int(v) for v in head]


def install_runner_hook() -> bool:
    """Wrap ``GPUModelRunner._update_states`` so a :class:`BatchDrafter` sees request ids (idempotent).

    Returns:
        ``True`` if installed now, ``False`` if already installed in this process.

    Raises:
        HostVersionError: the runner has no ``_update_states(scheduler_output)`` (vLLM changed).
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ...errors import HostVersionError
    from ..patching import wrap_method

    fn = GPUModelRunner.__dict__.get("_update_states")
    if fn is None or "scheduler_output" not in inspect.signature(fn).parameters:
        raise HostVersionError(
            "longkit's suffix drafter needs vllm's GPUModelRunner._update_states(scheduler_output) "
            "(present in vllm 0.32); this vLLM has a different runner"
        )

    def make(orig: Any) -> Any:
        def _update_states(self: Any, scheduler_output: Any) -> Any:
            out = orig(self, scheduler_output)
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, BatchDrafter):
                drafter.on_update_states(
                    self.input_batch, scheduler_output.finished_req_ids, self.requests, scheduler_output
                )
            return out

        return _update_states

    return wrap_method(GPUModelRunner, "_update_states", make, _HOOK_TAG)


class SuffixProposer(BatchDrafter):
    """vLLM proposer: ``--speculative-config '{"method": "longkit_suffix", "num_speculative_tokens": 16}'``.

    Equivalent without the plugin's method name:
    ``{"method": "custom_class", "model": "longkit.vllm_plugins.spec.SuffixProposer", ...}``.

    Args:
        vllm_config: vLLM's ``VllmConfig`` (``speculative_config``, ``additional_config``, ``model_config``).

    Raises:
        HostVersionError: vLLM is outside the supported range or its runner lacks the hook point.
        ConfigError: a drafter option is invalid.
    """

    def __init__(self, vllm_config: Any) -> None:
        from ..._compat import require_host

        require_host("vllm", "longkit's suffix drafter (method 'longkit_suffix')")
        config = SuffixSpecConfig.from_vllm(vllm_config.speculative_config, vllm_config.additional_config)
        super().__init__(config, vllm_config.model_config.max_model_len)
        install_runner_hook()


def spec_decode_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters of an ``LLM`` (``disable_log_stats=False``), e.g.
    ``{"num_drafts": ..., "num_draft_tokens": ..., "num_accepted_tokens": ...}`` (cumulative)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:spec_decode_")] = float(m.value)
    return out


def worker_drafter_state(worker: Any) -> dict[str, Any] | None:
    """Snapshot of the longkit drafter in one vLLM worker, for ``LLM.collective_rpc``.

    Examples::

        >>> llm.collective_rpc(worker_drafter_state)   # needs VLLM_ALLOW_INSECURE_SERIALIZATION=1
        [{'active_requests': [], 'cached_requests': 8, ...}]

    Returns:
        ``None`` if the worker has no longkit drafter, else active request ids, global-cache size,
        draft counters, and whether the plugin and the runner hook are active in that process.
    """
    from .. import is_registered
    from ..patching import is_wrapped

    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    if not isinstance(drafter, BatchDrafter):
        return None
    d = drafter.drafter
    return {
        "plugin_registered": is_registered(),
        "runner_hooked": any(is_wrapped(c, "_update_states", _HOOK_TAG) for c in type(runner).__mro__),
        "active_requests": sorted(str(r) for r in d.active_requests),
        "cached_requests": len(d.cache),
        "cached_tokens": d.cache.num_tokens,
        "drafts": d.stats.drafts,
        "draft_tokens": d.stats.draft_tokens,
        "accepted_tokens": d.stats.accepted_tokens,
        "by_source": {"local": d.stats.by_source[0], "global": d.stats.by_source[1]},
        "step_cost": {"steps": drafter.cost.steps, "t0_t1_s": drafter.cost.coefficients,
                      "break_even_1_row": drafter.cost.break_even(1)},
        "timing": asdict(drafter.timing),
    }
