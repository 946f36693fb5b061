"""kv_cache on top of LM-Infinite with ``decode="static" | "cuda_graph"``: the fixed-buffer quantized bounded cache
(``bounded_static.py``), on CPU.

* it gives the same greedy tokens and logits as the host-driven :class:`BoundedQuantizedKVCache` (same tokens kept,
  same records), across ring wrap-around, left padding and short prompts;
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


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_static_equals_the_host_driven_bounded_cache(model_type, case, cfg):
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = None  # rows must not stop early
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    ref = _run(model, ids, mask, "eager", CONFIGS[cfg])
    out = _run(model, ids, mask, "static", CONFIGS[cfg])
    cache = out.past_key_values
    assert isinstance(cache, StaticBoundedQuantizedKVCache) and isinstance(ref.past_key_values, BoundedQuantizedKVCache)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    ring = N_LOCAL - CONFIGS[cfg].residual_length - 1
    assert cache.packed_tokens() == ref.past_key_values.packed_tokens() == ring  # 36 new tokens: the ring wrapped
    assert torch.equal(cache.layers[0].lengths, ref.past_key_values.layers[0].lengths)
    assert cache.stored_tokens() == N_GLOBAL + N_LOCAL
    longkit.remove_patches(model)


@pytest.mark.parametrize("case", ["leftpad-long", "leftpad-short"])
@pytest.mark.parametrize("cfg", ["q4", "q4_qjl_r0"])
def test_cuda_graph_decode_step_is_capture_safe_and_exact(case, cfg, monkeypatch):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, CASES[case])
    ref = _run(model, ids, mask, "eager", CONFIGS[cfg], n_new=30)
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
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
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
