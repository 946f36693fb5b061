"""Quantized KV cache for transformers: identity setting equals stock generate, window and packed parts hold what
they should, padding and beam reordering, bytes, errors, install/remove. Tiny random models of real architectures
(CPU, the kernels' reference path); the default model's 4-bit agreement is in ``test_kv_cache_default_model.py``."""

from __future__ import annotations

import itertools

import pytest
import torch

import longkit
from longkit import ConfigError, UnsupportedModelError
from longkit.config import KVCacheConfig, LMInfiniteConfig, MemoryConfig
from longkit.hf_patches import get_patches
from longkit.hf_patches.kv_cache import ATTN_KEY, QuantizedKVCache, QuantizedKVLayer
from longkit.kernels.kv_quant import KVQuantSpec, bytes_per_token, dequantize_kv
from longkit.kernels.kv_quant.naive import select_key_channels
from tests.utils import left_padded, tiny_model

MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]
G = 16  # tiny models have head dim 16: one group per token


def _identity(residual_length: int = 4) -> KVCacheConfig:
    return KVCacheConfig(key_bits=16, value_bits=16, rotate=False, group_size=G, residual_length=residual_length)


def _q4(residual_length: int = 4, **kw) -> KVCacheConfig:
    return KVCacheConfig(key_bits=4, value_bits=4, group_size=G, residual_length=residual_length, **kw)


def _generate(model, ids, mask=None, **kw):
    model.generation_config.eos_token_id = None  # every run generates max_new_tokens (a random token may be EOS)
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0, **kw}
    return model.generate(ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **kw)


def assert_same_greedy(ref, out, prompt_len: int, atol: float) -> None:
    """Greedy runs agree token for token and their logits within ``atol``, except that after an exact near-tie of the
    reference (top-2 logit gap below ``2·atol``, where a rounding difference may pick either) the runs may part."""
    steps = ref.sequences.shape[1] - prompt_len
    assert out.sequences.shape == ref.sequences.shape
    for t in range(steps):
        a, b = ref.logits[t], out.logits[t]
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
        differ = ref.sequences[:, prompt_len + t] != out.sequences[:, prompt_len + t]
        if differ.any():
            top2 = a[differ].topk(2, dim=-1).values
            gap = (top2[:, 0] - top2[:, 1]).max().item()
            assert gap < 2 * atol, f"step {t}: tokens differ although the reference's top-2 gap is {gap}"
            return


# --------------------------------------------------------------------------- config
_GRID = dict(key_bits=[2, 16, 5, True], value_bits=[3, 1], group_size=[32, 0], key_axis=["token", "channel"],
             rotate=[True, 1], qjl=[False, True], qjl_dim=[None, 32, 24], keep_channels=[1.0, 0.5, 0.0],
             seed=[0, -1])


def _accepts(cls, **kw) -> bool:
    try:
        cls(**kw)
    except ConfigError:
        return False
    return True


def test_config_accepts_what_the_kernel_spec_accepts():
    # Each option alone and every pair of options: the same verdict as KVQuantSpec (one rule set, two places).
    names = list(_GRID)
    cases = [{n: v} for n in names for v in _GRID[n]]
    cases += [{a: va, b: vb} for a, b in itertools.combinations(names, 2) for va in _GRID[a] for vb in _GRID[b]]
    for kw in cases:
        assert _accepts(KVCacheConfig, **kw) == _accepts(KVQuantSpec, **kw), kw
        if _accepts(KVCacheConfig, **kw):
            assert KVCacheConfig(**kw).spec() == KVQuantSpec(**kw)


def test_config_presets_and_residual_length():
    assert KVCacheConfig.identity(7).spec() == KVQuantSpec.identity()
    assert KVCacheConfig.kivi(3, 16, 8).spec() == KVQuantSpec.kivi(3, 16)
    assert KVCacheConfig.from_spec(KVQuantSpec(key_bits=2, qjl=True), residual_length=5) == KVCacheConfig(
        key_bits=2, qjl=True, residual_length=5)
    assert KVCacheConfig(residual_length=0).residual_length == 0
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="residual_length"):
            KVCacheConfig(residual_length=bad)
    with pytest.raises(ConfigError, match="from_spec needs a KVQuantSpec"):
        KVCacheConfig.from_spec(object())


def test_apply_patches_accepts_true_dict_and_config_and_rejects_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="group_size=32 must divide the head dim 16"):
        longkit.apply_patches(model, kv_cache=True)  # the default group of 32 does not fit head dim 16
    longkit.apply_patches(model, kv_cache={"group_size": 16, "key_bits": 3})
    assert get_patches(model).configs["kv_cache"] == KVCacheConfig(group_size=16, key_bits=3)
    with pytest.raises(ConfigError, match="key_bits"):
        longkit.apply_patches(model, kv_cache={"key_bits": 5})
    with pytest.raises(ConfigError, match="Valid options"):
        longkit.apply_patches(model, kv_cache={"bits": 4})
    odd = tiny_model("llama", hidden_size=192)  # head dim 48: no Hadamard rotation
    with pytest.raises(ConfigError, match="power-of-two head dim"):
        longkit.apply_patches(odd, kv_cache=_q4())


# --------------------------------------------------------------------------- identity setting == stock
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_identity_generate_equals_stock(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(1, model.config.vocab_size, (2, 11))
    ref = _generate(model, ids)
    longkit.apply_patches(model, kv_cache=_identity(residual_length=3))
    out = _generate(model, ids)
    cache = out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.packed_tokens() > 0  # the packed path was exercised
    # Raw 16-bit keys of an fp32 model are stored as fp16: logits agree to that rounding.
    assert_same_greedy(ref, out, ids.shape[1], atol=2e-4)


def test_identity_every_token_packed_and_chunked_prefill_equal_stock():
    model = tiny_model("qwen2")
    ids = torch.randint(1, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        longkit.apply_patches(model, kv_cache=_identity(residual_length=0))
        cache = QuantizedKVCache(model.config, _identity(residual_length=0))
        chunks = [model(ids[:, s:e], past_key_values=cache).logits for s, e in ((0, 7), (7, 8), (8, 20))]
    assert cache.packed_tokens() == 20 and cache.layers[0].keys.shape[2] == 0
    torch.testing.assert_close(torch.cat(chunks, 1), ref, atol=2e-4, rtol=0)


# --------------------------------------------------------------------------- the full-precision part
@pytest.mark.parametrize("tq", [1, 7])
def test_dense_attention_lse_matches_an_explicit_softmax(tq):
    from longkit.hf_patches.kv_cache.attention import dense_attention_lse

    B, Hq, Hkv, Tk, D = 2, 6, 2, 11, 16
    q, k, v = torch.randn(B, Hq, tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    visible = torch.rand(B, 1, tq, Tk) > 0.4
    visible[0, 0, 0] = False  # a query that sees nothing: out 0, lse -inf
    causal = torch.ones(tq, Tk, dtype=torch.bool).tril(Tk - tq)[None, None].expand(B, 1, tq, Tk)
    for mask, arg in ((visible, visible), (causal, None)):
        out, lse = dense_attention_lse(q, k, v, arg, 0.3)
        scores = 0.3 * q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)
        scores = scores.masked_fill(~mask, float("-inf"))
        want_lse = torch.logsumexp(scores, -1)
        want = torch.nan_to_num(torch.softmax(scores, -1)) @ v.repeat_interleave(Hq // Hkv, 1)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse).sum() == 0 and torch.isneginf(dense_attention_lse(q, k, v, visible, 0.3)[1][0, :, 0]).all()


# --------------------------------------------------------------------------- what the cache holds
@pytest.mark.parametrize("cfg", [_q4(residual_length=5), _q4(residual_length=5, qjl=True, rotate=False),
                                 KVCacheConfig.kivi(4, G, residual_length=5)], ids=["rot4", "qjl4", "kivi4"])
def test_prefill_window_is_exact_and_packed_part_is_the_quantized_rest(cfg):
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 37))
    ref_cache = __import__("transformers").DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ref_cache)
        longkit.apply_patches(model, kv_cache=cfg)
        cache = QuantizedKVCache(model.config, cfg)
        model(ids, past_key_values=cache)
    w = 5 if cfg.key_axis == "token" else 5 + (37 - 5) % G  # KIVI flushes whole groups of G tokens
    for layer, ref in zip(cache.layers, ref_cache.layers):
        assert layer.n_packed == 37 - w and layer.keys.shape[2] == w
        # The window holds the newest tokens bit for bit (one prefill: every layer saw full-precision attention).
        assert torch.equal(layer.keys, ref.keys[:, :, -w:]) and torch.equal(layer.values, ref.values[:, :, -w:])
        packed, _ = layer.packed_view()
        k, v = dequantize_kv(packed, layer.spec, layer.state)
        for got, want in ((k, ref.keys[:, :, :-w]), (v, ref.values[:, :, :-w])):
            err = (got - want).abs().max() / want.abs().max()
            assert 0 < err < 0.2, err  # quantized (not exact), at 4-bit precision


def test_window_stays_exact_through_decode_steps():
    # Layer 0's keys depend on the tokens only, so they must equal the stock cache's at every position, however the
    # deeper layers' quantized attention changed the generated tokens.
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 9))
    longkit.apply_patches(model, kv_cache=_q4(residual_length=6))
    out = _generate(model, ids, max_new_tokens=12)
    layer = out.past_key_values.layers[0]
    longkit.remove_patches(model)
    ref_cache = __import__("transformers").DynamicCache(config=model.config)
    with torch.no_grad():
        model(out.sequences[:, :-1], past_key_values=ref_cache)
    ref = ref_cache.layers[0]
    assert layer.n_seen == ref.keys.shape[2] == 20 and layer.keys.shape[2] == 6 and layer.n_packed == 14
    torch.testing.assert_close(layer.keys, ref.keys[:, :, -6:], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.values, ref.values[:, :, -6:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg", [KVCacheConfig(residual_length=4), KVCacheConfig(rotate=False, residual_length=4),
                                 KVCacheConfig(key_bits=2, value_bits=3, residual_length=4),
                                 KVCacheConfig.kivi(4, 32, residual_length=4),
                                 KVCacheConfig(key_bits=3, value_bits=3, group_size=64, codebook=True,
                                               residual_length=4)],
                         ids=["rot4", "norot4", "k2v3", "kivi4", "codebook3"])
def test_decode_attention_equals_dense_attention_over_the_dequantized_cache(cfg, monkeypatch):
    # Oracle for the split attention: per row, softmax over [dequantized packed tokens | real window tokens].
    from longkit.hf_patches.kv_cache import attention as attn

    model = tiny_model("llama", hidden_size=256)  # head dim 64
    lengths = [40, 40] if cfg.key_axis == "channel" else [40, 29]  # KIVI refuses padding
    ids, mask = left_padded(model.config.vocab_size, lengths)
    longkit.apply_patches(model, kv_cache=cfg)
    cache = QuantizedKVCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :36], attention_mask=mask[:, :36], past_key_values=cache)
    checked, original = [], attn._attend

    def spy(layer, module, q, k, v, mask4, scaling, kw):
        packed, lens = layer.packed_view()
        kd, vd = dequantize_kv(packed, layer.spec, layer.state)
        out = original(layer, module, q, k, v, mask4, scaling, kw)
        for b in range(q.shape[0]):
            n = packed.num_tokens if lens is None else int(lens[b])
            real = torch.ones(k.shape[2], dtype=torch.bool) if mask4 is None else mask4[b, 0, -1, -k.shape[2]:]
            keys = torch.cat([kd[b, :, :n], k[b][:, real].float()], 1)[None]
            vals = torch.cat([vd[b, :, :n], v[b][:, real].float()], 1)[None]
            ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].float(), keys, vals, scale=scaling,
                                                                   enable_gqa=True)
            torch.testing.assert_close(out[b:b + 1].transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
        checked.append(layer.layer_idx)
        return out

    monkeypatch.setattr(attn, "_attend", spy)
    with torch.no_grad():
        model(ids[:, 36:37], attention_mask=mask[:, :37], past_key_values=cache)
    assert checked == [0, 1]


@pytest.mark.parametrize("cfg", [_q4(residual_length=3), _q4(residual_length=3, qjl=True, qjl_dim=32),
                                 KVCacheConfig(key_bits=2, value_bits=3, group_size=8, residual_length=3),
                                 KVCacheConfig.kivi(2, G, residual_length=3),
                                 KVCacheConfig(key_bits=3, value_bits=3, group_size=16, codebook=True,
                                               residual_length=3)], ids=["q4", "qjl", "k2v3g8", "kivi2", "codebook3"])
def test_cache_bytes_are_bytes_per_token(cfg):
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (3, 10))
    longkit.apply_patches(model, kv_cache=cfg)
    out = _generate(model, ids, max_new_tokens=30)
    cache = out.past_key_values
    per = bytes_per_token(cfg.spec(), 16, model.config.num_key_value_heads)
    assert cache.bytes_per_token() == per
    # The same count written out from the format (spec.py): codes, fp16 scale + zero per group, QJL norm + bits.
    D, H, g, m = 16, model.config.num_key_value_heads, cfg.group_size, (cfg.qjl_dim or 16) if cfg.qjl else 0
    # key and value groups: scale + zero, 2 bytes each (KIVI's key groups span g tokens); the codebook: the scale only
    scales = (2 if cfg.codebook else 4) * D / g * 2
    assert per == H * (D * (cfg.key_bits + cfg.value_bits) / 8 + scales + (2 + m / 8 if cfg.qjl else 0))
    assert per < 4 * D * H / 2  # under half of a bf16 cache
    for layer in cache.layers:
        packed = layer.packed
        # generate() sized the buffer for the whole run: prompt + new tokens - the window, in whole groups.
        assert packed.num_tokens == -(-(10 + 30 - 3) // g) * g
        assert packed.nbytes() == per * packed.num_tokens * 3
        assert layer.memory()["packed_used"] == per * layer.n_packed * 3
        assert layer.memory()["window"] == 2 * layer.keys.numel() * 4  # fp32 model, keys + values


def test_packed_buffer_grows_when_the_run_is_longer_than_announced():
    model = tiny_model("llama")
    longkit.apply_patches(model, kv_cache=_q4(residual_length=2))
    cache = QuantizedKVCache(model.config, _q4(residual_length=2), max_cache_len=8)
    ids = torch.randint(1, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        first = model(ids[:, :20], past_key_values=cache)
        layer = cache.layers[1]
        cap, head = layer.packed.num_tokens, layer.packed.buffer[:, :, :18].clone()
        model(ids[:, 20:], past_key_values=cache)
    assert cap == 32 and layer.packed.num_tokens == 64 and layer.n_packed == 38
    assert torch.equal(layer.packed.buffer[:, :, :18], head)  # the old records were carried over
    assert torch.isfinite(first.logits).all()


# --------------------------------------------------------------------------- batches: padding, beams
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_left_padded_batch_equals_each_row_alone(model_type):
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = None
    lengths = [13, 6, 9]
    ids, mask = left_padded(model.config.vocab_size, lengths)
    longkit.apply_patches(model, kv_cache=_q4(residual_length=4, qjl=True, qjl_dim=16))
    out = _generate(model, ids, mask, max_new_tokens=12)
    assert out.past_key_values.layers[0].lengths is not None  # rows packed to different lengths
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        row = _generate(model, ids[b:b + 1, T - n:], max_new_tokens=12)
        assert_same_greedy(row, type(row)(sequences=out.sequences[b:b + 1, T - n:],
                                          logits=tuple(x[b:b + 1] for x in out.logits)), n, atol=1e-4)


def test_beam_search_reorders_the_packed_part():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, model.config.vocab_size, (2, 7))
    gen = dict(max_new_tokens=14, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
               return_dict_in_generate=True, pad_token_id=0)
    ref = model.generate(ids, **gen)
    longkit.apply_patches(model, kv_cache=_identity(residual_length=2))
    out = model.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-3, rtol=0)


def test_reorder_and_select_rows_move_every_part():
    model = tiny_model("llama")
    cfg = _q4(residual_length=3)
    longkit.apply_patches(model, kv_cache=cfg)
    ids, mask = left_padded(model.config.vocab_size, [12, 8, 10])
    cache = QuantizedKVCache(model.config, cfg)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    layer: QuantizedKVLayer = cache.layers[1]
    before = (layer.keys.clone(), layer.packed.buffer.clone(), layer.lengths.clone())
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    assert torch.equal(layer.keys, before[0][idx]) and torch.equal(layer.packed.buffer, before[1][idx])
    assert layer.lengths.tolist() == before[2][idx].tolist() == [7, 9, 9]
    cache.batch_select_indices(torch.tensor([0]))
    assert layer.keys.shape[0] == layer.packed.batch == layer.lengths.shape[0] == 1


def test_kivi_refuses_padding_but_runs_unpadded():
    model = tiny_model("llama")
    cfg = KVCacheConfig.kivi(2, G, residual_length=2)
    longkit.apply_patches(model, kv_cache=cfg)
    ids, mask = left_padded(model.config.vocab_size, [30, 12])
    with pytest.raises(NotImplementedError, match="key_axis='channel'.*padded batches"):
        _generate(model, ids, mask)
    out = _generate(model, ids[:1], max_new_tokens=20)
    layer = out.past_key_values.layers[0]
    assert layer.n_packed % G == 0 and 2 <= layer.keys.shape[2] < 2 + G


# --------------------------------------------------------------------------- ThinK calibration
def test_keep_channels_calibrates_from_the_prompt(monkeypatch):
    model = tiny_model("llama", hidden_size=128)  # head dim 32: keep 16 of 32 key channels
    cfg = KVCacheConfig(keep_channels=0.5, group_size=16, residual_length=2)
    seen = []
    original = QuantizedKVLayer.calibrate

    def spy(self, q, k, real):
        seen.append((self.layer_idx, q.clone(), k.clone(), None if real is None else real.clone()))
        return original(self, q, k, real)

    monkeypatch.setattr(QuantizedKVLayer, "calibrate", spy)
    ids, mask = left_padded(model.config.vocab_size, [10, 7])
    longkit.apply_patches(model, kv_cache=cfg)
    out = _generate(model, ids, mask, max_new_tokens=6)
    assert [s[0] for s in seen] == [0, 1]  # once per layer, at the prompt
    for (_, q, k, real), layer in zip(seen, out.past_key_values.layers):
        assert q.shape[2] == 10 and real.tolist() == mask.bool().tolist()
        w = real[:, None, :, None].float()
        want = select_key_channels(q * w, k * w, 16)  # ThinK on the real tokens only
        assert layer.state.key_channels.shape == (2, 16) and torch.equal(layer.state.key_channels, want)


# --------------------------------------------------------------------------- crop
def test_crop_inside_the_window_is_exact_and_below_it_shrinks_the_packed_part():
    model = tiny_model("llama")
    cfg = _q4(residual_length=6)
    longkit.apply_patches(model, kv_cache=cfg)
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    cache, short = QuantizedKVCache(model.config, cfg), QuantizedKVCache(model.config, cfg)
    with torch.no_grad():
        model(ids[:, :16], past_key_values=cache)  # packed 10, window 6
        model(ids[:, :16], past_key_values=short)
        model(ids[:, 16:18], past_key_values=cache)  # packed 12, window 6
    cache.crop(-2)  # back to 16 tokens: packed 12 stays, window 4
    layer = cache.layers[1]
    assert (cache.get_seq_length(), layer.n_packed, layer.keys.shape[2]) == (16, 12, 4)
    torch.testing.assert_close(layer.keys, short.layers[1].keys[:, :, 2:], atol=0, rtol=0)
    cache.crop(9)  # positive: the length to keep
    assert (cache.get_seq_length(), layer.n_packed, layer.keys.shape[2]) == (9, 9, 0)
    with torch.no_grad():
        again = model(ids[:, 9:12], past_key_values=cache).logits
    assert torch.isfinite(again).all() and cache.get_seq_length() == 12


# --------------------------------------------------------------------------- errors and refusals
def test_unsupported_models_and_combinations():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supports model types"):
        longkit.apply_patches(gpt2, kv_cache=_q4())
    windowed = tiny_model("mistral", sliding_window=32)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        longkit.apply_patches(windowed, kv_cache=_q4())
    lmi = tiny_model("llama")  # kv_cache stacks on lm_infinite (test_kv_cache_lm_infinite.py), not on memory blocks
    longkit.apply_patches(lmi, lm_infinite=LMInfiniteConfig(n_global=2, n_local=16),
                          memory=MemoryConfig(block_size=4, topk=2, chunk_size=8))
    with pytest.raises(NotImplementedError, match="'longkit_inf_memory' on top of lm_infinite"):
        longkit.apply_patches(lmi, kv_cache=_q4())


def test_generate_refuses_what_the_cache_cannot_serve(monkeypatch):
    from transformers import DynamicCache

    model = tiny_model("llama")
    longkit.apply_patches(model, kv_cache=_q4())
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with pytest.raises(ConfigError, match="got a DynamicCache"):
        model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
    with pytest.raises(ConfigError, match="drop cache_implementation='static'"):
        model.generate(ids, cache_implementation="static", max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="assisted/speculative"):
        model.generate(ids, assistant_model=tiny_model("llama"), max_new_tokens=2)
    from longkit.hf_patches.decode_graph import graphed_decode

    with graphed_decode(model), pytest.raises(NotImplementedError, match="CUDA-graph decode runner"):
        model.generate(ids, max_new_tokens=2)
    # use_cache=False: no cache at all, stock attention
    plain = model.generate(ids, max_new_tokens=3, use_cache=False, do_sample=False)
    assert plain.shape == (1, 9)


def test_quantized_cache_on_an_unpatched_model_fails_loudly():
    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    with pytest.raises(RuntimeError, match="did not run the kv_cache attention"):
        model.generate(ids, past_key_values=QuantizedKVCache(model.config, _q4()), max_new_tokens=3)
    with pytest.raises(ConfigError, match="group_size=32 must divide the head dim 16"):
        QuantizedKVCache(model.config, KVCacheConfig())
    with pytest.raises(ConfigError, match="kv_cache must be True, a dict"):
        QuantizedKVCache(model.config, 4)


def test_explicit_cache_is_used_as_given():
    model = tiny_model("llama")
    longkit.apply_patches(model, kv_cache=_q4())
    cache = QuantizedKVCache(model.config, _q4(residual_length=1))
    ids = torch.randint(1, model.config.vocab_size, (1, 6))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, return_dict_in_generate=True)
    assert out.past_key_values is cache and cache.packed_tokens() == 9


# --------------------------------------------------------------------------- install / remove
def test_apply_and_remove_restore_the_model_exactly():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    impl, modules = model.config._attn_implementation, dict(vars(model))
    longkit.apply_patches(model, kv_cache=_q4())
    assert model.config._attn_implementation == ATTN_KEY and "_prepare_cache_for_generation" in vars(model)
    assert get_patches(model).undo["kv_cache"]["touched"] == model.config.num_hidden_layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)  # no cache: stock attention
    longkit.remove_patches(model)
    assert model.config._attn_implementation == impl and set(vars(model)) == set(modules)
    assert not any(hasattr(m, "_longkit_kv_cache") for m in model.modules())
    out = model.generate(ids, max_new_tokens=2, return_dict_in_generate=True, do_sample=False)
    assert type(out.past_key_values) is DynamicCache
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
