"""Tiled LM-head loss (``longkit.hf_patches.tiled_loss``): the patched forward's loss and every parameter's gradient
equal the stock model's with labels (llama, qwen2, qwen3, mistral; tied and untied embeddings; padding labels,
left padding, ``num_items_in_batch``, ``shift_labels``, ``ignore_index``, ``logits_to_keep``), a call without labels is
the stock forward, uninstall restores the model, and unsupported models and options are refused.

Tolerances: fp32 models, small tiles (5-7 tokens), so the loss and the LM-head GEMMs sum in another order than the
stock full-logits path: loss within 2e-6 relative, each gradient within 1e-5 of its norm (measured ~1e-7). bf16:
loss within 1e-3 relative, gradients within 2e-2 of their norm (bf16 rounding of the gradients).
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

from longkit.errors import ConfigError, UnsupportedModelError
from longkit.hf_patches.tiled_loss import TiledLossConfig, config_of, install, uninstall
from tests.utils import left_padded, tiny_model

VOCAB = 96
MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]


def right_padded_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and labels (-100 on padding and on a random prompt prefix) for right-padded rows."""
    t = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), t))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, : lengths[0] // 2] = -100  # a prompt that does not count
    return ids, mask, labels


def loss_and_grads(model: nn.Module, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = out["loss"] if isinstance(out, dict) else out[0]
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(stock, patched, loss_rtol: float = 2e-6, grad_rtol: float = 1e-5) -> None:  # noqa: ANN001
    (l0, g0), (l1, g1) = stock, patched
    assert torch.isfinite(l1)
    assert abs(l1.item() - l0.item()) <= loss_rtol * abs(l0.item()), (l0.item(), l1.item())
    assert g0.keys() == g1.keys(), sorted(set(g0) ^ set(g1))
    for name in g0:
        err = (g1[name].double() - g0[name].double()).norm().item()
        assert err <= grad_rtol * g0[name].double().norm().item() + 1e-12, (name, err, g0[name].norm().item())


def compare(model: nn.Module, chunk: int = 5, **inputs) -> None:
    """Stock loss + gradients, then the same with the patch installed (and uninstalled afterwards)."""
    stock = loss_and_grads(model, **inputs)
    undo = install(model, TiledLossConfig(chunk_size=chunk))
    try:
        patched = loss_and_grads(model, **inputs)
    finally:
        uninstall(model, undo)
    assert_same(stock, patched)


# ----------------------------------------------------------------------------- equals the stock loss
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_loss_and_gradients_equal_stock(model_type: str, tied: bool) -> None:
    model = tiny_model(model_type, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask, labels = right_padded_batch([23, 17, 9])
    compare(model, input_ids=ids, attention_mask=mask, labels=labels)


def test_left_padding_and_num_items_in_batch() -> None:
    """Trainer's gradient-accumulation form: the summed loss over ``num_items_in_batch`` (a tensor)."""
    model = tiny_model("qwen2")
    ids, mask = left_padded(VOCAB, [19, 12, 6])
    labels = ids.masked_fill(mask == 0, -100)
    n = torch.tensor(int((labels[:, 1:] != -100).sum()) * 2 + 3)
    compare(model, chunk=7, input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n)


def test_shift_labels_and_ignore_index() -> None:
    """``shift_labels`` is used as given (not shifted again); ``ignore_index`` pads and masks as in ForCausalLMLoss."""
    model = tiny_model("llama")
    ids, mask, labels = right_padded_batch([14, 11])
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, 3] = -100
    compare(model, input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    own = labels.masked_fill(labels == -100, -1)
    compare(model, input_ids=ids, attention_mask=mask, labels=own, ignore_index=-1)


def test_logits_to_keep_with_matching_labels() -> None:
    model = tiny_model("qwen3")
    ids, mask, labels = right_padded_batch([16, 16])
    compare(model, input_ids=ids, attention_mask=mask, labels=labels[:, -6:], logits_to_keep=6)
    undo = install(model, TiledLossConfig(chunk_size=4))
    try:
        with pytest.raises(ValueError, match=r"labels give 32 targets but the LM head scores 12 positions"):
            model(input_ids=ids, labels=labels, logits_to_keep=6)
    finally:
        uninstall(model, undo)


def test_positional_arguments_and_tuple_output() -> None:
    model = tiny_model("mistral")
    ids, mask, labels = right_padded_batch([12, 8])
    stock = model(ids, mask, labels=labels, return_dict=False)
    undo = install(model, TiledLossConfig(chunk_size=3))
    out = model(ids, mask, None, None, None, labels, return_dict=False)
    uninstall(model, undo)
    assert isinstance(out, tuple) and len(out) == len(stock) - 1  # the logits are left out
    torch.testing.assert_close(out[0], stock[0], rtol=2e-6, atol=0)


def test_output_has_no_logits_and_keeps_the_rest() -> None:
    model = tiny_model("llama")
    ids, mask, labels = right_padded_batch([10, 7])
    stock = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=True)
    undo = install(model, TiledLossConfig())
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True, use_cache=True)
    uninstall(model, undo)
    assert out.logits is None and stock.logits is not None
    assert len(out.hidden_states) == len(stock.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], stock.hidden_states[-1])
    assert out.past_key_values is not None


def test_bf16_model_close_to_stock() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask, labels = right_padded_batch([30, 21, 25])
    stock = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    undo = install(model, TiledLossConfig(chunk_size=16))
    patched = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    uninstall(model, undo)
    assert_same(stock, patched, loss_rtol=1e-3, grad_rtol=2e-2)


# ----------------------------------------------------------------------------- other calls, uninstall
def test_call_without_labels_is_the_stock_forward() -> None:
    model = tiny_model("qwen2")
    ids, mask = left_padded(VOCAB, [9, 5])
    stock = model(input_ids=ids, attention_mask=mask).logits
    stock_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    undo = install(model, TiledLossConfig(chunk_size=4))
    assert config_of(model) == TiledLossConfig(chunk_size=4)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, stock)
    # shift_labels alone: the stock forward computes no loss either, and returns the logits
    only_shift = model(input_ids=ids, attention_mask=mask, shift_labels=ids)
    assert only_shift.loss is None and torch.equal(only_shift.logits, stock)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uninstall(model, undo)
    assert torch.equal(gen, stock_gen)


def test_uninstall_restores() -> None:
    model = tiny_model("llama")
    undo = install(model, TiledLossConfig())
    assert "forward" in vars(model) and undo["touched"] == 1
    uninstall(model, undo)
    assert "forward" not in vars(model) and config_of(model) is None
    ids, mask, labels = right_padded_batch([8, 6])
    assert model(input_ids=ids, labels=labels).logits is not None
    # an instance forward someone set before is put back
    mine = model.forward
    model.forward = mine
    undo = install(model, TiledLossConfig())
    uninstall(model, undo)
    assert vars(model)["forward"] is mine


def test_trainer_step_equals_stock() -> None:
    """Two HF Trainer steps (SGD, gradient accumulation 2, so ``num_items_in_batch`` is passed): same losses and
    weights as the stock model."""
    from transformers import Trainer, TrainingArguments

    base = tiny_model("llama").train()
    ids, mask, labels = right_padded_batch([12, 9, 15, 7, 15, 11, 4, 13])  # one width: the default collator stacks
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(ids))]

    def train(model: nn.Module) -> tuple[list[float], dict[str, torch.Tensor]]:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                     max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                     dataloader_drop_last=True, seed=0, disable_tqdm=True)
            trainer = Trainer(model=model, args=args, train_dataset=rows)
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    stock_losses, stock_params = train(copy.deepcopy(base))
    patched = copy.deepcopy(base)
    undo = install(patched, TiledLossConfig(chunk_size=5))
    losses, params = train(patched)
    uninstall(patched, undo)
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(stock_losses), rtol=1e-5, atol=0)
    for name, p in stock_params.items():
        moved = (stock_params[name] - base.state_dict()[name]).norm().item()
        err = (params[name] - p).norm().item()
        # floor: each weight may differ by one float32 rounding of its own value (a weight near 1.0 moved 1e-3)
        floor = 2 * torch.finfo(torch.float32).eps * p.norm().item()
        assert err <= 1e-4 * moved + floor, (name, err, moved, floor)


# ----------------------------------------------------------------------------- refused
def test_config_validation() -> None:
    assert TiledLossConfig().chunk_size == 4096
    with pytest.raises(ConfigError, match=r"TiledLossConfig.chunk_size must be an int >= 1, got 0"):
        TiledLossConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="a bool is not a number"):
        TiledLossConfig(chunk_size=True)
    with pytest.raises(TypeError, match="cfg must be a TiledLossConfig"):
        install(tiny_model("llama"), {"chunk_size": 8})


def test_refuses_unsupported_models() -> None:
    import transformers

    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="not a causal LM"):
        install(model.model, TiledLossConfig())
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    with pytest.raises(UnsupportedModelError, match="not a causal LM"):
        install(transformers.LlamaForSequenceClassification(cfg), TiledLossConfig())
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="supports model types"):
        install(gpt2, TiledLossConfig())
    capped = tiny_model("llama", final_logit_softcapping=30.0)
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping=30.0"):
        install(capped, TiledLossConfig())
    custom = tiny_model("llama")
    custom.loss_function = lambda **kw: torch.tensor(0.0)
    with pytest.raises(UnsupportedModelError, match="custom loss"):
        install(custom, TiledLossConfig())


def test_refuses_double_install_and_replaced_head() -> None:
    model = tiny_model("llama", tie_word_embeddings=False)
    undo = install(model, TiledLossConfig())
    with pytest.raises(UnsupportedModelError, match="already installed"):
        install(model, TiledLossConfig())
    ids, mask, labels = right_padded_batch([8, 6])
    model.lm_head = nn.Sequential(model.lm_head)  # what a wrapper (LoRA, quantisation) looks like to us
    with pytest.raises(UnsupportedModelError, match="not a plain nn.Linear"):
        model(input_ids=ids, labels=labels)
    model.lm_head = model.lm_head[0]
    model.lm_head.weight.ds_id = 3  # a ZeRO-3 partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        model(input_ids=ids, labels=labels)
    del model.lm_head.weight.ds_id
    uninstall(model, undo)
