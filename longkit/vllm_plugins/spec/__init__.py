"""Model-free speculative decoding for vLLM: suffix matching + copying (see ``docs/vllm_spec.md``).

Pure-Python parts (no vLLM import): :class:`SuffixAutomaton`, :class:`OutputCache`,
:class:`SuffixDrafter`, :class:`SuffixSpecConfig`, :class:`BatchDrafter`, :func:`replay`. :class:`SuffixProposer` is the
class vLLM instantiates (``custom_class``); it imports vLLM only when constructed.
"""

from .automaton import SuffixAutomaton
from .cache import OutputCache
from .config import SuffixSpecConfig
from .cost import StepCostModel
from .drafter import DraftStats, SuffixDrafter
from .method import METHOD
from .proposer import (
    PROPOSER_PATH,
    BatchDrafter,
    DrafterTiming,
    SuffixProposer,
    spec_decode_counters,
    worker_drafter_state,
)
from .simulate import ReplayResult, SimulatedEngineClock, replay, replay_batch

__all__ = [
    "METHOD",
    "PROPOSER_PATH",
    "BatchDrafter",
    "DraftStats",
    "DrafterTiming",
    "OutputCache",
    "ReplayResult",
    "SimulatedEngineClock",
    "StepCostModel",
    "SuffixAutomaton",
    "SuffixDrafter",
    "SuffixProposer",
    "SuffixSpecConfig",
    "replay",
    "replay_batch",
    "spec_decode_counters",
    "worker_drafter_state",
]
