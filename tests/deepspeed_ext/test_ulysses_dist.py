"""Ulysses SP=2 on 2 gloo processes through DeepSpeed vs the unpatched model in one process.

One ``torch.distributed.run`` launch runs every scenario (DeepSpeed start-up dominates); each test then
checks one scenario's numbers. Tolerances: fp32 loss to 1e-5 relative and gradients to 1e-5 of the
largest gradient (the math is the same, only the summation order changes); bf16 to 1e-3 / 2e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="install the train extra: pip install -e '.[train]'")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sp_worker import SCENARIOS  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    seed = int.from_bytes(os.urandom(2), "little")
    out = tmp_path_factory.mktemp("sp") / "res.json"
    env = {**os.environ, "LONGKIT_SP_SEED": str(seed), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + seed % 1000), str(HERE / "sp_worker.py"), str(out), *SCENARIOS, "train_steps", "errors",
           "accelerate", "trainer"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    per_rank = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    return seed, per_rank


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sp2_matches_single_process(results, name):
    seed, per_rank = results
    tol_loss, tol_grad = (1e-3, 2e-2) if SCENARIOS[name][-1] == "bf16" else (1e-5, 1e-5)
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert "error" not in r, f"seed {seed} rank {rank}: {r.get('trace', r['error'])}"
        assert abs(r["sp_loss"] - r["ref_loss"]) <= tol_loss * abs(r["ref_loss"]), (seed, rank, r)
        assert r["max_grad_err"] <= tol_grad * r["grad_scale"], (seed, rank, r)


def test_training_steps_match(results):
    """initialize(training_data=...) loader + engine.step with ZeRO-2 and clipping: same losses and weights."""
    seed, per_rank = results
    for res in per_rank:
        r = res["train_steps"]
        assert "error" not in r, f"seed {seed}: {r.get('trace', r['error'])}"
        assert len(r["sp_losses"]) == len(r["ref_losses"]) == 3
        for a, b in zip(r["sp_losses"], r["ref_losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (seed, r)
        assert r["max_param_err"] < 1e-5, (seed, r)


def test_accelerate_deepspeed_plugin_path(results):
    """Accelerator(deepspeed_plugin=...) + SequenceParallel.from_ds_config: same loss and gradients."""
    seed, per_rank = results
    for res in per_rank:
        r = res["accelerate"]
        assert "error" not in r, f"seed {seed}: {r.get('trace', r['error'])}"
        assert abs(r["sp_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (seed, r)
        assert r["max_grad_err"] <= 1e-5 * r["grad_scale"], (seed, r)


def test_hf_trainer_subclass(results):
    """SequenceParallelTrainer: 3 Trainer steps (ZeRO-2, SGD + momentum, clipping) give the one-process weights."""
    seed, per_rank = results
    for res in per_rank:
        r = res["trainer"]
        assert "error" not in r, f"seed {seed}: {r.get('trace', r['error'])}"
        assert r["max_param_err"] < 1e-5, (seed, r)


def test_clear_errors_under_a_process_group(results):
    _, per_rank = results
    got = per_rank[0]["errors"]
    assert got["size_not_dividing_world"].startswith("ConfigError") and "divide the world size 2" in \
        got["size_not_dividing_world"]
    assert got["train_batch_size"].startswith("ConfigError") and "train_micro_batch_size_per_gpu" in \
        got["train_batch_size"]
    assert got["no_position_ids"].startswith("ValueError") and "shard_batch" in got["no_position_ids"]
    assert got["sdpa_with_packing"].startswith("UnsupportedModelError") and "'kernel' or 'auto'" in \
        got["sdpa_with_packing"]
