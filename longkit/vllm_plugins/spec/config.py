"""Options of the suffix drafter, and how they are read from vLLM's configs.

Five options reuse the fields vLLM already has for its built-in ``suffix`` method, with the same
meaning; the rest come from ``--additional-config '{"longkit_spec": {...}}'`` (vLLM's field for
plugins), because ``SpeculativeConfig`` rejects unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..._validate import check_bool, check_int, check_number, describe
from ...errors import ConfigError

__all__ = ["ADDITIONAL_CONFIG_KEY", "SuffixSpecConfig", "VLLM_FIELDS"]

ADDITIONAL_CONFIG_KEY = "longkit_spec"

# SuffixSpecConfig field -> SpeculativeConfig field it is read from.
VLLM_FIELDS: dict[str, str] = {
    "num_speculative_tokens": "num_speculative_tokens",
    "max_depth": "suffix_decoding_max_tree_depth",
    "max_cached_requests": "suffix_decoding_max_cached_requests",
    "max_spec_factor": "suffix_decoding_max_spec_factor",
    "min_token_prob": "suffix_decoding_min_token_prob",
}


@dataclass(frozen=True)
class SuffixSpecConfig:
    """Suffix + copy drafter options (SuffixDecoding, Oliaro et al. 2024; CopySpec, Dumitru et al. 2025).

    Args:
        num_speculative_tokens: most draft tokens per request and step.
        max_depth: context tokens matched against the global cache per step (and the prompt tail
            stored with each cached output).
        max_cached_requests: most earlier outputs kept in the global cache (LRU); 0 disables it.
        max_spec_factor: a match of ``L`` tokens drafts at most ``max_spec_factor * L + max_spec_offset``.
        min_token_prob: stop drafting once the estimated probability that every draft token so far is
            accepted falls below this.
        max_cached_tokens: most tokens kept in the global cache (LRU; ~0.5 KB of memory per token).
        max_spec_offset: see ``max_spec_factor``.
        adaptive: learn acceptance rates per source (prompt/output vs cache) and match length online;
            ``False`` keeps the prior rates.
        cost_aware: learn from the engine's step times what verifying one more token costs, and draft
            only tokens whose estimated acceptance probability pays for it (see ``spec/cost.py``); the
            threshold is then ``max(min_token_prob, break-even)``. ``False``: ``min_token_prob`` only.
    """

    num_speculative_tokens: int = 16
    max_depth: int = 24
    max_cached_requests: int = 10000
    max_spec_factor: float = 1.0
    min_token_prob: float = 0.1
    max_cached_tokens: int = 1 << 18
    max_spec_offset: float = 0.0
    adaptive: bool = True
    cost_aware: bool = True

    def __post_init__(self) -> None:
        owner = type(self).__name__
        values = {
            "num_speculative_tokens": check_int(owner, "num_speculative_tokens", self.num_speculative_tokens, min=1),
            "max_depth": check_int(owner, "max_depth", self.max_depth, min=1),
            "max_cached_requests": check_int(owner, "max_cached_requests", self.max_cached_requests, min=0),
            "max_cached_tokens": check_int(owner, "max_cached_tokens", self.max_cached_tokens, min=0),
            # Finite: the draft cap is floor(max_spec_factor * L + max_spec_offset), which an infinity overflows.
            "max_spec_factor": check_number(owner, "max_spec_factor", self.max_spec_factor, min=0, min_exclusive=True),
            "max_spec_offset": check_number(owner, "max_spec_offset", self.max_spec_offset),
            "min_token_prob": check_number(owner, "min_token_prob", self.min_token_prob, min=0, max=1),
            "adaptive": check_bool(owner, "adaptive", self.adaptive),
            "cost_aware": check_bool(owner, "cost_aware", self.cost_aware),
        }
        for name, value in values.items():  # normalised (numpy scalars -> int/float) so equal configs compare equal
            object.__setattr__(self, name, value)

    @classmethod
    def from_vllm(cls, speculative: Any, additional_config: Mapping[str, Any] | None = None) -> SuffixSpecConfig:
        """Build from a vLLM ``SpeculativeConfig`` (or its dict form) and ``VllmConfig.additional_config``.

        Raises:
            ConfigError: a value is out of range, or ``additional_config["longkit_spec"]`` has an unknown
                key (the message names the closest valid key) or repeats a ``SpeculativeConfig`` field.
        """
        get = speculative.get if isinstance(speculative, Mapping) else lambda k: getattr(speculative, k, None)
        kwargs: dict[str, Any] = {}
        for ours, theirs in VLLM_FIELDS.items():
            value = get(theirs)
            if value is not None:
                kwargs[ours] = value
        if additional_config is not None and not isinstance(additional_config, Mapping):
            raise ConfigError(f"additional_config must be a JSON object (a dict), got {describe(additional_config)}")
        extra = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        extra = {} if extra is None else extra  # not `or {}`: a falsy non-object such as [] or "" must be rejected
        if not isinstance(extra, Mapping):
            raise ConfigError(f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a JSON object, got {extra!r}")
        allowed = [f.name for f in fields(cls) if f.name not in VLLM_FIELDS]
        for key, value in extra.items():
            if key in VLLM_FIELDS or key in VLLM_FIELDS.values():
                theirs = VLLM_FIELDS.get(key, key)
                raise ConfigError(
                    f"additional_config['{ADDITIONAL_CONFIG_KEY}']['{key}']: set it in --speculative-config "
                    f"as '{theirs}' instead (one name, one place)"
                )
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise ConfigError(
                    f"unknown key additional_config['{ADDITIONAL_CONFIG_KEY}']['{key}'] (valid: {allowed}){hint}"
                )
            kwargs[key] = value
        return cls(**kwargs)
