"""kv_cache on top of LM-Infinite with ``decode="static" | "cuda_graph"``: the fixed-buffer quantized bounded cache
(``bounded_static.py``), on CPU.

* it gives the logits of the host-driven :class:`BoundedQuantizedKVCache` (same tokens kept, same records), teacher
  forced across ring wrap-around, left padding and short prompts, and generate()'s tokens at the identity setting;
* its decode step is capture-safe: the instrumented runner of ``test_lm_infinite_static.py`` records every aten op
  of the "captured" step and of each replay (no host read of the device, identical op sequences, no tensor from
  outside the step). On CPU the packed part runs the kernels' PyTorch reference; the Triton path is captured for
  real by the GPU test.
"""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit import ConfigError, LMInfiniteConfig, UnsupportedModelError
from longkit.config import KVCacheConfig
from longkit.hf_patches.decode_graph import install_runner
from longkit.hf_patches.kv_cache import BoundedQuantizedKVCache
from longkit.hf_patches.kv_cache.bounded_static import StaticBoundedQuantizedKVCache
from longkit.hf_patches.lm_infinite import patch as lmi
from longkit.hf_patches.lm_infinite.static_cache import LMInfiniteStaticCache
from tests.hf_patches.test_kv_cache import _q4
from tests.hf_patches.test_lm_infinite_static import CASES, _CheckingRunner, _route_decode_through_compiled_call
from tests.utils import left_padded, tiny_model

N_GLOBAL, N_LOCAL = 3, 14
CONFIGS = {
    "q4": _q4(residual_length=4),
    "q4_qjl_r0": _q4(residual_length=0, qjl=True, qjl_dim=16),
    "codebook3": KVCacheConfig(key_bits=3, value_bits=3, group_size=16, codebook=True, residual_length=3),
}


def _run(model, ids, mask, decode, cfg, n_new=36):
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL, decode=decode),
                          kv_cache=cfg)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)


def _teacher_forced(model, cache, ids, mask, n_new: int) -> torch.Tensor:
    """Last-position logits of the prompt and of ``n_new`` one-token steps of fixed random tokens, ``[steps, B, V]``."""
    more = torch.randint(1, model.config.vocab_size, (ids.shape[0], n_new))
    full = torch.cat([ids, more], 1)
    m = torch.cat([mask, torch.ones_like(more)], 1)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    t0 = ids.shape[1]
    with torch.no_grad():
        steps = [model(full[:, :t0], attention_mask=m[:, :t0], position_ids=pos[:, :t0],
                       past_key_values=cache).logits[:, -1]]
        for t in range(t0, full.shape[1]):
            steps.append(model(full[:, t:t + 1], attention_mask=m[:, :t + 1], position_ids=pos[:, t:t + 1],
                               past_key_values=cache).logits[:, -1])
    return torch.stack(steps)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_static_equals_the_host_driven_bounded_cache(model_type, case, cfg):
    """Teacher-forced past the window (the packed ring wraps): every step's logits equal the host-driven cache's.
    The two sum their full-precision parts in a different order, so a key can differ in its last fp32 bit and, once
    in a while, land on the other side of a quantization boundary: a one-code change moves some logits by ~1e-3
    (seen). So: all within 5e-3, and the median difference at fp32 rounding."""
    model = tiny_model(model_type)
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    cfg_ = CONFIGS[cfg]
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL), kv_cache=cfg_)
    seed = torch.randint(0, 2**31, ()).item()
    out = {}
    for name, cls in (("eager", BoundedQuantizedKVCache), ("static", StaticBoundedQuantizedKVCache)):
        torch.manual_seed(seed)  # the same appended tokens
        cache = cls(model.config, cfg_, N_GLOBAL, N_LOCAL, mask)
        out[name] = (_teacher_forced(model, cache, ids, mask, 36), cache)
    (ref, eager), (got, static) = out["eager"], out["static"]
    diff = (got - ref).abs()
    assert diff.max() <= 5e-3 and diff.median() <= 1e-5, (diff.max(), diff.median())
    ring = N_LOCAL - cfg_.residual_length - 1
    assert static.packed_tokens() == eager.packed_tokens() == ring  # 36 new tokens: the ring wrapped
    assert torch.equal(static.layers[0].lengths, eager.layers[0].lengths)
    assert static.stored_tokens() == N_GLOBAL + N_LOCAL
    longkit.remove_patches(model)


def test_generate_builds_the_static_cache_and_matches_eager_at_the_identity_setting():
    """16 bits, no rotation (nothing is rounded to codes): generate() with decode="static" gives the eager bounded
    cache's tokens and logits."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, CASES["leftpad-long"])
    ident = KVCacheConfig(key_bits=16, value_bits=16, rotate=False, residual_length=4)
    ref = _run(model, ids, mask, "eager", ident)
    out = _run(model, ids, mask, "static", ident)
    assert isinstance(out.past_key_values, StaticBoundedQuantizedKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    longkit.remove_patches(model)


@pytest.mark.parametrize("case", ["leftpad-long", "leftpad-short"])
@pytest.mark.parametrize("cfg", ["q4", "q4_qjl_r0"])
def test_cuda_graph_decode_step_is_capture_safe_and_exact(case, cfg, monkeypatch):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    ref = _run(model, ids, mask, "static", CONFIGS[cfg], n_new=30)  # the same cache and ops, without the runner
    longkit.remove_patches(model)
    monkeypatch.setattr(lmi, "_graph_device_ok", lambda m: True)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL, decode="cuda_graph"),
                          kv_cache=CONFIGS[cfg])
    runner = install_runner(model, runner=_CheckingRunner(
        model, lambda c: isinstance(c, LMInfiniteStaticCache), monkeypatch))
    _route_decode_through_compiled_call(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, StaticBoundedQuantizedKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-6, rtol=0)
    # "fill" (the full-precision window still filling, a visibility mask) then "full": one capture per phase
    # that occurs: the first step's token (position = the shortest prompt's length) fills every row's
    # sinks + residual_length + 1 slots, or it does not.
    window = N_GLOBAL + CONFIGS[cfg].residual_length + 1
    phases = 1 if min(CASES[case]) + 1 >= window else 2
    assert runner.stats["captures"] == phases and runner.stats["warmup"] == phases
    assert runner.stats["replays"] == 29 - phases
    longkit.remove_patches(model)
    assert "get_compiled_call" not in vars(model)


def test_errors_of_the_static_quantized_cache(monkeypatch):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 96, (1, 20))
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL, decode="cuda_graph"),
                          kv_cache=_q4())
    with pytest.raises(UnsupportedModelError, match="needs the model on a CUDA device"):
        model.generate(ids, max_new_tokens=3)
    longkit.remove_patches(model)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL, decode="static"),
                          kv_cache=_q4())
    with pytest.raises(ConfigError, match="StaticBoundedQuantizedKVCache"):  # the host-driven cache is not this one
        model.generate(ids, max_new_tokens=3,
                       past_key_values=BoundedQuantizedKVCache(model.config, _q4(), N_GLOBAL, N_LOCAL))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    cache = StaticBoundedQuantizedKVCache(model.config, _q4(), N_GLOBAL, N_LOCAL)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        with pytest.raises(NotImplementedError, match="one token per forward"):
            model(ids[:, :2], past_key_values=cache)
    longkit.remove_patches(model)
    with torch.no_grad(), pytest.raises(RuntimeError, match="did not run longkit's kv_cache"):
        cache = StaticBoundedQuantizedKVCache(model.config, _q4(), N_GLOBAL, N_LOCAL)
        model(ids, past_key_values=cache)  # stock attention: nothing is stored
        model(ids[:, :1], past_key_values=cache)


def test_reset_and_reuse_give_the_same_tokens():
    """A cache passed to generate() twice after reset(): buffers keep their addresses (captured graphs read them)
    and the second run repeats the first."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, [18, 11])
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=N_GLOBAL, n_local=N_LOCAL, decode="static"),
                          kv_cache=_q4())
    cache = StaticBoundedQuantizedKVCache(model.config, _q4(), N_GLOBAL, N_LOCAL, mask)
    gen = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0)
    first = model.generate(ids, past_key_values=cache, **gen)
    buf = cache.layers[1].packed.buffer.data_ptr()
    cache.reset()
    assert int(cache.layers[1].lengths.sum()) == 0 and cache.get_seq_length() == 0
    second = model.generate(ids, past_key_values=cache, **gen)
    assert torch.equal(first, second) and cache.layers[1].packed.buffer.data_ptr() == buf
    longkit.remove_patches(model)
