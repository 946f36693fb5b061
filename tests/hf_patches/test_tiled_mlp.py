"""Tiled MLP (``longkit.hf_patches.tiled_mlp``): ``tiled_apply`` equals the untiled call (output, input gradient,
every parameter's gradient, under autocast too); a patched model's loss and gradients equal the stock model's (four
families, with and without gradient checkpointing, composed with activation offload and with LoRA adapters on the
MLP); autograd keeps only the MLP's input; uninstall restores the model; bad values and unsupported setups are
refused.

Tolerances: fp32, tiles of 1-7 tokens, so only the summation order of the weight gradients over tiles changes: the
output is bitwise equal per token (same GEMM rows), gradients within 1e-5 of their norm (measured ~1e-7).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longkit import apply_patches, remove_patches
from longkit.config import TiledMLPConfig
from longkit.errors import ConfigError, UnsupportedModelError
from longkit.hf_patches.tiled_mlp import config_of, install, tiled_apply, uninstall
from tests.utils import tiny_model

VOCAB = 96


class GatedMLP(nn.Module):
    def __init__(self, hidden: int = 16, inter: int = 40) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=True)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 100])
def test_tiled_apply_equals_untiled(chunk: int) -> None:
    mlp = GatedMLP()
    x = torch.randn(2, 12, 16, requires_grad=True)
    g = torch.randn(2, 12, 16)
    want = mlp(x)
    want_grads = _grads(mlp, x, want, g)
    got = tiled_apply(mlp.forward, x, list(mlp.parameters()), chunk)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(mlp, x, got, g), want_grads):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


def test_frozen_parameters_and_input_without_grad() -> None:
    mlp = GatedMLP()
    mlp.gate.weight.requires_grad_(False)
    x = torch.randn(9, 16)  # no grad on the input: only the trainable parameters get gradients
    params = [p for p in mlp.parameters() if p.requires_grad]
    tiled_apply(mlp.forward, x, params, 4).square().sum().backward()
    got = [p.grad.clone() for p in params]
    assert mlp.gate.weight.grad is None
    mlp.zero_grad(set_to_none=True)
    mlp(x).square().sum().backward()
    for a, p in zip(got, params):
        assert (a - p.grad).norm() <= 1e-5 * p.grad.norm()


def test_autocast_state_is_replayed_in_backward() -> None:
    mlp = GatedMLP()
    x = torch.randn(10, 16, requires_grad=True)
    g = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = mlp(x)
    want_grads = _grads(mlp, x, want.float(), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiled_apply(mlp.forward, x, list(mlp.parameters()), 3)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    for a, b in zip(_grads(mlp, x, got.float(), g), want_grads):
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


def test_only_the_input_is_saved() -> None:
    """Stock: autograd keeps gate/up/activation tensors of [tokens, inter]; tiled: the [tokens, hidden] input."""
    mlp = GatedMLP(hidden=16, inter=64)
    x = torch.randn(50, 16, requires_grad=True)

    def saved_bytes(fn) -> int:  # noqa: ANN001
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if not isinstance(t, nn.Parameter):
                total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    stock = saved_bytes(lambda: mlp(x))
    tiled = saved_bytes(lambda: tiled_apply(mlp.forward, x, list(mlp.parameters()), 8))
    assert tiled == x.numel() * x.element_size()
    assert stock >= 3 * 50 * 64 * 4


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b) -> None:  # noqa: ANN001
    (l0, g0), (l1, g1) = a, b
    assert abs(l1.item() - l0.item()) <= 2e-6 * abs(l0.item())
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g1[n] - g0[n]).norm() <= 1e-5 * g0[n].norm() + 1e-12, n


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_model_loss_and_grads_equal_stock(model_type: str, ckpt: bool) -> None:
    torch.manual_seed(0)
    model = tiny_model(model_type, vocab_size=VOCAB)
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, VOCAB, (2, 23))
    stock = loss_and_grads(model, ids)
    apply_patches(model, tiled_mlp=TiledMLPConfig(chunk_size=5))
    assert config_of(model) == TiledMLPConfig(chunk_size=5)
    assert_same(stock, loss_and_grads(model, ids))
    remove_patches(model)
    assert config_of(model) is None
    assert all("forward" not in vars(layer.mlp) for layer in model.model.layers)
    assert_same(stock, loss_and_grads(model, ids))


def test_composes_with_activation_offload_and_lora() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    base = tiny_model("llama", vocab_size=VOCAB)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj",
                                                                            "q_proj"], init_lora_weights=False))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, VOCAB, (2, 19))
    stock = loss_and_grads(model, ids)
    assert any("lora" in n for n in stock[1])
    with pytest.warns(UserWarning, match="CUDA is not available"):
        apply_patches(base, tiled_mlp={"chunk_size": 4}, activation_offload={"min_tensor_bytes": 0})
    assert_same(stock, loss_and_grads(model, ids))
    remove_patches(base)


def test_inference_and_short_inputs_run_the_stock_forward() -> None:
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    apply_patches(model, tiled_mlp=TiledMLPConfig(chunk_size=4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
    remove_patches(model)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="TiledMLPConfig.chunk_size must be an int >= 1, got 0"):
        TiledMLPConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="got '64' .str.; convert the string first"):
        TiledMLPConfig(chunk_size="64")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        tiled_apply(lambda t: t, torch.ones(2, 2), [], 0)
    model = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(TypeError, match="TiledMLPConfig"):
        install(model, {"chunk_size": 4})
    undo = install(model, TiledMLPConfig(chunk_size=4))
    with pytest.raises(UnsupportedModelError, match="already installed"):
        install(model, TiledMLPConfig(chunk_size=4))
    ids = torch.randint(0, VOCAB, (1, 9))
    model.model.layers[0].mlp.down_proj.weight.ds_id = 3  # what a ZeRO-3-partitioned parameter carries
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        model(input_ids=ids, labels=ids)
    del model.model.layers[0].mlp.down_proj.weight.ds_id
    model.model.layers[1].mlp.act_fn = nn.Sequential(nn.SiLU(), nn.Dropout(0.1))
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids, labels=ids)
    uninstall(model, undo)


def test_unsupported_model_is_refused() -> None:
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="tiled_mlp supports model types"):
        apply_patches(gpt2, tiled_mlp=True)
