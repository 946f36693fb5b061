"""kv_cache on top of LM-Infinite: the bounded cache whose older window tokens are packed (``bounded.py``)."""

from __future__ import annotations

import math

import pytest
import torch

import longkit
from longkit import ConfigError, LMInfiniteConfig
from longkit.config import KVCacheConfig
from longkit.hf_patches.kv_cache import BoundedQuantizedKVCache, QuantizedKVCache
from longkit.hf_patches.kv_cache.bounded import BOUNDED_ATTN_KEY, _decode
from longkit.hf_patches.lm_infinite.attention import ATTN_KEY as LMI_KEY
from longkit.kernels.kv_quant import KVQuantState, dequantize_kv, quantize_kv
from longkit.kernels.kv_quant.naive import select_key_channels
from longkit.kernels.rope import naive_rope_rotate
from tests.hf_patches.test_kv_cache import _generate, _identity, _q4, assert_same_greedy
from tests.utils import left_padded, tiny_model

MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]
LM = LMInfiniteConfig(n_global=3, n_local=16)  # tiny models are pretrained for 48 positions


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_identity_setting_equals_lm_infinite_generate(model_type):
    """16-bit, no rotation: the ring stores keys unchanged, so tokens and logits equal LM-Infinite's own cache far
    past the window (and past the pretraining length)."""
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, model.config.vocab_size, (2, 30))
    longkit.apply_patches(model, lm_infinite=LM)
    ref = _generate(model, ids, max_new_tokens=30)
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=_identity(residual_length=4))
    assert model.config._attn_implementation == BOUNDED_ATTN_KEY
    out = _generate(model, ids, max_new_tokens=30)
    cache = out.past_key_values
    assert isinstance(cache, BoundedQuantizedKVCache)
    assert cache.packed_tokens() == 16 - 4 - 1  # the ring is full: its tokens were read from packed records
    assert_same_greedy(ref, out, ids.shape[1], atol=2e-4)
    longkit.remove_patches(model)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_memory_is_bounded_whatever_the_length(decode):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=16, decode=decode),
                          kv_cache=_q4(residual_length=4))
    sizes = []
    for new in (8, 40):
        out = _generate(model, torch.randint(1, 96, (1, 20)), max_new_tokens=new)
        mem = out.past_key_values.memory()
        sizes.append((mem["packed_allocated"], mem["window"]))
        assert out.past_key_values.get_seq_length() == 20 + new - 1
    assert sizes[0] == sizes[1]  # 27 vs 59 tokens: the same bytes
    layer = out.past_key_values.layers[0]
    if decode == "eager":
        assert layer.packed.num_tokens == 11 and layer.keys.shape[2] == 4 and layer.sink_keys.shape[2] == 3
    else:  # the static layout: [raw sinks | rotated sinks | window of 5] and 11 packed slots + a spare one
        assert layer.packed.num_tokens == 12 and layer.keys.shape[2] == 2 * 3 + 5


def _oracle(q, p, stored, lm, inv_freq, scale):
    """Attention of one query at position ``p`` over LM-Infinite's keys, one by one (``stored[s] = (k, v)``)."""
    scores, values = [], []
    for s, (k, v) in stored.items():
        if s > p or (s >= lm.n_global and p - s >= lm.n_local):
            continue
        if s < lm.n_global and p - s >= lm.n_local:  # LM-Infinite's global branch: distance limit
            k = naive_rope_rotate(k[None, :, None], torch.tensor([[p - lm.limit_distance - s]]), inv_freq)[0, :, 0]
        g = q.shape[0] // k.shape[0]
        scores.append((q.float() * k.float().repeat_interleave(g, 0)).sum(-1) * scale)  # [Hq]
        values.append(v.float().repeat_interleave(g, 0))
    w = torch.softmax(torch.stack(scores, -1), -1)  # [Hq, n]
    return (w[..., None] * torch.stack(values, 1)).sum(1)  # [Hq, D]


# (QJL adds a score correction a dequantized key does not carry: the padded-batch test covers it.)
@pytest.mark.parametrize("cfg", [_q4(residual_length=3), _q4(residual_length=0, rotate=False),
                                 KVCacheConfig(key_bits=2, value_bits=3, group_size=8, residual_length=5),
                                 KVCacheConfig(key_bits=3, value_bits=3, group_size=16, codebook=True,
                                               residual_length=3)],
                         ids=["q4", "q4_norot_r0", "k2v3g8", "codebook3"])
def test_decode_step_equals_a_per_key_oracle(cfg):
    """Each decode step equals attention over sinks (distance-limited), ring and window computed key by key, with
    every ring token's key and value replaced by its own quantize -> dequantize round trip."""
    torch.manual_seed(0)
    lm = LMInfiniteConfig(n_global=2, n_local=12, limit_distance=12)
    b, hq, hkv, d = 2, 4, 2, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    scale = 1 / math.sqrt(d)
    pad = [0, 3]
    mask = torch.ones(b, 10, dtype=torch.long)
    mask[1, :3] = 0
    cache = BoundedQuantizedKVCache(tiny_model("llama").config, cfg, lm.n_global, lm.n_local, mask)
    layer = cache.layers[0]
    k0, v0 = torch.randn(b, hkv, 10, d), torch.randn(b, hkv, 10, d)
    layer.update(k0, v0)
    layer.flush_prompt(k0, v0)
    exact = [{c - pad[r]: (k0[r, :, c], v0[r, :, c]) for c in range(pad[r], 10)} for r in range(b)]
    seen = 10
    for _ in range(25):
        k1, v1 = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
        q = torch.randn(b, hq, 1, d)
        layer.update(k1, v1)
        for r in range(b):
            exact[r][seen - pad[r]] = (k1[r, :, 0], v1[r, :, 0])
        out = _decode(layer, q, lm.n_local, lm.limit_distance, inv_freq, scale)
        layer.flush_step()
        seen += 1
        for r in range(b):
            p = seen - 1 - pad[r]
            stored = {}
            for s, (k, v) in exact[r].items():
                in_window = p - s < layer.residual_length + 1
                if s >= lm.n_global and not in_window:  # a ring token: its quantized round trip
                    one = quantize_kv(k[None, :, None], v[None, :, None], cfg.spec(), layer.state)
                    kq, vq = dequantize_kv(one, cfg.spec(), layer.state)
                    k, v = kq[0, :, 0], vq[0, :, 0]
                stored[s] = (k, v)
            want = _oracle(q[r, :, 0], p, stored, lm, inv_freq, scale)
            torch.testing.assert_close(out[r, :, 0].float(), want, atol=1e-4, rtol=1e-4)
    assert int(layer.lengths.max()) == layer.ring == 12 - cfg.residual_length - 1


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None
    lengths = [26, 9, 17]
    ids, mask = left_padded(model.config.vocab_size, lengths)
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=_q4(residual_length=4, qjl=True, qjl_dim=16))
    out = _generate(model, ids, mask, max_new_tokens=20)
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        row = _generate(model, ids[b:b + 1, T - n:], max_new_tokens=20)
        assert_same_greedy(row, type(row)(sequences=out.sequences[b:b + 1, T - n:],
                                          logits=tuple(x[b:b + 1] for x in out.logits)), n, atol=1e-4)


def test_keep_channels_calibrates_from_the_prompt(monkeypatch):
    """ThinK: the kept key channels are chosen once per layer from the prompt's real tokens, then the ring stores
    only those."""
    model = tiny_model("llama", hidden_size=128)  # head dim 32: keep 16 of 32 key channels
    model.generation_config.eos_token_id = None
    seen = []
    original = KVQuantState.calibrate

    def spy(self, q, k):
        seen.append((q.clone(), k.clone()))
        return original(self, q, k)

    monkeypatch.setattr(KVQuantState, "calibrate", spy)
    ids, mask = left_padded(model.config.vocab_size, [24, 15])
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=KVCacheConfig(keep_channels=0.5, group_size=16,
                                                                        residual_length=4))
    out = _generate(model, ids, mask, max_new_tokens=6)
    assert len(seen) == 2  # once per layer, at the prompt
    real = mask.bool()[:, None, :, None].float()
    for (q, k), layer in zip(seen, out.past_key_values.layers):
        assert q.shape[2] == 24
        masked_k = k * real
        want = select_key_channels(q * real, masked_k, 16)
        assert layer.state.key_channels.shape == (2, 16) and torch.equal(layer.state.key_channels, want)
    assert out.past_key_values.packed_tokens() > 0


def test_apply_order_remove_and_errors():
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=_q4())
    longkit.remove_patches(model)
    assert model.config._attn_implementation == "sdpa" and "_prepare_cache_for_generation" not in vars(model)
    with longkit.patched(model, lm_infinite=LM, kv_cache=_q4()):
        assert model.config._attn_implementation == BOUNDED_ATTN_KEY
    assert model.config._attn_implementation == "sdpa" and "_prepare_cache_for_generation" not in vars(model)
    assert not any(hasattr(m, "_longkit_lm_infinite") or hasattr(m, "_longkit_kv_cache") for m in model.modules())
    # kv_cache removed alone gives LM-Infinite back
    with longkit.patched(model, lm_infinite=LM):
        with longkit.patched(model, kv_cache=_q4()):
            assert model.config._attn_implementation == BOUNDED_ATTN_KEY
        assert model.config._attn_implementation == LMI_KEY
        out = _generate(model, torch.randint(1, 96, (1, 20)), max_new_tokens=3)
        assert not isinstance(out.past_key_values, (QuantizedKVCache, BoundedQuantizedKVCache))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="residual_length<=14"):
        longkit.apply_patches(model, lm_infinite=LM, kv_cache=_q4(residual_length=15))
    longkit.remove_patches(model)
    with pytest.raises(NotImplementedError, match="KIVI"):
        longkit.apply_patches(model, lm_infinite=LM, kv_cache=KVCacheConfig.kivi(4, group_size=16, residual_length=4))
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="bounded_cache=True"):
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_local=16, bounded_cache=False), kv_cache=_q4())
    longkit.remove_patches(model)


def test_generation_modes_the_ring_cannot_serve():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=_q4())
    ids = torch.randint(1, 96, (1, 20))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(ConfigError, match="BoundedQuantizedKVCache"):
        model.generate(ids, max_new_tokens=3, past_key_values=QuantizedKVCache(model.config, _q4()))
    cache = BoundedQuantizedKVCache(model.config, _q4(), LM.n_global, 16)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(NotImplementedError, match="one token per forward"):
            model(ids[:, :2], past_key_values=cache)
    longkit.remove_patches(model)


def test_reapplying_lm_infinite_keeps_kv_cache_on_top_and_wrong_order_is_refused():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LM, kv_cache=_q4())
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=20))  # new options underneath
    assert model.config._attn_implementation == BOUNDED_ATTN_KEY
    out = _generate(model, torch.randint(1, 96, (1, 30)), max_new_tokens=4)
    assert out.past_key_values.n_local == 20 and out.past_key_values.layers[0].ring == 20 - 4 - 1
    longkit.remove_patches(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="lm_infinite must be applied before"):
        longkit.apply_patches(model, kv_cache=_q4(), lm_infinite=LM)
    longkit.remove_patches(model)
    assert model.config._attn_implementation == "sdpa"
