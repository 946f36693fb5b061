"""The Ulysses GPU benchmark and the SFT recipe (Ulysses; offload + tiled loss/MLP; LASP-2 on a linear-attention
hybrid) run end to end at toy size on CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="install the train extra: pip install -e '.[train]'")

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ulysses.py"), "--gpus", "2", "--shape", "tiny", "--runs",
           "none@1:128", "longkit:128", "longkit_kernel:128", "alst:128", "--warmup", "0", "--steps", "2",
           "--max-len", "longkit", "--max-start", "128", "--max-limit", "256", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "ulysses.json").read_text())
    rows = res["rows"]
    # the doubling search stops at --max-limit without a failure, and says so
    assert res["max_len"] == [{"impl": "longkit", "max_seq": 256, "peak_gib": res["max_len"][0]["peak_gib"],
                               "first_failure": None, "max_limit": 256}], res["max_len"]
    assert [r["impl"] for r in rows] == ["none", "longkit", "longkit_kernel", "alst"]
    assert all(r["error"] is None and r["step_s"] > 0 for r in rows), rows
    # Same samples, same weights: longkit SP=2 reproduces the one-process losses; so does ALST.
    for r in rows[1:]:
        assert r["loss_max_abs_diff_vs_1proc"] < 1e-4, rows


def test_long_context_sft_recipe_trains(tmp_path):
    """The recipe's CPU command (2 gloo processes, tiny model, real text): runs, and the loss goes down."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
           str(ROOT / "recipes" / "long_context_sft.py"), "--steps", "4", "--seq-len", "512",
           "--response-len", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "loss " in line]
    assert len(losses) == 4 and losses[-1] < losses[0], proc.stdout


def test_long_context_sft_recipe_with_offload_and_tiled_loss(tmp_path):
    """One process, no sequence parallelism, gradient checkpointing + activation offload + tiled loss and MLP:
    trains."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29643",
           str(ROOT / "recipes" / "long_context_sft.py"), "--steps", "3", "--seq-len", "512", "--response-len",
           "128", "--sp-size", "1", "--gradient-checkpointing", "--activation-offload", "--tiled-loss", "--tiled-mlp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sequence-parallel size 1" in proc.stdout
    losses = [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "loss " in line]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout


def _recipe_losses(tmp_path: Path, nproc: int, port: int, *extra: str, model: str = "tiny-minimax") -> list[float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(ROOT / "recipes" / "long_context_sft.py"), "--model", model, "--config",
           str(ROOT / "recipes" / "configs" / "lasp2_sp2_zero2.json"), "--steps", "3", "--seq-len", "512",
           "--response-len", "128", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [float(line.split("loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "loss " in line]


@pytest.mark.parametrize("model, port", [("tiny-minimax", 29645), ("tiny-kimi-linear", 29651)])
def test_long_context_sft_recipe_lasp2_matches_one_process(tmp_path, model, port):
    """The LASP-2 command of the recipe (tiny MiniMax-style and Kimi-Linear hybrids, 2 gloo processes, mode lasp2):
    the same losses, step after step, as one process on the same samples (the weights follow the same updates)."""
    two = _recipe_losses(tmp_path, 2, port, model=model)
    one = _recipe_losses(tmp_path, 1, port + 2, "--sp-size", "1", model=model)
    assert len(two) == len(one) == 3 and two[-1] < two[0], (one, two)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-3, (one, two)
