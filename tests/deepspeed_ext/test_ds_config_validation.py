"""The DeepSpeed ``"longkit"`` section and its config classes reject bad values on every path: parsed from JSON
and constructed directly in Python (``SequenceParallel(SequenceParallelConfig(size=2))``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longkit.deepspeed_ext import ActivationOffloadConfig, LongkitDSConfig, SequenceParallelConfig, parse_ds_config
from longkit.deepspeed_ext.config import load_ds_config
from longkit.errors import ConfigError


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "SequenceParallelConfig.size must be a positive integer, got 0"),
    ({"size": True}, "SequenceParallelConfig.size must be a positive integer, got True (bool)"),
    ({"size": 2.0}, "SequenceParallelConfig.size must be a positive integer, got 2.0 (float)"),
    ({"size": "2"}, "SequenceParallelConfig.size must be a positive integer, got '2' (str)"),
    ({"mode": "ring"}, "SequenceParallelConfig.mode must be one of ['ulysses', 'lasp2', 'auto'], got 'ring'"),
    ({"mode": None}, "SequenceParallelConfig.mode must be one of ['ulysses', 'lasp2', 'auto'], got None"),
    ({"attention": "flash"}, "SequenceParallelConfig.attention must be one of ['auto', 'kernel', 'sdpa']"),
])
def test_sequence_parallel_config_constructed_directly(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        SequenceParallelConfig(**kwargs)
    assert message in str(exc.value)


def test_sequence_parallel_config_modes_and_normalised_size() -> None:
    assert SequenceParallelConfig(mode="lasp2").mode == "lasp2"
    assert SequenceParallelConfig(mode="auto").mode == "auto"
    cfg = SequenceParallelConfig(size=np.int64(4))
    assert type(cfg.size) is int and cfg == SequenceParallelConfig(size=4)


def test_activation_offload_config_constructed_directly() -> None:
    assert ActivationOffloadConfig(enabled=True).enabled is True  # built now (longkit.offload)
    with pytest.raises(ConfigError, match=r"ActivationOffloadConfig.enabled must be true or false, got 'no' \(str\)"):
        ActivationOffloadConfig(enabled="no")
    with pytest.raises(ConfigError, match="must be true or false, got 0"):
        ActivationOffloadConfig(enabled=0)
    assert ActivationOffloadConfig().enabled is True and LongkitDSConfig().activation_offload.enabled is False


def test_longkit_ds_config_constructed_directly() -> None:
    want = r"sequence_parallel must be an instance of SequenceParallelConfig, got \{'size': 2\} \(dict\)"
    with pytest.raises(ConfigError, match=want + ".*from_dict"):
        LongkitDSConfig(sequence_parallel={"size": 2})
    with pytest.raises(ConfigError, match="activation_offload must be an instance of ActivationOffloadConfig"):
        LongkitDSConfig(activation_offload=False)
    assert LongkitDSConfig(SequenceParallelConfig(size=2)).sequence_parallel.size == 2


@pytest.mark.parametrize("section, exc, words", [
    ({"sequence_parallel": {"size": 2.0}}, ConfigError, "longkit.sequence_parallel.size must be a positive integer, "
                                                        "got 2.0 (float)"),
    ({"sequence_parallel": {"size": None}}, ConfigError, "longkit.sequence_parallel.size must be a positive integer"),
    ({"sequence_parallel": {"mode": ["ulysses"]}}, ConfigError, "longkit.sequence_parallel.mode must be one of"),
    ({"sequence_parallel": {"attention": None}}, ConfigError, "longkit.sequence_parallel.attention must be one of"),
    ({"sequence_parallel": None}, ConfigError, "longkit.sequence_parallel must be an object"),
    ({"activation_offload": {"enabled": 0}}, ConfigError, "longkit.activation_offload.enabled must be true or false"),
    # A misspelt key is reported as such (it used to read as a request to enable offloading).
    ({"activation_offload": {"enabeld": False}}, ConfigError, "unknown key(s) ['enabeld'] in longkit.activation"),
    ({"activation_offload": {"gpu_fraction": 2}}, ConfigError,
     "longkit.activation_offload.gpu_fraction must be a number in [0.0, 1.0], got 2"),
])
def test_section_errors(section: dict, exc: type[Exception], words: str) -> None:
    with pytest.raises(exc) as e:
        parse_ds_config({"longkit": section})
    assert words in str(e.value)


def test_section_accepts_valid_values(tmp_path: Path) -> None:
    cfg = {"longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2, "attention": "kernel"},
                       "activation_offload": {"enabled": False}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    want = LongkitDSConfig(SequenceParallelConfig("ulysses", 2, "kernel"), ActivationOffloadConfig(False))
    assert parse_ds_config(cfg) == parse_ds_config(path) == parse_ds_config(str(path)) == want


def test_load_ds_config_types(tmp_path: Path) -> None:
    class PathLike:  # any os.PathLike, not only pathlib.Path
        def __fspath__(self) -> str:
            return str(tmp_path / "ds.json")

    (tmp_path / "ds.json").write_text("{}")
    assert load_ds_config(PathLike()) == {}
    with pytest.raises(ConfigError, match="must be a dict or a path to a JSON file, got list"):
        load_ds_config([("longkit", {})])
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        load_ds_config(tmp_path / "list.json")


def test_sequence_parallel_takes_only_its_config_class():
    from longkit.deepspeed_ext import SequenceParallel

    with pytest.raises(ConfigError, match="takes a SequenceParallelConfig, got dict"):
        SequenceParallel({"size": 2})


@pytest.mark.parametrize("pad", [-1, 1.0, True, "0"])
def test_initialize_checks_pad_token_id_first(pad):
    from longkit.deepspeed_ext import initialize

    with pytest.raises(ConfigError, match="pad_token_id"):
        initialize(None, {}, pad_token_id=pad)
