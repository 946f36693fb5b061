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
import torch

pytest.importorskip("deepspeed", reason="install the train extra: pip install -e '.[train]'")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sp_worker import SCENARIOS, eval_samples, pad_collate, reference_eval_loss  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    seed = int.from_bytes(os.urandom(2), "little")
    out = tmp_path_factory.mktemp("sp") / "res.json"
    env = {**os.environ, "LONGKIT_SP_SEED": str(seed), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + seed % 1000), str(HERE / "sp_worker.py"), str(out), *SCENARIOS, "train_steps", "errors",
           "accelerate", "trainer", "trainer_eval", "trainer_eval_z3_dp2"]
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


def test_hf_trainer_evaluate_and_predict(results):
    """SP=2 (one group), ZeRO-2: eval_loss after a training step (eval_strategy="steps", evaluate(), and
    predict()'s test_loss) equals the one-process eval loss of the same weights on the same 5 samples;
    predictions and compute_metrics raise a clear error on every rank instead of hanging."""
    seed, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res["trainer_eval"]
        assert "error" not in r, f"seed {seed}: {r.get('trace', r['error'])}"
        assert len(r["in_train_losses"]) == 1, (seed, rank, r)
        for key in ("eval_loss", "test_loss"):
            assert abs(r[key] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (seed, rank, key, r)
        assert abs(r["in_train_losses"][0] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (seed, rank, r)
        assert r["eval_samples"] == 5 and r["predictions"] is None, (seed, rank, r)
        for key in ("predict_error", "metrics_error"):
            assert r[key].startswith("NotImplementedError: SequenceParallelTrainer evaluates the loss only"), r[key]
            assert "prediction_loss_only=True" in r[key], r[key]


def test_hf_trainer_evaluate_two_groups_zero3(results):
    """Two groups (SP size 1 on 2 processes), ZeRO-3, evaluate() before train(): 5 samples split 3 + 2, with a
    filler-only batch on one group (batch 2) or a filler row in a batch (batch 3); no hang, every sample
    counted once: the one-process loss of those batches."""
    seed, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res["trainer_eval_z3_dp2"]
        assert "error" not in r, f"seed {seed}: {r.get('trace', r['error'])}"
        assert abs(r["eval_loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (seed, rank, r)
        assert abs(r["eval_loss3"] - r["ref_loss3"]) <= 1e-5 * abs(r["ref_loss3"]), (seed, rank, r)


def test_reference_eval_loss_is_trainers(tmp_path):
    """The reference above is what a plain one-process Trainer reports: batch losses weighted by batch size
    (the last, partial batch counts once per sample, not eval_batch_size times)."""
    import copy

    from transformers import Trainer, TrainingArguments

    from tests.utils import tiny_model

    model = tiny_model("llama", initializer_range=0.3)
    data = eval_samples(5, 96, torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little")))
    ref_loss, _ = reference_eval_loss(copy.deepcopy(model), data, [[0, 1], [2, 3], [4]])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True, report_to=[])
    got = Trainer(model=model, args=args, eval_dataset=data, data_collator=pad_collate).evaluate()["eval_loss"]
    assert abs(got - ref_loss) <= 1e-5 * abs(ref_loss), (got, ref_loss)


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
