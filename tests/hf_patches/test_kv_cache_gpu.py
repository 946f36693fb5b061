"""The quantized KV cache on CUDA (Triton quantize and decode kernels under generate()) against the CPU reference."""

from __future__ import annotations

import copy

import pytest
import torch

import longkit
from longkit.config import KVCacheConfig
from longkit.hf_patches.kv_cache import QuantizedKVCache
from longkit.kernels.kv_quant import dequantize_kv
from tests.utils import left_padded, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIGS = [KVCacheConfig(residual_length=4), KVCacheConfig(key_bits=3, value_bits=3, qjl=True, residual_length=4),
           KVCacheConfig(key_bits=2, value_bits=4, rotate=False, residual_length=4)]
IDS = ["rot4", "rot3-qjl", "k2v4-norot"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_decode_equals_dense_attention_over_the_dequantized_cache(cfg, monkeypatch):
    from longkit.hf_patches.kv_cache import attention as attn

    model = tiny_model("llama", hidden_size=256, dtype=torch.bfloat16).cuda()  # head dim 64
    ids, mask = left_padded(model.config.vocab_size, [70, 45])
    ids, mask = ids.cuda(), mask.cuda()
    longkit.apply_patches(model, kv_cache=cfg)
    cache = QuantizedKVCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :66], attention_mask=mask[:, :66], past_key_values=cache)
    checked, original = [], attn._attend

    def spy(layer, module, q, k, v, mask4, scaling, kw):
        packed, lens = layer.packed_view()
        kd, vd = dequantize_kv(packed, layer.spec, layer.state)
        out = original(layer, module, q, k, v, mask4, scaling, kw)
        for b in range(q.shape[0]):
            n = int(lens[b]) if lens is not None else packed.num_tokens
            real = mask4[b, 0, -1, -k.shape[2]:]
            keys = torch.cat([kd[b, :, :n], k[b][:, real].float()], 1)[None]
            vals = torch.cat([vd[b, :, :n], v[b][:, real].float()], 1)[None]
            ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].float(), keys, vals, scale=scaling,
                                                                   enable_gqa=True)
            # QJL adds an unbiased correction the dequantized keys do not hold: a looser bound there.
            assert _rel(out[b:b + 1].transpose(1, 2), ref) < (0.05 if cfg.qjl else 1e-2), (b, layer.layer_idx)
        checked.append(layer.layer_idx)
        return out

    monkeypatch.setattr(attn, "_attend", spy)
    with torch.no_grad():
        model(ids[:, 66:67], attention_mask=mask[:, :67], past_key_values=cache)
    assert checked == [0, 1]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_generate_matches_the_cpu_reference(cfg):
    # fp32 model: the Triton kernels against the PyTorch reference on the same weights and tokens (teacher-forced).
    cpu = tiny_model("qwen2", hidden_size=256)
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(1, cpu.config.vocab_size, (2, 40))
    longkit.apply_patches(cpu, kv_cache=cfg)
    longkit.apply_patches(gpu, kv_cache=cfg)
    logits = {}
    for name, model, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        cache = QuantizedKVCache(model.config, cfg)
        with torch.no_grad():
            steps = [model(ids[:, :30].to(dev), past_key_values=cache).logits[:, -1]]
            steps += [model(ids[:, t:t + 1].to(dev), past_key_values=cache).logits[:, -1] for t in range(30, 40)]
        logits[name] = torch.stack(steps).cpu()
    assert _rel(logits["cuda"], logits["cpu"]) < 2e-3


def test_cuda_identity_generate_equals_stock():
    model = tiny_model("llama", hidden_size=256, dtype=torch.float16).cuda()
    ids = torch.randint(1, model.config.vocab_size, (2, 12), device="cuda")
    gen = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref = model.generate(ids, **gen)
    longkit.apply_patches(model, kv_cache=KVCacheConfig.identity(residual_length=3))
    out = model.generate(ids, **gen)
    assert out.past_key_values.packed_tokens() > 0
    steps = len(ref.logits)
    for t in range(steps):  # equal until a near-tie of the reference (fp16 rounding may pick either token)
        assert _rel(out.logits[t], ref.logits[t]) < 1e-2, t
        differ = out.sequences[:, 12 + t] != ref.sequences[:, 12 + t]
        if differ.any():
            top2 = ref.logits[t][differ].float().topk(2, -1).values
            assert (top2[:, 0] - top2[:, 1]).max() < 2e-2, t
            break


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_cuda_lm_infinite_ring_matches_the_cpu_reference(cfg):
    # kv_cache on top of LM-Infinite: the ring written by the Triton quantize kernel one slot per step and read by
    # the decode kernel, against the PyTorch reference, teacher-forced far past the window (left-padded batch).
    from longkit import LMInfiniteConfig
    from longkit.hf_patches.kv_cache import BoundedQuantizedKVCache

    lm = LMInfiniteConfig(n_global=3, n_local=16)
    cpu = tiny_model("llama", hidden_size=256)
    gpu = copy.deepcopy(cpu).cuda()
    ids, mask = left_padded(cpu.config.vocab_size, [30, 21])
    for model in (cpu, gpu):
        longkit.apply_patches(model, lm_infinite=lm, kv_cache=cfg)
    full = torch.cat([ids, torch.randint(1, cpu.config.vocab_size, (2, 24))], 1)
    m = torch.cat([mask, torch.ones(2, 24, dtype=mask.dtype)], 1)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for name, model, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        cache = BoundedQuantizedKVCache(model.config, cfg, lm.n_global, lm.n_local, mask.to(dev))
        with torch.no_grad():
            steps = [model(full[:, :30].to(dev), attention_mask=m[:, :30].to(dev), position_ids=pos[:, :30].to(dev),
                           past_key_values=cache).logits[:, -1]]
            for t in range(30, 54):
                steps.append(model(full[:, t:t + 1].to(dev), attention_mask=m[:, :t + 1].to(dev),
                                   position_ids=pos[:, t:t + 1].to(dev), past_key_values=cache).logits[:, -1])
        logits[name] = torch.stack(steps).cpu()
    assert cache.packed_tokens() == 16 - 4 - 1
    assert _rel(logits["cuda"], logits["cpu"]) < 2e-3


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("lengths", [[26, 17, 30], [5, 3, 8]], ids=["window-full", "window-fills"])
def test_cuda_graph_quantized_ring_equals_static_and_eager(cfg, lengths):
    """lm_infinite(decode="cuda_graph") + kv_cache: the decode step (Triton quantize of the token leaving the window,
    Triton decode over the packed ring) is captured and replayed, and gives the tokens of the same cache run
    eagerly (decode="static") and of the host-driven bounded cache (decode="eager"), fp32."""
    from longkit import LMInfiniteConfig
    from longkit.hf_patches.kv_cache.bounded_static import StaticBoundedQuantizedKVCache

    model = tiny_model("llama", hidden_size=256).cuda()
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, lengths)
    ids, mask = ids.cuda(), mask.cuda()
    out = {}
    for decode in ("eager", "static", "cuda_graph"):
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=16, decode=decode), kv_cache=cfg)
        out[decode] = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
        if decode == "cuda_graph":
            stats = dict(model._longkit_graph_runner.stats)
        longkit.remove_patches(model)
    assert isinstance(out["cuda_graph"].past_key_values, StaticBoundedQuantizedKVCache)
    phases = 1 if min(lengths) + 1 >= 3 + 4 + 1 else 2
    assert stats["captures"] == phases and stats["replays"] == 39 - phases, stats
    assert torch.equal(out["cuda_graph"].sequences, out["static"].sequences)
    torch.testing.assert_close(torch.stack(out["cuda_graph"].scores), torch.stack(out["static"].scores), atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(out["static"].sequences, out["eager"].sequences)
    torch.testing.assert_close(torch.stack(out["static"].scores), torch.stack(out["eager"].scores), atol=1e-4,
                               rtol=1e-4)
