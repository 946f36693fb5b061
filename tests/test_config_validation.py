"""Config classes check types and ranges on construction and name the field, the bad value and the fix.

Covers ``LMInfiniteConfig``, the vLLM drafter's ``SuffixSpecConfig`` and the shared checks in
``longkit._validate``; the DeepSpeed section has its own file under ``tests/deepspeed_ext``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from longkit import ConfigError, LMInfiniteConfig
from longkit._validate import BUILTIN, check_bool, check_choice, check_int, check_number
from longkit.vllm_plugins.spec import SuffixSpecConfig


# ------------------------------------------------------------------------------------------- LMInfiniteConfig
@pytest.mark.parametrize("kwargs, message", [
    ({"n_global": True}, "LMInfiniteConfig.n_global must be an int >= 0, got True (bool); a bool is not a number"),
    ({"n_global": 2.0}, "n_global must be an int >= 0, got 2.0 (float); pass a whole number"),
    ({"n_global": "10"}, "n_global must be an int >= 0, got '10' (str); convert the string first"),
    ({"n_global": -1}, "n_global must be an int >= 0, got -1"),
    ({"n_local": False}, "n_local must be an int >= 1 or None, got False (bool)"),
    ({"n_local": 4096.0}, "n_local must be an int >= 1 or None, got 4096.0 (float)"),
    ({"limit_distance": True}, "limit_distance must be an int >= 1 or None, got True (bool)"),
    ({"limit_distance": "64"}, "limit_distance must be an int >= 1 or None, got '64' (str)"),
    ({"bounded_cache": "no"}, "bounded_cache must be a bool (True or False), got 'no' (str); a string is not read"),
    ({"bounded_cache": 0}, "bounded_cache must be a bool (True or False), got 0 (int)"),
    ({"bounded_cache": None}, "bounded_cache must be a bool"),
    ({"query_chunk": 256.5}, "query_chunk must be an int >= 1, got 256.5 (float)"),
    ({"query_chunk": 512.0}, "query_chunk must be an int >= 1, got 512.0 (float)"),
    ({"query_chunk": "512"}, "query_chunk must be an int >= 1, got '512' (str)"),
    ({"query_chunk": True}, "query_chunk must be an int >= 1, got True (bool)"),
    ({"query_chunk": 0}, "query_chunk must be an int >= 1, got 0"),
    ({"decode": "graph"}, "decode must be one of ['eager', 'static', 'cuda_graph'], got 'graph'"),
    ({"decode": None}, "decode must be one of"),
])
def test_lm_infinite_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        LMInfiniteConfig(**kwargs)
    assert message in str(exc.value)


def test_lm_infinite_config_accepts_and_normalises() -> None:
    cfg = LMInfiniteConfig(n_global=np.int64(4), n_local=np.int32(64), query_chunk=np.int64(8))
    assert type(cfg.n_global) is int and type(cfg.n_local) is int and type(cfg.query_chunk) is int
    assert cfg == LMInfiniteConfig(n_global=4, n_local=64, query_chunk=8)
    assert hash(cfg) == hash(LMInfiniteConfig(n_global=4, n_local=64, query_chunk=8))
    assert LMInfiniteConfig(n_global=0, bounded_cache=False).n_global == 0


def test_lm_infinite_resolved_checks_the_model_length() -> None:
    assert LMInfiniteConfig().resolved(np.int64(2048)).n_local == 2048
    assert LMInfiniteConfig(n_local=32).resolved(None).limit_distance == 32  # not needed: not checked
    with pytest.raises(ConfigError, match=r"max_position_embeddings must be an int >= 1, got 2048.5 \(float\)"):
        LMInfiniteConfig().resolved(2048.5)


# ------------------------------------------------------------------------------------------- SuffixSpecConfig
@pytest.mark.parametrize("kwargs, message", [
    ({"num_speculative_tokens": True}, "num_speculative_tokens must be an int >= 1, got True (bool)"),
    ({"num_speculative_tokens": 4.0}, "num_speculative_tokens must be an int >= 1, got 4.0 (float)"),
    ({"max_depth": "24"}, "max_depth must be an int >= 1, got '24' (str)"),
    ({"max_cached_requests": -1}, "max_cached_requests must be an int >= 0, got -1"),
    ({"max_cached_tokens": 1e6}, "max_cached_tokens must be an int >= 0, got 1000000.0 (float)"),
    ({"max_spec_factor": math.inf}, "max_spec_factor must be a number > 0, got inf (float); NaN and infinities"),
    ({"max_spec_factor": math.nan}, "max_spec_factor must be a number > 0, got nan"),
    ({"max_spec_factor": True}, "max_spec_factor must be a number > 0, got True (bool)"),
    ({"max_spec_offset": math.inf}, "max_spec_offset must be a number, got inf (float); NaN and infinities"),
    ({"max_spec_offset": "1"}, "max_spec_offset must be a number, got '1' (str)"),
    ({"min_token_prob": math.nan}, "min_token_prob must be a number in [0, 1], got nan"),
    ({"adaptive": "false"}, "adaptive must be a bool (True or False), got 'false' (str)"),
    ({"cost_aware": 1}, "cost_aware must be a bool (True or False), got 1 (int)"),
])
def test_suffix_spec_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        SuffixSpecConfig(**kwargs)
    assert message in str(exc.value)


def test_suffix_spec_config_normalises_numpy_scalars() -> None:
    cfg = SuffixSpecConfig(num_speculative_tokens=np.int64(8), max_spec_factor=np.float32(2.0), max_spec_offset=1)
    assert type(cfg.num_speculative_tokens) is int and type(cfg.max_spec_factor) is float
    assert cfg == SuffixSpecConfig(num_speculative_tokens=8, max_spec_factor=2.0, max_spec_offset=1.0)


@pytest.mark.parametrize("additional, message", [
    ([("longkit_spec", {})], "additional_config must be a JSON object (a dict), got [('longkit_spec', {})] (list)"),
    ({"longkit_spec": []}, "additional_config['longkit_spec'] must be a JSON object, got []"),
    ({"longkit_spec": ""}, "additional_config['longkit_spec'] must be a JSON object, got ''"),
])
def test_suffix_spec_from_vllm_rejects_malformed_additional_config(additional: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        SuffixSpecConfig.from_vllm({}, additional)
    assert message in str(exc.value)


# ------------------------------------------------------------------------------------------- the shared checks
def test_check_int() -> None:
    assert check_int("Owner", "x", np.int16(3), min=0) == 3
    assert check_int("Owner", "x", None, allow_none=True) is None
    with pytest.raises(ConfigError, match=r"Owner.x must be an int in \[0, 4\], got 5"):
        check_int("Owner", "x", 5, min=0, max=4)
    with pytest.raises(ConfigError, match=r"Owner.x must be an int, got None"):
        check_int("Owner", "x", None)
    with pytest.raises(TypeError, match="got True"):
        check_int("Owner", "x", True, errors=BUILTIN)
    with pytest.raises(ValueError, match="got -1") as exc:
        check_int("Owner", "x", -1, min=0, errors=BUILTIN)
    assert not isinstance(exc.value, ConfigError)


def test_check_number_bool_choice() -> None:
    assert check_number("O", "f", 1) == 1.0 and type(check_number("O", "f", 1)) is float
    with pytest.raises(ConfigError, match=r"O.f must be a number in \(0, 1\], got 0"):
        check_number("O", "f", 0, min=0, max=1, min_exclusive=True)
    with pytest.raises(ConfigError, match="O.f must be a number >= 0, got -inf"):
        check_number("O", "f", -math.inf, min=0)
    assert check_bool("O", "b", False) is False
    with pytest.raises(ConfigError, match="O.b must be a bool"):
        check_bool("O", "b", np.bool_(True))
    assert check_choice("O", "c", "a", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match=r"O.c must be one of \[1, 2\], got True \(bool\)"):
        check_choice("O", "c", True, (1, 2))
