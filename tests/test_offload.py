"""Activation offload (``longkit.offload``): the same loss and gradients as without it, on tiny HF models with
and without gradient checkpointing and on plain PyTorch models; host buffers reused across steps; parameters never
offloaded; hooks removed exactly; clear errors.

Offload only moves saved tensors to host memory and back, so the loss is bitwise equal and the gradients are equal
up to 1e-6 of the largest gradient (bitwise on CPU in practice; a tolerance because a kernel may pick another code
path for the re-allocated, differently aligned copy). On a machine without CUDA the hooks run the same code path
with plain host copies (and warn); on a CUDA machine the same tests run on the GPU with streams and pinned memory.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from longkit.config import ActivationOffloadConfig
from longkit.errors import ConfigError, UnsupportedModelError
from longkit.offload import (
    NO_CUDA_WARNING,
    ActivationOffloader,
    find_decoder_layers,
    get_offloader,
    install,
    offload_activations,
    uninstall,
)
from tests.utils import TINY, tiny_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B, T = 2, 24


@pytest.fixture(autouse=True)
def _quiet_cpu_warning():
    # The CPU warning is tested once (test_cpu_path_warns_once); elsewhere it would only be noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="longkit activation offload: CUDA is not available")
        yield


def _model(model_type: str = "llama", ckpt: bool = False, **overrides) -> nn.Module:
    model = tiny_model(model_type, **overrides).to(DEVICE).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batch(vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), device=DEVICE)


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref: tuple, got: tuple) -> None:
    (ref_loss, ref_grads), (loss, grads) = ref, got
    assert torch.equal(ref_loss, loss), (ref_loss.item(), loss.item())
    assert sorted(ref_grads) == sorted(grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= 1e-6 * scale, (name, err, scale)


def _pair(**model_kwargs) -> tuple[nn.Module, nn.Module]:
    model = _model(**model_kwargs)
    return model, copy.deepcopy(model)


# ------------------------------------------------------------------------------------------ equivalence, HF models
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_loss_and_every_gradient_equal(model_type: str, ckpt: bool) -> None:
    ref_model, model = _pair(model_type=model_type, ckpt=ckpt)
    ids = _batch()
    off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=1024))
    for _ in range(2):  # the second step runs on reused buffers
        _assert_same(_step(ref_model, ids), _step(model, ids))
    s = off.stats()
    hidden = B * T * TINY["hidden_size"] * 4
    if ckpt:
        # With checkpointing a layer saves only its input (checkpointing recomputes the rest): that is what moves.
        assert s["bytes_offloaded_by_layer"] == {0: hidden, 1: hidden}, s
    else:
        assert sorted(s["bytes_offloaded_by_layer"]) == [0, 1] and s["tensors_offloaded_last_forward"] > 10, s
        assert all(b > 5 * hidden for b in s["bytes_offloaded_by_layer"].values()), s
    assert s["bytes_reloaded_total"] == s["bytes_offloaded_total"] == 2 * s["bytes_offloaded_last_forward"]
    assert s["pool_bytes_in_use"] == 0  # every buffer came back after the backward


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_gpu_fraction_keeps_the_last_layers(ckpt: bool) -> None:
    ref_model, model = _pair(ckpt=ckpt, num_hidden_layers=4)
    ids = _batch()
    ref = _step(ref_model, ids)
    with offload_activations(model, gpu_fraction=0.5, min_tensor_bytes=0) as off:
        _assert_same(ref, _step(model, ids))
        s = off.stats()
    assert s["layers"] == 4 and s["layers_on_device"] == 2
    assert sorted(s["bytes_offloaded_by_layer"]) == [0, 1] and s["bytes_kept_last_forward"] > 0, s
    with offload_activations(model, gpu_fraction=1.0, min_tensor_bytes=0) as off:
        _assert_same(ref, _step(model, ids))
        assert off.stats()["bytes_offloaded_last_forward"] == 0


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_on_and_off(prefetch: bool) -> None:
    ref_model, model = _pair(num_hidden_layers=3)
    ids = _batch()
    with offload_activations(model, prefetch=prefetch, min_tensor_bytes=0) as off:
        _assert_same(_step(ref_model, ids), _step(model, ids))
        s = off.stats()
    # With prefetch, layers 1 and 0 are brought back while the backward is one layer later.
    if prefetch:
        by_layer = s["bytes_offloaded_by_layer"]
        assert s["bytes_prefetched_total"] == by_layer[0] + by_layer[1], s
    else:
        assert s["bytes_prefetched_total"] == 0, s


def test_buffers_are_reused_across_steps() -> None:
    """Five SGD steps (weights change, shapes do not): buffers are allocated in step 1 only, every buffer is back in
    the pool after each backward, and the losses follow the run without offload."""
    ref_model, model = _pair(ckpt=False)
    off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref_model, model)]
    pools = []
    for _ in range(5):
        ids = _batch()
        ref, got = _step(ref_model, ids), _step(model, ids)
        _assert_same(ref, got)
        for opt in opts:
            opt.step()
        s = off.stats()
        assert s["pool_bytes_in_use"] == 0, s
        pools.append((s["pool_buffers"], s["pool_bytes"], s["buffers_allocated"], s["peak_pool_bytes"]))
    assert pools[0][0] > 0 and len(set(pools)) == 1, pools
    assert off.stats()["forwards"] == 5


def test_two_forwards_then_one_backward_and_retain_graph() -> None:
    """Gradient accumulation inside one graph (two micro-batches, one backward) and a backward run twice."""
    ref_model, model = _pair(ckpt=False)
    a, b = _batch(), _batch()
    off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    grads = []
    for m in (ref_model, model):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=a, labels=a).loss + m(input_ids=b, labels=b).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    scale = max(g.abs().max().item() for g in grads[0].values())
    assert all((grads[0][n] - grads[1][n]).abs().max().item() <= 1e-6 * scale for n in grads[0])
    assert off.stats()["pool_bytes_in_use"] == 0


def test_peft_lora_model() -> None:
    """Layers found through the PEFT wrapper; frozen base weights (saved as views of parameters) stay put."""
    peft = pytest.importorskip("peft")
    base = _model(ckpt=True)
    base.enable_input_require_grads()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    ref_model = peft.get_peft_model(base, lora)
    model = copy.deepcopy(ref_model)
    ids = _batch()
    with offload_activations(model, min_tensor_bytes=0) as off:
        assert off.layers_path.endswith("model.layers") and len(off.layers) == TINY["num_hidden_layers"]
        _assert_same(_step(ref_model, ids), _step(model, ids))
        assert off.stats()["bytes_offloaded_last_forward"] > 0


def test_hf_trainer_with_offload(tmp_path) -> None:
    """HF Trainer on a model with offload installed: the same weights after three SGD steps."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": torch.randint(0, TINY["vocab_size"], (T,))} for _ in range(6)]

    def collate(items):
        ids = torch.stack([it["input_ids"] for it in items])
        return {"input_ids": ids, "labels": ids.clone()}

    ref_model, model = _pair(ckpt=True)
    offloader = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    params = []
    for i, m in enumerate((ref_model, model)):
        args = TrainingArguments(output_dir=str(tmp_path / str(i)), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", use_cpu=not CUDA,
                                 report_to=[], save_strategy="no", seed=3, data_seed=3,
                                 gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": False})
        Trainer(model=m, args=args, train_dataset=data, data_collator=collate).train()
        params.append([p.detach().clone() for p in m.parameters()])
    assert offloader.stats()["forwards"] == 3 and offloader.stats()["bytes_offloaded_total"] > 0
    assert max((a - b).abs().max().item() for a, b in zip(*params)) <= 1e-6


# ------------------------------------------------------------------------------------------ plain PyTorch models
class _Block(nn.Module):
    def __init__(self, d: int, inplace: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5, requires_grad=False)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.q(x) + self.k(x) + self.v(x))  # the three linears save (views of) the same x
        if self.inplace:
            h.mul_(2)  # sigmoid saved h: autograd forbids this
        return x + h * self.scale.detach()  # saves a tensor sharing the (frozen) parameter's storage


class _Toy(nn.Module):
    def __init__(self, d: int = 16, n: int = 3, inplace: bool = False):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList([_Block(d, inplace) for _ in range(n)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).sum()


def _toy_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_plain_pytorch_model_and_deduplication() -> None:
    ref_model = _Toy().to(DEVICE)
    model = copy.deepcopy(ref_model)
    x = torch.randn(2, 5, 16, device=DEVICE)
    with offload_activations(model, min_tensor_bytes=0) as off:
        assert off.backbone is model and off.layers is model.blocks
        copied = []
        copy_out = off._copy_out
        off._copy_out = lambda t, g: copied.append(t) or copy_out(t, g)
        _assert_same(_toy_step(ref_model, x), _toy_step(model, x))
    # Per block: x once (saved by q, k and v), the linears' sum (sigmoid's input is not saved), sigmoid's output h;
    # the embedding's input is saved before block 0 and goes with it. The frozen `scale` (saved through a
    # detached alias of the parameter) is never copied.
    assert off.stats()["tensors_offloaded_last_forward"] == 1 + 2 * 3, off.stats()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert copied and not any(t.untyped_storage().data_ptr() in params for t in copied)


def test_parameters_never_offloaded() -> None:
    """Tied embeddings, frozen weights (their transposes are saved) and trainable ones: no parameter storage is ever
    copied, whatever the size threshold."""
    ref_model, model = _pair(ckpt=False, tie_word_embeddings=True)
    for m in (ref_model, model):
        for name, p in m.named_parameters():
            if "mlp" in name or "k_proj" in name:
                p.requires_grad_(False)
    off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    seen, copied = [], []
    is_param, copy_out = off._is_parameter, off._copy_out
    off._is_parameter = lambda t, g: seen.append(t) or is_param(t, g)
    off._copy_out = lambda t, g: copied.append(t) or copy_out(t, g)
    ids = _batch()
    _assert_same(_step(ref_model, ids), _step(model, ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert any(t.untyped_storage().data_ptr() in params for t in seen)  # parameters' views were offered ...
    assert copied and not any(t.untyped_storage().data_ptr() in params for t in copied)  # ... and none was copied


def test_inplace_change_of_a_saved_tensor_raises() -> None:
    x = torch.randn(2, 5, 16, device=DEVICE)
    model = _Toy(inplace=True).to(DEVICE)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).backward()  # autograd itself, in backward
    with offload_activations(model, min_tensor_bytes=0):
        with pytest.raises(RuntimeError, match="decoder layer 0 was modified by an inplace operation"):
            model(x)  # with offload: at the end of the layer that saved it


def test_forward_error_leaves_no_hooks_behind() -> None:
    ref_model, model = _pair()
    off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
    fail = model.model.layers[1].register_forward_pre_hook(lambda m, a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(input_ids=_batch(), labels=_batch())
    fail.remove()
    calls = []
    pack = off._pack
    off._pack = lambda t: calls.append(t) or pack(t)
    a = torch.randn(4, 4, requires_grad=True)
    (a * a).sum().backward()  # outside the model: no longkit hook may see this
    assert calls == []
    ids = _batch()
    _assert_same(_step(ref_model, ids), _step(model, ids))


# ------------------------------------------------------------------------------------------ install / uninstall
def _hook_counts(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def test_install_uninstall_restore_the_model() -> None:
    model = _model(ckpt=True)
    before = _hook_counts(model)
    undo = install(model, ActivationOffloadConfig())
    assert undo["touched"] == TINY["num_hidden_layers"] and get_offloader(model) is undo["offloader"]
    assert _hook_counts(model) != before
    uninstall(model, undo)
    assert _hook_counts(model) == before and get_offloader(model) is None
    assert not any(k.startswith("_longkit") for k in vars(model))
    forwards = undo["offloader"].stats()["forwards"]
    _step(model, _batch())
    assert undo["offloader"].stats()["forwards"] == forwards
    with ActivationOffloader(model) as off:  # a context manager too; installable again after removal
        assert get_offloader(model) is off
    assert get_offloader(model) is None and _hook_counts(model) == before


def test_find_decoder_layers() -> None:
    model = tiny_model("qwen3")
    backbone, layers, path = find_decoder_layers(model)
    assert backbone is model.model and layers is model.model.layers and path == "model.layers"
    assert find_decoder_layers(model, layers=model.model.layers)[0] is model.model


@pytest.mark.skipif(CUDA, reason="the no-CUDA path")
def test_cpu_path_warns_once() -> None:
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = ActivationOffloader(model, ActivationOffloadConfig(min_tensor_bytes=0))
        _step(model, _batch())
    assert [str(w.message) for w in caught] == [NO_CUDA_WARNING]
    assert "no effect on memory" in NO_CUDA_WARNING
    s = off.stats()
    assert s["device"] == "cpu" and s["pinned"] is False and s["bytes_offloaded_last_forward"] > 0


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, message", [
    ({"min_tensor_bytes": -1}, "ActivationOffloadConfig.min_tensor_bytes must be an int >= 0"),
    ({"min_tensor_bytes": 1.5}, "min_tensor_bytes must be an int >= 0 (bytes; e.g. 1048576 for 1 MiB), got 1.5"),
    ({"min_tensor_bytes": True}, "min_tensor_bytes must be an int >= 0 (bytes; e.g. 1048576 for 1 MiB), got True"),
    ({"min_tensor_bytes": "1024"}, "got '1024' (str); convert the string first"),
    ({"gpu_fraction": 1.5}, "ActivationOffloadConfig.gpu_fraction must be a number in [0.0, 1.0], got 1.5"),
    ({"gpu_fraction": -0.1}, "gpu_fraction must be a number in [0.0, 1.0], got -0.1"),
    ({"gpu_fraction": float("nan")}, "NaN and infinities are not accepted"),
    ({"gpu_fraction": True}, "a bool is not a number here"),
    ({"gpu_fraction": "0.5"}, "gpu_fraction must be a number in [0.0, 1.0], got '0.5' (str)"),
    ({"prefetch": "yes"}, "ActivationOffloadConfig.prefetch must be true or false, got 'yes' (str)"),
    ({"pin_memory": 1}, "ActivationOffloadConfig.pin_memory must be true or false, got 1 (int)"),
    ({"enabled": None}, "ActivationOffloadConfig.enabled must be true or false, got None"),
])
def test_bad_config_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        ActivationOffloadConfig(**kwargs)
    assert message in str(e.value)


def test_config_normalises_and_counts_kept_layers() -> None:
    import numpy as np

    cfg = ActivationOffloadConfig(min_tensor_bytes=np.int64(4096), gpu_fraction=0)
    assert cfg == ActivationOffloadConfig(min_tensor_bytes=4096, gpu_fraction=0.0)
    assert type(cfg.min_tensor_bytes) is int and type(cfg.gpu_fraction) is float
    assert [ActivationOffloadConfig(gpu_fraction=f).kept_layers(16) for f in (0, 0.1, 0.25, 0.5, 1)] == [0, 2, 4, 8, 16]
    assert ActivationOffloadConfig(gpu_fraction=0.5).kept_layers(3) == 2  # half up


def test_bad_uses_raise_clear_errors() -> None:
    model = _model()
    with pytest.raises(ConfigError, match=r"enabled=False\) asks for no offload"):
        ActivationOffloader(model, ActivationOffloadConfig(enabled=False))
    with pytest.raises(ConfigError, match="config must be an ActivationOffloadConfig, got dict"):
        ActivationOffloader(model, {"gpu_fraction": 0.5})
    with pytest.raises(ConfigError, match="either config=ActivationOffloadConfig"):
        with offload_activations(model, ActivationOffloadConfig(), gpu_fraction=0.5):
            pass
    with pytest.raises(TypeError, match="gpu_frac"):
        with offload_activations(model, gpu_frac=0.5):
            pass
    off = ActivationOffloader(model)
    with pytest.raises(ConfigError, match="already installed on this model"):
        ActivationOffloader(model)
    off.remove()
    with pytest.raises(UnsupportedModelError, match="found no nn.ModuleList of decoder layers"):
        ActivationOffloader(nn.Linear(4, 4))
    two = nn.Module()
    two.a, two.b = nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.ReLU()])
    with pytest.raises(ConfigError, match=r"several lists of layers .*\['a', 'b'\]; pass layers="):
        ActivationOffloader(two)
    assert ActivationOffloader(two, layers=two.b).layers is two.b
    with pytest.raises(ConfigError, match="layers is not a submodule of the model"):
        find_decoder_layers(model, layers=nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(ConfigError, match="layers must be a non-empty nn.ModuleList"):
        find_decoder_layers(model, layers=list(model.model.layers))
    with pytest.raises(ConfigError, match="needs an nn.Module"):
        find_decoder_layers("model")


def test_autocast_weight_copies_stay() -> None:
    """Under autocast a linear saves (the transpose of) a cached low-precision copy of its weight: a weight too."""
    model = _Toy().to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    with offload_activations(model, min_tensor_bytes=0) as off:
        copied = []
        copy_out = off._copy_out
        off._copy_out = lambda t, g: copied.append(t) or copy_out(t, g)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(x)
        loss.backward()
    assert copied and all(t.shape != (16, 16) for t in copied), [tuple(t.shape) for t in copied]


# ------------------------------------------------------------------------------------------ benchmark, GPU tier
def test_benchmark_dry_run(tmp_path) -> None:
    """benchmarks/offload.py on CPU at toy size: every method trains every length, the same loss at each length
    (lr 0: same weights), and longkit reports the bytes it offloaded."""
    import importlib
    import json
    import math

    bench = importlib.import_module("benchmarks.offload")
    path = bench.main(["--dry-run", "--max-len", "64", "--out-dir", str(tmp_path)])
    assert path == tmp_path / "offload_cpu_dry_run.json"
    result = json.loads(path.read_text())
    rows = {(r["method"], r["seq"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in bench.METHODS for s in (32, 64)}
    for (method, seq), r in rows.items():
        assert "error" not in r and math.isfinite(r["tok_s"]) and r["tok_s"] > 0, r
        assert r["loss"] == rows["plain", seq]["loss"], (method, seq)
        assert (r["host_gib"] is not None) == (method in ("save_on_cpu", "alst", "longkit", "longkit_tiled")), r
    assert rows["longkit", 64]["host_gib"] > rows["longkit", 32]["host_gib"] > 0
    assert [s["max_len"] for s in result["summary"]] == [64] * len(bench.METHODS)
    assert result["bandwidth"]["d2h_gbs"] > 0 and result["env"]["torch"]
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--gpu-fraction", "2", "--out-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_offload_lowers_peak_memory_and_pins() -> None:
    """bf16, gradient checkpointing, 8 layers: with offload the checkpointed inputs live in pinned host memory, so the
    peak is lower by most of them (all but the ~2 layers being recomputed / prefetched), and the loss is the same.

    The shape makes activations dominate: the peak must be at the first recompute of the backward (every layer
    input alive), not at its end (every weight gradient alive, most inputs already freed), where offload changes
    nothing. At hidden 1024 / 8k tokens (16 MiB per layer input, 150 MB of weight gradients) both peaks were equal
    to the byte on an H100, as when the peak falls where offload has nothing left to save."""
    hidden, layers, seq = 512, 8, 32768
    model = tiny_model("llama", dtype=torch.bfloat16, hidden_size=hidden, intermediate_size=1024,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, vocab_size=256,
                       max_position_embeddings=seq).cuda().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (1, seq), device="cuda")

    def peak_and_loss() -> tuple[int, float]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = model.model(input_ids=ids).last_hidden_state.float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), loss.item()

    peak_ckpt, loss_ckpt = peak_and_loss()
    with offload_activations(model) as off:
        peak_and_loss()  # first step: pool allocation
        peak_off, loss_off = peak_and_loss()
        s = off.stats()
    layer_bytes = seq * hidden * 2
    assert s["pinned"] and s["bytes_offloaded_by_layer"] == dict.fromkeys(range(layers), layer_bytes), s
    assert loss_off == loss_ckpt
    assert peak_off <= peak_ckpt - (layers - 3) * layer_bytes, (peak_ckpt, peak_off, layer_bytes)


def test_nothing_outlives_the_backward_without_gc() -> None:
    """Every saved-tensor handle is freed by reference counting alone once the backward has run: none waits for
    the cyclic garbage collector (that would keep device memory across steps)."""
    import gc

    from longkit.offload.activation import _Saved

    for ckpt in (False, True):
        model = _model(ckpt=ckpt)
        with offload_activations(model, min_tensor_bytes=0, gpu_fraction=0.5) as off:
            gc.collect()
            gc.disable()
            try:
                _step(model, _batch())
                alive = [o for o in gc.get_objects() if type(o) is _Saved]
            finally:
                gc.enable()
            assert alive == [] and off.stats()["pool_bytes_in_use"] == 0, (ckpt, len(alive))
