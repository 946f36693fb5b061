"""The recipes of the quantized KV cache and of the memory blocks run end to end on the default model (CPU, short)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["kv_cache_generate", "long_recall"])
def test_recipe_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _recipe(name).main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_kv_cache_recipe_identity_setting_reproduces_the_stock_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """16-bit, no rotation: the cache stores its input unchanged, so greedy tokens equal the stock cache's (fp32)."""
    out = _recipe("kv_cache_generate").main(["--tokens", "200", "--max-new-tokens", "6", "--bits", "16",
                                             "--no-rotate", "--residual", "16", "--dtype", "float32",
                                             "--device", "cpu"])
    assert out["compared"] == 6 and out["agree"] == 6, out
    assert out["memory"]["packed_used"] > 0  # the prompt went through the packed part, not only the window
    assert "greedy tokens identical" in capsys.readouterr().out


def test_kv_cache_recipe_on_lm_infinite_static_identity_reproduces_lm_infinite(capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    """On LM-Infinite (window 96 < the prompt) with the fixed-buffer quantized cache at the identity setting: the
    greedy tokens equal LM-Infinite's own, and the packed part was used."""
    out = _recipe("kv_cache_generate").main(["--tokens", "200", "--max-new-tokens", "6", "--bits", "16",
                                             "--no-rotate", "--residual", "16", "--lm-infinite", "96",
                                             "--decode", "static", "--dtype", "float32", "--device", "cpu"])
    assert out["compared"] == 6 and out["agree"] == 6, out
    assert out["memory"]["packed_used"] > 0
    assert "StaticBoundedQuantizedKVCache" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _recipe("kv_cache_generate").main(["--decode", "static"])  # without --lm-infinite


def test_long_recall_recipe_answers_with_and_without_memory(capsys: pytest.CaptureFixture[str]) -> None:
    answers = _recipe("long_recall").main(["--tokens", "700", "--n-local", "256", "--block-size", "64", "--topk", "4",
                                           "--compare", "--dtype", "float32", "--device", "cpu"])
    assert set(answers) == {"LM-Infinite + memory", "LM-Infinite"}
    assert all(isinstance(a, str) and a.strip() for a in answers.values()), answers
    printed = capsys.readouterr().out
    assert "prompt:" in printed and "host" in printed  # the memory run reports its cache bytes
