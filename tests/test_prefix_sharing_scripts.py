"""benchmarks/prefix_sharing.py's dry run (CPU, tiny random Llama) and the two prefix-sharing recipes at toy size.

The benchmark: every dataset x method has a row with finite numbers, longkit computes fewer tokens than the stock
padded batch (packing fewer still) and its log-probs match stock's (fp32: ~1e-6). The recipes: two TRL steps each
run, losses are finite and the shared forwards computed fewer tokens than their batches held.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))


def test_benchmark_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = importlib.import_module("benchmarks.prefix_sharing")
    path = bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert path == tmp_path / "prefix_sharing_cpu_dry_run.json"
    result = json.loads(path.read_text())
    assert result["stock_attn"] == "sdpa" and result["args"]["dry_run"] is True
    assert result["env"]["torch"] and result["model"]["shape"] == "dry"

    rows = {(r["dataset"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(d, m) for d in bench.DATASETS for m in bench.METHODS}
    for key, r in rows.items():
        assert "error" not in r, key
        for col in ("samples_per_s", "tokens_per_s", "speedup", "step_ms_median", "tok_computed", "tok_in_batch",
                    "tok_padded"):
            assert isinstance(r[col], (int, float)) and math.isfinite(r[col]) and r[col] > 0, (key, col, r[col])
        assert len(r["step_ms"]) == 1 and r["peak_gib"] is None  # one timed step; no GPU memory on CPU
    for ds in bench.DATASETS:
        stock, shared, packed = (rows[ds, m] for m in bench.METHODS)
        assert stock["speedup"] == 1.0 and stock["max_dlogp"] is None
        assert stock["tok_computed"] == stock["tok_padded"] > stock["tok_in_batch"]
        assert packed["tok_computed"] <= shared["tok_computed"] < stock["tok_computed"], ds
        assert packed["tok_computed"] < packed["tok_in_batch"], ds  # each prompt computed once
        for r in (shared, packed):
            assert r["tok_in_batch"] == stock["tok_in_batch"]  # the same batches for every method
            assert 0 <= r["max_dlogp"] < 1e-4, (ds, r["method"], r["max_dlogp"])


def test_benchmark_bad_options(tmp_path: Path) -> None:
    bench = importlib.import_module("benchmarks.prefix_sharing")
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--steps", "0", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--datasets", "dpo_huge", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["prefix_sharing_dpo", "prefix_sharing_grpo"])
def test_recipe_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        recipe.main(["--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out


@pytest.mark.parametrize("name,argv", [("prefix_sharing_dpo", ["--examples", "16"]),
                                       ("prefix_sharing_grpo", ["--examples", "8"])])
def test_recipe_runs_two_steps(name: str, argv: list[str], tmp_path: Path) -> None:
    for dep in ("trl", "peft", "datasets"):
        pytest.importorskip(dep)
    recipe = importlib.import_module(name)
    out = recipe.main(["--max-steps", "2", "--output-dir", str(tmp_path), *argv])
    assert len(out["losses"]) == 2 and all(map(math.isfinite, out["losses"]))
    assert out["shared_forwards"] >= 2  # DPO: policy + reference per step; GRPO: the training forward
    assert out["computed"] < out["tokens"] <= out["padded"]


def test_benchmark_logprob_head_matches_autograd() -> None:
    """The benchmark's chunked LM head (its own backward) equals log_softmax + gather under autograd (fp32: its
    softmax runs in fp32 whatever the input dtype)."""
    import torch

    bench = importlib.import_module("benchmarks.prefix_sharing")
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    out = bench.ChunkedLogProbs.apply(hidden, weight, targets, 8)  # 37 tokens: 4 full chunks and a partial one
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    ref = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None])[:, 0]
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
