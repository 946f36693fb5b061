"""Worker for the gloo tests: SP=2 DeepSpeed runs vs the unpatched single-process model, per scenario.

Run by tests/deepspeed_ext/test_ulysses_dist.py as
``python -m torch.distributed.run --nproc_per_node 2 sp_worker.py OUT.json SCENARIO...``.
Every rank builds the same model and batch (seed from ``LONGKIT_SP_SEED``, fresh per test run),
computes the reference loss and gradients with the plain HF model on the whole batch, then the longkit
SP=2 loss and (ZeRO-gathered) gradients.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import tiny_model  # noqa: E402

SEED = int(os.environ.get("LONGKIT_SP_SEED", "1234"))

SCENARIOS = {
    # name: (model_type, model overrides, batch kind, B, T, zero stage, dtype)
    "llama_z0": ("llama", {}, "plain", 2, 32, 0, "fp32"),
    "llama_z1": ("llama", {}, "plain", 2, 32, 1, "fp32"),
    "llama_z2": ("llama", {}, "plain", 2, 32, 2, "fp32"),
    "llama_z3": ("llama", {}, "plain", 2, 32, 3, "fp32"),
    "qwen3_mqa_uneven_len": ("qwen3", {"num_key_value_heads": 1}, "plain", 2, 29, 2, "fp32"),
    "llama_packed": ("llama", {}, "packed", 1, 40, 0, "fp32"),
    "llama_right_pad": ("llama", {}, "right_pad", 3, 30, 1, "fp32"),
    "llama_left_pad": ("llama", {}, "left_pad", 2, 24, 0, "fp32"),
    "llama_uneven_heads": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96},
                           "plain", 2, 20, 2, "fp32"),
    "qwen2_heads5": ("qwen2", {"num_attention_heads": 5, "num_key_value_heads": 5, "hidden_size": 80},
                     "plain", 1, 26, 0, "fp32"),
    "llama_bf16_z2": ("llama", {}, "plain", 2, 32, 2, "bf16"),
    "llama_ckpt_z2": ("llama", {}, "packed", 1, 40, 2, "fp32"),  # + gradient checkpointing (recompute)
    # attention="kernel": plain causal rows through longkit's kernel (reference on CPU) instead of SDPA
    "llama_kernel_z1": ("llama", {}, "plain", 2, 32, 1, "fp32"),
    "qwen3_kernel_uneven_len": ("qwen3", {"num_key_value_heads": 1}, "plain", 1, 29, 0, "fp32"),
}


def make_batch(kind: str, B: int, T: int, vocab: int, gen: torch.Generator) -> dict:
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    batch = {"input_ids": ids, "labels": labels}
    if kind == "packed":  # three documents in one row; the first token of each document gets no label
        cuts = [0, 13, 27, T]
        pos = torch.cat([torch.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:])]).unsqueeze(0)
        for c in cuts[1:-1]:
            labels[0, c] = -100
        batch["position_ids"] = pos
    elif kind in ("right_pad", "left_pad"):
        mask = torch.ones(B, T, dtype=torch.long)
        for b in range(1, B):
            n = 5 * b
            if kind == "right_pad":
                mask[b, T - n:] = 0
            else:
                mask[b, :n] = 0
        labels[mask == 0] = -100
        if kind == "left_pad":  # the first real token is predicted from a pad position: not a defined target
            for b in range(1, B):
                labels[b, 5 * b] = -100
        batch["attention_mask"] = mask
    return batch


def reference(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return float(out.loss.detach()), grads


def run(name: str) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from longkit.deepspeed_ext import initialize

    model_type, overrides, kind, B, T, stage, dtype = SCENARIOS[name]
    torch.manual_seed(SEED)
    model = tiny_model(model_type, **overrides).train()
    gen = torch.Generator().manual_seed(SEED + 1)
    batch = make_batch(kind, B, T, model.config.vocab_size, gen)
    ref_loss, ref_grads = reference(model, batch)

    sp_model = copy.deepcopy(model)
    sp_model.zero_grad(set_to_none=True)
    if "ckpt" in name:
        sp_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2,
                                          "attention": "kernel" if "kernel" in name else "auto"}},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    engine, *_ , sp = initialize(sp_model, config, model_parameters=sp_model.parameters())
    shard = sp.shard_batch(batch)
    out = engine(**{k: (v.to(engine.device) if torch.is_tensor(v) else v) for k, v in shard.items()})
    loss = out.loss
    engine.backward(loss)
    err, worst = 0.0, ""
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            return {"error": f"no gradient for {n}"}
        d = (g.float().cpu() - ref_grads[n]).abs().max().item()
        if d > err:
            err, worst = d, n
    engine.destroy() if hasattr(engine, "destroy") else None
    del deepspeed
    return {"ref_loss": ref_loss, "sp_loss": float(loss.detach()), "max_grad_err": err, "grad_scale": scale,
            "worst_param": worst, "local_tokens": int(shard["input_ids"].shape[1])}


def train_steps(steps: int = 3) -> dict:
    """Three SGD steps through initialize(training_data=...) vs plain torch SGD on one process.

    (SGD rather than Adam: Adam's g / sqrt(v) turns 1e-8 differences in near-zero gradients into full
    lr-sized steps, which would hide real errors behind noise.)"""
    from longkit.deepspeed_ext import initialize

    torch.manual_seed(SEED)
    model = tiny_model("qwen3", num_key_value_heads=1).train()
    gen = torch.Generator().manual_seed(SEED + 2)
    data = [{"input_ids": torch.randint(3, 96, (27,), generator=gen)} for _ in range(2 * steps)]

    def collate(items):
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": ids.clone()}

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ref_losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = ref(**collate(data[2 * i: 2 * i + 2]), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)  # DeepSpeed's gradient_clipping below
        opt.step()
        ref_losses.append(float(loss.detach()))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 1.0,
              "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}}
    engine, _, loader, _, sp = initialize(model, config, optimizer=torch.optim.SGD(model.parameters(), lr=0.5,
                                                                                   momentum=0.9),
                                          training_data=data, collate_fn=collate)
    loader.sampler.shuffle = False
    sp_losses = []
    for shard in loader:
        loss = engine(**shard).loss
        engine.backward(loss)
        engine.step()
        sp_losses.append(float(loss.detach()))
    from deepspeed.utils import safe_get_full_fp32_param

    err = max((safe_get_full_fp32_param(p).cpu() - q.detach()).abs().max().item()
              for p, q in zip(engine.module.parameters(), ref.parameters()))
    return {"ref_losses": ref_losses, "sp_losses": sp_losses, "max_param_err": err}


def with_accelerate() -> dict:
    """accelerate's DeepSpeed plugin + SequenceParallel.from_ds_config: loss and grads vs one process."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.utils import safe_get_full_grad

    from longkit.deepspeed_ext import SequenceParallel

    torch.manual_seed(SEED)
    model = tiny_model("llama").train()
    batch = make_batch("packed", 1, 40, model.config.vocab_size, torch.Generator().manual_seed(SEED + 3))
    ref_loss, ref_grads = reference(model, batch)
    model.zero_grad(set_to_none=True)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}}
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), cpu=True)
    sp = SequenceParallel.from_ds_config(config)
    sp.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, opt = acc.prepare(model, opt)
    loss = engine(**sp.shard_batch(batch)).loss
    acc.backward(loss)
    err = max((safe_get_full_grad(p).float() - ref_grads[n]).abs().max().item()
              for n, p in engine.module.named_parameters())
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return {"ref_loss": ref_loss, "sp_loss": float(loss.detach()), "max_grad_err": err, "grad_scale": scale}


def with_trainer() -> dict:
    """SequenceParallelTrainer (HF Trainer + DeepSpeed ZeRO-2, SGD, clipping): final weights vs one process."""
    import tempfile

    from deepspeed.utils import safe_get_full_fp32_param
    from torch.utils.data import DistributedSampler
    from transformers import TrainingArguments

    from longkit.deepspeed_ext.trainer import SequenceParallelTrainer

    torch.manual_seed(SEED)
    model = tiny_model("qwen3", num_key_value_heads=1).train()
    gen = torch.Generator().manual_seed(SEED + 4)
    data = [{"input_ids": torch.randint(3, 96, (23,), generator=gen)} for _ in range(6)]

    def collate(items):
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": ids.clone()}

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    order = list(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=11))
    for i in range(3):
        opt.zero_grad()
        ref(**collate([data[j] for j in order[2 * i: 2 * i + 2]]), use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}},
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3, learning_rate=0.5,
                                 lr_scheduler_type="constant", deepspeed=config, use_cpu=True, report_to=[],
                                 save_strategy="no", seed=11, data_seed=11, logging_steps=1, max_grad_norm=1.0)
        trainer = SequenceParallelTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.train()
        engine = trainer.model_wrapped
        err = max((safe_get_full_fp32_param(p).cpu() - q.detach()).abs().max().item()
                  for p, q in zip(engine.module.parameters(), ref.parameters()))
    return {"max_param_err": err}


def eval_samples(n: int, vocab: int, gen: torch.Generator, lengths: tuple[int, int] = (9, 24)) -> list[dict]:
    """``n`` samples of random lengths (odd and even, so padded batches and shards vary)."""
    return [{"input_ids": torch.randint(3, vocab, (int(torch.randint(*lengths, (1,), generator=gen)),),
                                        generator=gen)} for _ in range(n)]


def pad_collate(items: list[dict]) -> dict:
    """Right-pad with id 0; padding and the first two tokens (a prompt) get no labels."""
    T = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, : len(it["input_ids"])] = it["input_ids"]
        mask[b, : len(it["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def reference_eval_loss(model, data: list[dict], batches: list[list[int]]) -> tuple[float, float]:
    """``Trainer``'s eval_loss on one process: batch token-mean losses weighted by batch size (and, to show
    that a test can tell them apart, the unweighted mean of the batch losses)."""
    model.eval()
    losses = [float(model(**pad_collate([data[i] for i in b]), use_cache=False).loss) for b in batches]
    n = [len(b) for b in batches]
    return sum(a * b for a, b in zip(losses, n)) / sum(n), sum(losses) / len(losses)


def with_trainer_eval() -> dict:
    """SequenceParallelTrainer SP=2, ZeRO-2: one training step with eval_strategy="steps", then evaluate() and
    predict() on 5 variable-length samples (batch 2: the last batch holds one sample) vs one process."""
    import tempfile

    from transformers import TrainingArguments

    from longkit.deepspeed_ext.trainer import SequenceParallelTrainer

    torch.manual_seed(SEED)
    model = tiny_model("llama", initializer_range=0.3).train()  # spread-out losses: weighting errors show
    gen = torch.Generator().manual_seed(SEED + 5)
    train = eval_samples(2, 96, gen, (20, 21))
    data = eval_samples(5, 96, gen)

    ref = copy.deepcopy(model)  # the same single SGD step (2 samples = 1 batch), then the one-process eval
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ref(**pad_collate(train), use_cache=False).loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    ref_loss, naive_loss = reference_eval_loss(ref, data, [[0, 1], [2, 3], [4]])
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}},
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 2}}}
    res: dict = {"ref_loss": ref_loss, "naive_loss": naive_loss}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                                 max_steps=1, eval_strategy="steps", eval_steps=1, learning_rate=0.5,
                                 lr_scheduler_type="constant", deepspeed=config, use_cpu=True, report_to=[],
                                 save_strategy="no", max_grad_norm=1.0)
        trainer = SequenceParallelTrainer(model=model, args=args, train_dataset=train, eval_dataset=data,
                                          data_collator=pad_collate)
        trainer.train()
        res["in_train_losses"] = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        metrics = trainer.evaluate()
        res["eval_loss"], res["eval_samples"] = metrics["eval_loss"], trainer.num_examples(
            trainer.get_eval_dataloader())
        try:
            trainer.predict(data)  # prediction_loss_only=False: logits requested
            res["predict_error"] = "no error"
        except Exception as e:  # noqa: BLE001
            res["predict_error"] = f"{type(e).__name__}: {e}"
        try:
            SequenceParallelTrainer(model=tiny_model("llama"), args=args, eval_dataset=data,
                                    data_collator=pad_collate, compute_metrics=lambda p: {})
            res["metrics_error"] = "no error"
        except Exception as e:  # noqa: BLE001
            res["metrics_error"] = f"{type(e).__name__}: {e}"
        trainer.args.prediction_loss_only = True
        pred = trainer.predict(data)
        res["test_loss"], res["predictions"] = pred.metrics["test_loss"], pred.predictions
    return res


def with_trainer_eval_zero3_dp2() -> dict:
    """SP size 1 on 2 processes (2 groups), ZeRO-3, evaluate() before train(): 5 samples over 2 groups.
    Batch 2: group 0 gets samples [0, 2], [4]; group 1 [1, 3] and a batch holding only a filler sample (the
    groups must run as many forwards: ZeRO-3 gathers parameters from both). Batch 3: [0, 2, 4] and
    [1, 3, filler]. Every sample counts once."""
    import tempfile

    from transformers import TrainingArguments

    from longkit.deepspeed_ext.trainer import SequenceParallelTrainer

    torch.manual_seed(SEED)
    model = tiny_model("qwen3", num_key_value_heads=1, initializer_range=0.3).train()
    data = eval_samples(5, 96, torch.Generator().manual_seed(SEED + 6))
    ref_loss, naive_loss = reference_eval_loss(copy.deepcopy(model), data, [[0, 2], [4], [1, 3]])
    ref_loss3, _ = reference_eval_loss(copy.deepcopy(model), data, [[0, 2, 4], [1, 3]])
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
              "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 1}}}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                                 learning_rate=0.1, deepspeed=config, use_cpu=True, report_to=[], save_strategy="no")
        trainer = SequenceParallelTrainer(model=model, args=args, eval_dataset=data, data_collator=pad_collate)
        loss = trainer.evaluate()["eval_loss"]
        trainer.args.per_device_eval_batch_size = 3
        loss3 = trainer.evaluate()["eval_loss"]
    return {"ref_loss": ref_loss, "naive_loss": naive_loss, "eval_loss": loss, "ref_loss3": ref_loss3,
            "eval_loss3": loss3}


def errors() -> dict:
    """Messages of the errors that need a running process group."""
    from longkit.deepspeed_ext import initialize

    torch.manual_seed(0)
    got = {}
    base = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    cases = {
        "size_not_dividing_world": {**base, "longkit": {"sequence_parallel": {"size": 3}}},
        "train_batch_size": {**base, "train_batch_size": 1, "longkit": {"sequence_parallel": {"size": 2}}},
    }
    for key, cfg in cases.items():
        model = tiny_model("llama").train()
        try:
            initialize(model, cfg, model_parameters=model.parameters())
            got[key] = "no error"
        except Exception as e:  # noqa: BLE001
            got[key] = f"{type(e).__name__}: {e}"
    model = tiny_model("llama").train()
    engine, *_, sp = initialize(model, {**base, "longkit": {"sequence_parallel": {"size": 2, "attention": "sdpa"}}},
                                model_parameters=model.parameters())
    packed = make_batch("packed", 1, 40, 96, torch.Generator().manual_seed(0))
    try:
        engine(**sp.shard_batch(packed))
        got["sdpa_with_packing"] = "no error"
    except Exception as e:  # noqa: BLE001
        got["sdpa_with_packing"] = f"{type(e).__name__}: {e}"
    try:
        engine(input_ids=torch.randint(0, 96, (1, 8)))
        got["no_position_ids"] = "no error"
    except Exception as e:  # noqa: BLE001
        got["no_position_ids"] = f"{type(e).__name__}: {e}"
    return got


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        try:
            special = {"train_steps": train_steps, "errors": errors, "accelerate": with_accelerate,
                       "trainer": with_trainer, "trainer_eval": with_trainer_eval,
                       "trainer_eval_z3_dp2": with_trainer_eval_zero3_dp2}
            results[name] = special[name]() if name in special else run(name)
        except Exception as e:  # reported per scenario so one failure does not hide the others
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
