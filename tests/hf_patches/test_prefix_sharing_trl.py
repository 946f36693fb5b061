"""Prefix sharing inside TRL 1.16's trainers: DPO (loss types, packing, LoRA, precomputed reference, length-aware
batching), GRPO and RLOO equal stock TRL on the same batches (tolerances: see test_prefix_sharing.py)."""

from __future__ import annotations

import random
import tempfile

import pytest
import torch

from longkit.hf_patches.prefix_sharing import PrefixSharingConfig
from longkit.hf_patches.prefix_sharing.patch import last_plan
from tests.hf_patches.test_prefix_sharing import VOCAB
from tests.utils import tiny_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def word_tokenizer():
    """A word-level tokenizer over ``WORDS`` (+ pad/eos/bos/unk): TRL needs a real tokenizer; a tiny vocabulary keeps
    the fused LM head cheap on CPU."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def _text(n: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def saved_model() -> str:
    """A tiny Llama saved to disk (TRL loads the reference model from the policy's path)."""
    d = tempfile.mkdtemp(prefix="longkit_ps_")
    torch.manual_seed(1234)
    tiny_model("llama", max_position_embeddings=256).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    return d


def _load(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)


def _compare_runs(path: str, stock: tuple, shared: tuple) -> None:
    (m0, logs0), (m1, logs1) = stock, shared
    assert len(logs0) == len(logs1) > 0
    # rewards/accuracies is the share of pairs with chosen reward > rejected reward: a step function, and with LoRA's
    # zero-initialised factors both rewards start at 0, so rounding alone decides it (seen: 0 vs 1/3 at one seed).
    # The rewards themselves are compared.
    skip = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "rewards/accuracies")
    for a, b in zip(logs0, logs1):
        for k, v in a.items():
            if isinstance(v, float) and k not in skip and "time" not in k:
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    init = dict(_load(path).named_parameters())
    for (name, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if name not in init:  # a LoRA factor: compare the weights themselves
            torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-6, msg=name)
            continue
        d0, d1 = p0 - init[name], p1 - init[name]  # what training changed
        assert float((d1 - d0).norm()) <= 1e-3 * float(d0.norm()) + 1e-7, name


def _train_dpo(cls: type, path: str, data, loss_type: list[str], peft: bool = False, **extra) -> tuple:
    from trl import DPOConfig

    torch.manual_seed(0)
    kwargs = {}
    if cls is not trl.DPOTrainer:
        kwargs["prefix_sharing"] = PrefixSharingConfig(min_shared_tokens=4, pack=extra.pop("pack", True))
    else:
        extra.pop("pack", None)
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=3, max_steps=2, learning_rate=0.1,
                     optim="sgd", loss_type=loss_type, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                     bf16=False, seed=0, data_seed=0, dataset_num_proc=None, **extra)
    trainer = cls(model=_load(path), args=args, train_dataset=data, processing_class=word_tokenizer(), **kwargs)
    trainer.train()
    if cls is not trl.DPOTrainer:
        plan = last_plan(trainer.model.get_base_model() if peft else trainer.model)
        assert plan is not None and plan.packed_tokens < plan.tokens
        if trainer.ref_model is not None:  # TRL loaded it from the policy's path: patched too
            assert last_plan(trainer.ref_model) is not None
    return trainer.model, [log for log in trainer.state.log_history if "loss" in log]


@pytest.fixture(scope="module")
def dpo_data():
    random.seed(7)
    n = 6
    return datasets.Dataset.from_dict({"prompt": [_text(random.randint(12, 30)) for _ in range(n)],
                                       "chosen": [_text(random.randint(1, 8)) for _ in range(n)],
                                       "rejected": [_text(random.randint(1, 8)) for _ in range(n)]})


@pytest.mark.parametrize("loss_type,pack", [(["sigmoid"], True), (["ipo"], False), (["sigmoid_norm"], True),
                                            (["apo_zero", "sft"], True), (["hinge"], False)])
def test_dpo_trainer_equals_stock_trl(saved_model: str, dpo_data, loss_type: list[str], pack: bool) -> None:
    from longkit.hf_patches.prefix_sharing import PrefixSharingDPOTrainer

    extra = {"loss_weights": [1.0, 0.5]} if len(loss_type) > 1 else {}
    stock = _train_dpo(trl.DPOTrainer, saved_model, dpo_data, loss_type, **extra)
    shared = _train_dpo(PrefixSharingDPOTrainer, saved_model, dpo_data, loss_type, pack=pack, **extra)
    _compare_runs(saved_model, stock, shared)


def test_dpo_trainer_with_lora_and_precomputed_reference(saved_model: str, dpo_data) -> None:
    from longkit.hf_patches.prefix_sharing import PrefixSharingDPOTrainer

    extra = {"precompute_ref_log_probs": True}
    stock = _train_dpo(trl.DPOTrainer, saved_model, dpo_data, ["sigmoid"], peft=True, **extra)
    shared = _train_dpo(PrefixSharingDPOTrainer, saved_model, dpo_data, ["sigmoid"], peft=True, **extra)
    _compare_runs(saved_model, stock, shared)


def _train_group(cls: type, stock: type, path: str, g: int) -> tuple:
    """Two steps of GRPO or RLOO (``stock``, or ``cls``: its prefix-sharing subclass) on 4 prompts x ``g``
    completions."""
    config_cls = trl.GRPOConfig if stock is trl.GRPOTrainer else trl.RLOOConfig
    random.seed(11)
    data = datasets.Dataset.from_dict({"prompt": [_text(random.randint(12, 24)) for _ in range(4)]})

    def reward_len(completions: list[str], **_: object) -> list[float]:  # a rule-based reward on the text
        return [float(len(c.split()) % 3) for c in completions]

    torch.manual_seed(0)
    kwargs = {} if cls is stock else {"prefix_sharing": PrefixSharingConfig(min_shared_tokens=4)}
    args = config_cls(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2 * g, num_generations=g,
                      max_completion_length=8, max_steps=2, learning_rate=0.1, optim="sgd", beta=0.1, report_to=[],
                      logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, seed=0, data_seed=0,
                      steps_per_generation=1, temperature=1.0)
    trainer = cls(model=_load(path), reward_funcs=reward_len, args=args, train_dataset=data,
                  processing_class=word_tokenizer(), **kwargs)
    trainer.train()
    if cls is not stock:
        plan = last_plan(trainer.model)
        assert plan is not None and plan.packed_tokens < plan.tokens
    return trainer.model, [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("g", [2, 4])
def test_grpo_trainer_equals_stock_trl(saved_model: str, g: int) -> None:
    from longkit.hf_patches.prefix_sharing import PrefixSharingGRPOTrainer

    stock = trl.GRPOTrainer
    _compare_runs(saved_model, _train_group(stock, stock, saved_model, g),
                  _train_group(PrefixSharingGRPOTrainer, stock, saved_model, g))


def test_rloo_trainer_equals_stock_trl(saved_model: str) -> None:
    from longkit.hf_patches.prefix_sharing import PrefixSharingRLOOTrainer

    stock = trl.RLOOTrainer
    _compare_runs(saved_model, _train_group(stock, stock, saved_model, 4),
                  _train_group(PrefixSharingRLOOTrainer, stock, saved_model, 4))


def test_dpo_length_aware_batching(saved_model: str) -> None:
    """train_sampling_strategy="group_by_length": stock TRL cannot infer lengths of preference data; the
    prefix-sharing trainer groups pairs by packed length (prompt once + both answers) and trains."""
    from trl import DPOConfig

    from longkit.hf_patches.prefix_sharing import PrefixSharingDPOTrainer
    from longkit.hf_patches.prefix_sharing.trl import packed_lengths

    random.seed(3)
    n = 60  # transformers groups within "megabatches" of min(n // (4 * batch), 50) micro-batches: 5 here
    data = datasets.Dataset.from_dict({"prompt": [_text(random.choice([6, 40])) for _ in range(n)],
                                       "chosen": [" " + _text(random.randint(1, 4)) for _ in range(n)],
                                       "rejected": [" " + _text(random.randint(1, 4)) for _ in range(n)]})

    def args() -> DPOConfig:
        return DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=3, max_steps=2, report_to=[],
                         use_cpu=True, bf16=False, save_strategy="no", train_sampling_strategy="group_by_length",
                         dataset_num_proc=None)

    with pytest.raises(ValueError, match="infer lengths"):
        trl.DPOTrainer(model=_load(saved_model), args=args(), train_dataset=data,
                       processing_class=word_tokenizer()).train()
    trainer = PrefixSharingDPOTrainer(model=_load(saved_model), args=args(), train_dataset=data,
                                      processing_class=word_tokenizer(),
                                      prefix_sharing=PrefixSharingConfig(min_shared_tokens=4))
    lengths = packed_lengths(trainer.train_dataset)
    order = list(trainer._get_train_sampler())
    batches = [sorted(lengths[i] for i in order[k:k + 3]) for k in range(0, n, 3)]
    # short and long prompts (6 vs 40 words) share a micro-batch at most once per megabatch (random order: ~3 in 4)
    assert sum(1 for b in batches if b[0] < 20 <= b[-1]) <= 4, batches
    trainer.train()
    assert last_plan(trainer.model) is not None
