"""LASP-2 pieces that need no process group: config, the summary combine, the per-layer forwards against
transformers' own, install/uninstall, and the errors for unsupported models."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch

from longkit.deepspeed_ext import SequenceParallelConfig, parse_ds_config
from longkit.errors import ConfigError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from lasp2_worker import _loop_decay, _loop_delta, tiny_linear_model  # noqa: E402


# ------------------------------------------------------------------------------------------------ config
def test_modes_parse_and_resolve_to_the_lasp2_adapter():
    from longkit.deepspeed_ext import lasp2
    from longkit.deepspeed_ext.adapters import sp_adapter

    for mode in ("lasp2", "auto"):
        section = {"longkit": {"sequence_parallel": {"mode": mode, "size": 4, "attention": "kernel"}}}
        assert parse_ds_config(section).sequence_parallel == SequenceParallelConfig(mode, 4, "kernel")
        assert sp_adapter(mode) is lasp2
    assert SequenceParallelConfig().mode == "ulysses"  # the default is unchanged


@pytest.mark.parametrize("section, words", [
    ({"mode": "lasp"}, "longkit.sequence_parallel.mode must be one of ['ulysses', 'lasp2', 'auto'], got 'lasp'"),
    ({"mode": "LASP2"}, "must be one of ['ulysses', 'lasp2', 'auto']"),
    ({"mode": "lasp2", "size": 0}, "longkit.sequence_parallel.size must be a positive integer, got 0"),
    ({"mode": "lasp2", "chunk_size": 64}, "unknown key(s) ['chunk_size']"),
    ({"mode": "auto", "attention": "flash"}, "must be one of ['auto', 'kernel', 'sdpa']"),
])
def test_config_errors(section, words):
    with pytest.raises(ConfigError) as e:
        parse_ds_config({"longkit": {"sequence_parallel": section}})
    assert words in str(e.value)


def test_config_constructed_directly():
    with pytest.raises(ConfigError, match=r"SequenceParallelConfig.mode must be one of \['ulysses', 'lasp2', 'auto'\]"):
        SequenceParallelConfig(mode=2)


# ------------------------------------------------------------------------------------------------ combine
@pytest.mark.parametrize("kind", ["decay", "delta"])
@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_combined_summaries_equal_one_sequential_run(kind, chunks):
    """Folding the summaries of chunks 0..n-1 gives the state one long recurrence reaches after them."""
    from longkit.deepspeed_ext.lasp2_core import combine_decay, combine_transition
    from longkit.kernels import linear_attn as la

    B, H, D, L = 2, 3, 8, 11  # chunk length 11: not a multiple of the kernels' block
    q, k, v = (torch.randn(B, H, chunks * L, D) for _ in range(3))
    if kind == "decay":
        log_decay = -torch.rand(H) * 0.3
        _, want = _loop_decay(q, k, v, log_decay, 1.0)
        parts = []
        for c in range(chunks):
            state, total = la.linear_attention_summary(k[:, :, c * L:(c + 1) * L], v[:, :, c * L:(c + 1) * L],
                                                       log_decay)
            parts.append(torch.cat([state.reshape(B, H, -1), total.reshape(B, H, 1)], -1).reshape(-1))
        got = combine_decay(torch.stack(parts), B, H, D, D)
    else:
        k = torch.nn.functional.normalize(k, dim=-1)
        g, beta = -torch.rand(B, H, chunks * L) * 0.2, torch.rand(B, H, chunks * L)
        _, want = _loop_delta(q, k, v, g, beta, 1.0)
        parts = []
        for c in range(chunks):
            sl = slice(c * L, (c + 1) * L)
            state, trans = la.gated_delta_summary(k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl])
            parts.append(torch.cat([state.reshape(B, H, -1), trans.reshape(B, H, -1)], -1).reshape(-1))
        got = combine_transition(torch.stack(parts), B, H, D, D)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    empty = combine_decay if kind == "decay" else combine_transition
    assert empty(torch.zeros(0, 7), B, H, D, D).abs().sum() == 0  # rank 0: no earlier chunk, zero state


def test_combine_gradients():
    from longkit.deepspeed_ext.lasp2_core import combine_decay, combine_transition

    B, H, D = 1, 2, 3
    x = torch.randn(3, B * H * (D * D + 1), dtype=torch.float64) * 0.3
    assert torch.autograd.gradcheck(lambda p: combine_decay(p, B, H, D, D), (x.requires_grad_(),))
    y = torch.randn(3, B * H * (2 * D * D), dtype=torch.float64) * 0.3
    assert torch.autograd.gradcheck(lambda p: combine_transition(p, B, H, D, D), (y.requires_grad_(),))


# ------------------------------------------------------------------------------------------------ layer forwards
def _patch_one_process(model):
    """Every linear layer on LASP-2's forward with a one-rank group (no communication)."""
    from longkit.deepspeed_ext.lasp2 import lasp2_layers
    from longkit.deepspeed_ext.lasp2_comm import LASP2Comm
    from longkit.deepspeed_ext.lasp2_models import LINEAR_LAYER_FORWARDS, STATE_ATTR, LinearLayerState

    linear, _ = lasp2_layers(model)
    for m in linear:
        setattr(m, STATE_ATTR, LinearLayerState(LASP2Comm(None, 0, 1)))
        m.forward = types.MethodType(LINEAR_LAYER_FORWARDS[type(m).__name__], m)
    return linear


@pytest.mark.parametrize("kind", ["minimax", "qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_layer_forwards_match_transformers(kind):
    """LASP-2's forward of each linear layer type computes what transformers' forward computes (logits, loss and
    every gradient, with left padding), to twice transformers' own fp32 error against fp64."""
    model = tiny_linear_model(kind)
    ids = torch.randint(3, 128, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :9] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "use_cache": False}

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(**batch)
        out.loss.backward()
        return out.logits.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}

    ref64 = run(copy.deepcopy(model).double())
    ref32 = run(model)
    patched = copy.deepcopy(model)
    assert len(_patch_one_process(patched)) == 2
    got = run(patched)
    for part, (r64, r32, g) in {"logits": (ref64[0], ref32[0], got[0])}.items():
        assert (g - r64).abs().max() <= 2 * (r32 - r64).abs().max() + 1e-6 * r64.abs().max(), part
    scale = max(t.abs().max() for t in ref64[1].values())
    err32 = max((ref32[1][n] - ref64[1][n]).abs().max() for n in ref64[1])
    err = max((got[1][n] - ref64[1][n]).abs().max() for n in ref64[1])
    assert err <= 2 * err32 + 2e-5 * scale, (err, err32, scale)


def test_short_shard_for_the_convolution_raises():
    from longkit.deepspeed_ext.lasp2_comm import LASP2Comm
    from longkit.deepspeed_ext.lasp2_models import _causal_conv

    model = tiny_linear_model("qwen3_next")
    layer = model.model.layers[0].linear_attn
    with pytest.raises(ConfigError, match="at least 3 tokens"):
        _causal_conv(layer, torch.randn(1, layer.conv_dim, 2), LASP2Comm(None, 1, 2))


# ------------------------------------------------------------------------------------------------ install
def test_install_and_uninstall_touch_only_this_instance():
    from longkit.deepspeed_ext import lasp2

    model = tiny_linear_model("qwen3_next")
    other = tiny_linear_model("qwen3_next")
    impl = model.config._attn_implementation
    undo = lasp2.install(model, None, 0, 2, SequenceParallelConfig("lasp2", 2))
    assert undo["touched"] == 4 and model.config._attn_implementation == "longkit_ulysses"
    linear = [m for m in model.modules() if type(m).__name__ == "Qwen3NextGatedDeltaNet"]
    assert all("forward" in m.__dict__ for m in linear)
    assert not any("forward" in m.__dict__ for m in other.modules())
    assert lasp2.comm_stats(model).totals == {}
    lasp2.uninstall(model, undo)
    assert model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ or hasattr(m, "_longkit_lasp2") for m in model.modules())
    with pytest.raises(ValueError, match="not prepared for LASP-2"):
        lasp2.comm_stats(model)


def test_auto_mode_on_a_softmax_only_model_is_ulysses():
    from longkit.deepspeed_ext import lasp2

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    undo = lasp2.install(llama, None, 0, 2, SequenceParallelConfig("auto", 2))
    assert undo["delegate"] == "ulysses" and llama.config._attn_implementation == "longkit_ulysses"
    lasp2.uninstall(llama, undo)
    with pytest.raises(UnsupportedModelError, match="no linear-attention layers.*use mode 'ulysses'"):
        lasp2.install(llama, None, 0, 2, SequenceParallelConfig("lasp2", 2))


def _mamba2():
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16, n_groups=1))


def _lfm2():
    return transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


def _kimi():
    return transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=2, num_experts_per_tok=1, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, linear_head_dim=16, linear_num_heads=4,
        layer_types=["linear_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("mode", ["lasp2", "auto"])
@pytest.mark.parametrize("build, exc, words", [
    (_mamba2, UnsupportedModelError, "LASP-2 supports model types ['kimi_linear', 'minimax', 'qwen3_5_moe_text', "
                                     "'qwen3_5_text', 'qwen3_next']; 'mamba2' is a linear-attention / state-space "
                                     "model (layer types ['linear_attention'])"),
    (_lfm2, UnsupportedModelError, "'lfm2' is a linear-attention / state-space model without a LASP-2 adapter"),
    (lambda: tiny_linear_model("minimax", output_router_logits=True), NotImplementedError,
     "output_router_logits=True"),
    (lambda: tiny_linear_model("minimax", sliding_window=16), UnsupportedModelError, "sliding window of 16"),
])
def test_unsupported_models_raise(build, exc, words, mode):
    from longkit.deepspeed_ext import lasp2

    model = build()
    with pytest.raises(exc) as e:
        lasp2.install(model, None, 0, 2, SequenceParallelConfig(mode, 2))
    assert words in str(e.value)
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing half-installed


def test_kimi_without_its_host_function_raises(monkeypatch):
    """Kimi-Linear's LASP-2 forward calls transformers' own chunk_kimi_delta_attention: a release without it is
    refused at install, naming the function, with nothing half-installed."""
    from transformers.models.kimi_linear import modeling_kimi_linear

    from longkit.deepspeed_ext import lasp2

    model = _kimi()
    monkeypatch.delattr(modeling_kimi_linear, "chunk_kimi_delta_attention")
    with pytest.raises(UnsupportedModelError, match="has no chunk_kimi_delta_attention"):
        lasp2.install(model, None, 0, 2, SequenceParallelConfig("lasp2", 2))
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_comm_stats_summaries():
    from longkit.deepspeed_ext.lasp2_comm import CommStats

    s = CommStats()
    for rec in [(0, "all_gather", "forward", 10), (0, "reduce_scatter", "backward", 20),
                (2, "all_gather", "forward", 10), (-1, "all_gather", "forward", 5), (0, "all_gather", "forward", 10)]:
        s.record(*rec)
    assert s.per_layer() == {0: {"forward": 20, "backward": 20}, 2: {"forward": 10, "backward": 0}}
    assert s.calls()[(0, "all_gather", "forward")] == 2
    s.reset()
    assert s.totals == {} and s.per_layer() == {}
