"""LM-Infinite: reference math, equivalence with the unpatched model, bounded-cache generation, errors."""

from __future__ import annotations

import math

import pytest
import torch

import longkit
from longkit import ConfigError, HostVersionError, LMInfiniteConfig, UnsupportedModelError
from longkit.hf_patches import get_patches
from longkit.hf_patches.lm_infinite import LMInfiniteCache
from longkit.kernels.lambda_attn import LambdaPositions, chunked_lambda_attention, dense_lambda_attention
from longkit.kernels.rope import naive_rope_rotate
from tests.utils import left_padded, tiny_model

MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]


def _inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


# --------------------------------------------------------------------------- reference math
def test_rope_rotate_composes_and_inverts():
    x = torch.randn(2, 3, 7, 16)
    f = _inv_freq(16)
    a, b = torch.randint(-50, 50, (2, 7)), torch.randint(-50, 50, (2, 7))
    two = naive_rope_rotate(naive_rope_rotate(x, a, f), b, f)
    one = naive_rope_rotate(x, a + b, f)
    torch.testing.assert_close(two, one, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(naive_rope_rotate(one, -(a + b), f), x, atol=2e-5, rtol=1e-5)


def _brute_force_lambda(q_pre, k_pre, v, q_pos, k_pos, n_global, n_local, limit, inv_freq):
    """Independent oracle: rotate pre-RoPE vectors explicitly per pair (no re-rotation algebra)."""
    b, hq, tq, d = q_pre.shape
    g = hq // k_pre.shape[1]
    out = torch.zeros(b, hq, tq, d)
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                p = int(q_pos[bi, i])
                scores, vals = [], []
                for j in range(k_pre.shape[2]):
                    s = int(k_pos[bi, j])
                    if s < 0 or s > p:
                        continue
                    if p - s < n_local:
                        qp, ks = p, s
                    elif s < n_global:
                        qp, ks = limit, 0
                    else:
                        continue
                    qr = naive_rope_rotate(q_pre[bi, h, i][None, None, None], torch.tensor([qp]), inv_freq)
                    kr = naive_rope_rotate(k_pre[bi, h // g, j][None, None, None], torch.tensor([ks]), inv_freq)
                    scores.append((qr * kr).sum() / math.sqrt(d))
                    vals.append(v[bi, h // g, j])
                if scores:
                    w = torch.softmax(torch.stack(scores), 0)
                    out[bi, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("limit", [5, 1, 3, 11], ids=lambda x: f"limit{x}")  # 5 = n_local, the default
@pytest.mark.parametrize("left_pad", [0, 3], ids=["nopad", "leftpad3"])
def test_lambda_attention_matches_brute_force(left_pad, limit):
    b, hq, hkv, t, d = 2, 4, 2, 19, 8
    f = _inv_freq(d)
    q_pre, k_pre, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pos = torch.arange(t).repeat(b, 1)
    k_pos = pos.clone()
    k_pos[1, :left_pad] = -1
    k_pos[1, left_pad:] = torch.arange(t - left_pad)
    q_pos = k_pos.clamp(min=0)
    q = naive_rope_rotate(q_pre, q_pos, f)
    k = naive_rope_rotate(k_pre, q_pos, f)
    kw = dict(n_global=3, n_local=5, limit=limit, inv_freq=f)
    expect = _brute_force_lambda(q_pre, k_pre, v, q_pos, k_pos, **kw)
    got_dense = dense_lambda_attention(q, k, v, LambdaPositions(q_pos, k_pos), **kw)
    got_chunk = chunked_lambda_attention(q, k, v, LambdaPositions(q_pos, k_pos), chunk=4, **kw)
    valid = (k_pos >= 0)[:, None, :, None].expand_as(expect)
    torch.testing.assert_close(got_dense[valid], expect[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_chunk[valid], expect[valid], atol=1e-5, rtol=1e-4)


def test_lambda_attention_differs_from_causal_beyond_window():
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    pos = torch.arange(30)[None]
    lam = chunked_lambda_attention(q, k, v, LambdaPositions(pos, pos), n_global=2, n_local=6, limit=6,
                                   inv_freq=_inv_freq(8))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(lam[:, :, :6], full[:, :, :6], atol=1e-5, rtol=1e-4)
    assert (lam[:, :, 10:] - full[:, :, 10:]).abs().max() > 1e-2


# --------------------------------------------------------------------------- model equivalence
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_short_input_equals_unpatched(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
        longkit.apply_patches(model, lm_infinite=True)  # n_local = max_position_embeddings = 48 > 40
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_left_padding_equals_unpatched(model_type):
    model = tiny_model(model_type)
    ids, mask = left_padded(model.config.vocab_size, [30, 21, 9])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        longkit.apply_patches(model, lm_infinite=True)
        out = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def _dense_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """The same rule through the dense O(T^2) statement, registered as a second attention backend."""
    from longkit.hf_patches.lm_infinite.attention import _positions

    st = module._longkit_lm_infinite
    q_pos, k_pos, _ = _positions(query, key, attention_mask, kw.get("position_ids"), st.cfg.n_global)
    out = dense_lambda_attention(query, key, value, LambdaPositions(q_pos, k_pos), n_global=st.cfg.n_global,
                                 n_local=st.cfg.n_local, limit=st.cfg.limit_distance,
                                 inv_freq=st.rotary.inv_freq, scale=scaling)
    return out.transpose(1, 2), None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_beyond_window_matches_dense_reference_and_differs_from_vanilla(model_type, monkeypatch):
    from longkit.hf_patches.lm_infinite import attention as lmi

    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (1, 70))
    with torch.no_grad():
        vanilla = model(ids).logits
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=4, n_local=16, query_chunk=8))
        out = model(ids).logits
        monkeypatch.setattr(lmi, "chunked_lambda_attention",
                            lambda q, k, v, pos, chunk, **kw: dense_lambda_attention(q, k, v, pos, **kw))
        dense = model(ids).logits
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :16], vanilla[:, :16], atol=1e-5, rtol=1e-5)
    assert (out[:, 40:] - vanilla[:, 40:]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_cached_decoding_equals_full_forward(model_type):
    """Token-by-token decoding with the bounded cache gives the full-sequence LM-Infinite logits."""
    model = tiny_model(model_type)
    cfg = LMInfiniteConfig(n_global=3, n_local=10)
    longkit.apply_patches(model, lm_infinite=cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 36))
    cache = LMInfiniteCache(model.config.num_hidden_layers, cfg.n_global, cfg.n_local)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :12], past_key_values=cache).logits]  # chunked prefill, then decode
        for t in range(12, 36):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
            assert cache.stored_tokens() <= cfg.n_global + cfg.n_local
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 36


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bounded_generate_equals_full_cache_generate_with_left_padding(model_type):
    model = tiny_model(model_type)
    ids, mask = left_padded(model.config.vocab_size, [26, 17, 30])
    gen = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=12, bounded_cache=False))
    full = model.generate(ids, attention_mask=mask, **gen)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=12))
    seen = []
    orig = LMInfiniteCache.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        seen.append(self)

    LMInfiniteCache.__init__ = spy
    try:
        out = model.generate(ids, attention_mask=mask, **gen)
    finally:
        LMInfiniteCache.__init__ = orig
    assert len(seen) == 1, "generate() did not build the bounded LMInfiniteCache"
    assert seen[0].stored_tokens() <= 3 + 13 + 12  # n_global + max left padding + n_local
    assert torch.equal(out, full)


def test_full_cache_generate_equals_recomputed_forward():
    """Greedy tokens from cached generation are the argmax of a fresh full forward at every step."""
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=9))
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    out = model.generate(ids, max_new_tokens=15, do_sample=False)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[0, 19:].argmax(-1), out[0, 20:])


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "fullcache"])
def test_left_padded_generate_equals_recomputed_forward(bounded):
    """Every greedy token of a left-padded batch is the argmax of a fresh full forward (prefill path)."""
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=10, bounded_cache=bounded))
    ids, mask = left_padded(model.config.vocab_size, [24, 15, 9])
    model.generation_config.eos_token_id = None  # a random model may emit EOS; rows must not stop early
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(3, 20, dtype=mask.dtype)], dim=1)[:, :-1]
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(out[:, :-1], attention_mask=full_mask, position_ids=pos).logits
    t0 = ids.shape[1]
    assert torch.equal(logits[:, t0 - 1:].argmax(-1), out[:, t0:])


# --------------------------------------------------------------------------- API behaviour and errors
def test_apply_is_idempotent_reversible_and_context_managed():
    model = tiny_model("llama")
    assert longkit.apply_patches(model, lm_infinite=True) is model
    handle = get_patches(model)
    longkit.apply_patches(model, lm_infinite=True)
    assert get_patches(model) is handle and model.config._attn_implementation == "longkit_lm_infinite"
    assert "lm_infinite" in handle.summary()
    longkit.remove_patches(model)
    assert model.config._attn_implementation == "sdpa" and get_patches(model) is None
    assert "_prepare_cache_for_generation" not in vars(model)
    assert not hasattr(model.model.layers[0].self_attn, "_longkit_lm_infinite")
    with longkit.patched(model, lm_infinite={"n_global": 2, "n_local": 8}):
        assert model.config._attn_implementation == "longkit_lm_infinite"
        assert get_patches(model).configs["lm_infinite"].n_local == 8
    assert model.config._attn_implementation == "sdpa"


def test_errors_are_clear(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="unknown longkit feature"):
        longkit.apply_patches(model, lm_infinit=True)
    with pytest.raises(ConfigError, match="no feature"):
        longkit.apply_patches(model)
    with pytest.raises(ConfigError, match="n_local"):
        LMInfiniteConfig(n_local=0)
    with pytest.raises(ConfigError, match="Valid options"):
        longkit.apply_patches(model, lm_infinite={"window": 3})
    with pytest.raises(UnsupportedModelError, match="not a transformers model"):
        longkit.apply_patches(torch.nn.Linear(2, 2), lm_infinite=True)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="not 'gpt2'"):
        longkit.apply_patches(gpt2, lm_infinite=True)
    windowed = tiny_model("mistral", sliding_window=16)
    with pytest.raises(UnsupportedModelError, match="sliding window of 16"):
        longkit.apply_patches(windowed, lm_infinite=LMInfiniteConfig(n_local=32))
    dyn = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        longkit.apply_patches(dyn, lm_infinite=True)
    from longkit import _compat

    monkeypatch.setattr(_compat, "installed_version", lambda name: "4.57.0")
    lo, hi, _ = _compat.SUPPORTED["transformers"]
    with pytest.raises(HostVersionError, match=f"transformers {lo} <= version < {hi}, but 4.57.0"):
        longkit.apply_patches(model, lm_infinite=True)


def test_attention_key_without_apply_patches_and_packed_positions_raise():
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=True)
    other = tiny_model("llama")
    other.set_attn_implementation("longkit_lm_infinite")
    with pytest.raises(UnsupportedModelError, match="without longkit.apply_patches"):
        other(torch.randint(0, 96, (1, 5)))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(UnsupportedModelError, match="packed sequences"):
        model(torch.randint(0, 96, (1, 7)), position_ids=packed)


@pytest.mark.parametrize("limit", [None, 2, 13], ids=lambda x: f"limit{x}")  # None: n_local, the default
@pytest.mark.parametrize("layout", ["ring", "fullcache", "leftpad"])
def test_decode_fast_path_equals_reference(layout, limit):
    """The one-query path (fused SDPA with re-rotated sinks) equals the chunked reference, on CPU.

    ``ring``: the bounded cache after wrapping returns window keys in slot order (a rotation of position
    order); ``fullcache``: every key kept; ``leftpad``: row 1 starts with padding.
    """
    from longkit.hf_patches.lm_infinite.attention import _decode_path

    b, hq, hkv, d, n_g, n_local, length = 2, 4, 2, 16, 3, 8, 30
    f = _inv_freq(d)
    cfg = LMInfiniteConfig(n_global=n_g, n_local=n_local, limit_distance=limit).resolved(64)
    mask = None
    if layout == "ring":
        k_pos = torch.cat([torch.arange(n_g), torch.arange(length - n_local, length)]).repeat(b, 1)
    else:
        k_pos = torch.arange(length).repeat(b, 1)
    k = torch.randn(b, hkv, k_pos.shape[1], d)
    v = torch.randn(b, hkv, k_pos.shape[1], d)
    if layout == "leftpad":
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[1, :5] = False
        k_pos = torch.where(mask, mask.long().cumsum(-1) - 1, -1)
    q_pos = k_pos[:, -1:].clone()
    q = torch.randn(b, hq, 1, d)
    ref = chunked_lambda_attention(q, k, v, LambdaPositions(q_pos, k_pos), n_global=n_g, n_local=n_local,
                                   limit=cfg.limit_distance, inv_freq=f)
    if layout == "ring":  # slot order: the window rolled by a few slots
        roll = torch.cat([torch.arange(n_g), n_g + (torch.arange(n_local) + 3) % n_local])
        k, v = k[:, :, roll], v[:, :, roll]
    position_ids = q_pos if layout == "leftpad" else torch.full((1, 1), length - 1)
    got = _decode_path(q, k, v, mask, position_ids, cfg, f, None)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_chunked_path_without_fused_cpu_kernel_matches_dense(monkeypatch):
    """The fp32 fallback (used off-CPU, or where torch lacks the fused CPU kernel) computes the same."""
    from longkit.kernels.lambda_attn import naive

    monkeypatch.setattr(naive, "_CPU_FLASH", None)
    q, k, v = torch.randn(1, 4, 33, 8), torch.randn(1, 2, 33, 8), torch.randn(1, 2, 33, 8)
    pos = torch.arange(33)[None]
    kw = dict(n_global=2, n_local=7, limit=7, inv_freq=_inv_freq(8))
    got = chunked_lambda_attention(q, k, v, LambdaPositions(pos, pos), chunk=5, **kw)
    torch.testing.assert_close(got, dense_lambda_attention(q, k, v, LambdaPositions(pos, pos), **kw),
                               atol=1e-5, rtol=1e-4)
