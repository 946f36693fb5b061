"""Beam search and multi-sequence sampling in every LM-Infinite decode mode equal the full-cache path.

The reference is LM-Infinite attention over HF's own full (dynamic) cache (``bounded_cache=False``): nothing is
evicted and transformers reorders that cache itself. Each bounded-cache mode (``eager``, ``static``,
``cuda_graph``; the last one on CPU through the instrumented runner of ``test_lm_infinite_static``) must give the
same sequences and scores. Prompts are longer than ``n_global + n_local`` or fill the ring while decoding, so beam
reordering happens after eviction.
"""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit import LMInfiniteConfig
from longkit.hf_patches.decode_graph import install_runner
from longkit.hf_patches.lm_infinite import patch as lmi
from longkit.hf_patches.lm_infinite.static_cache import LMInfiniteStaticCache
from tests.hf_patches.test_lm_infinite_static import _CheckingRunner, _route_decode_through_compiled_call
from tests.utils import left_padded, tiny_model

MODES = ["eager", "static", "cuda_graph"]
N_GLOBAL, N_LOCAL = 3, 10


def _patch(model, mode, monkeypatch):
    longkit.remove_patches(model)
    if mode == "full":
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(N_GLOBAL, N_LOCAL, bounded_cache=False))
        return
    if mode == "cuda_graph":
        monkeypatch.setattr(lmi, "_graph_device_ok", lambda m: True)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(N_GLOBAL, N_LOCAL, decode=mode))
    if mode == "cuda_graph":  # no CUDA here: "graphs" re-run the step and check it would replay identically
        install_runner(model, runner=_CheckingRunner(model, lambda c: isinstance(c, LMInfiniteStaticCache),
                                                     monkeypatch))
        _route_decode_through_compiled_call(model)


def _run(model, mode, monkeypatch, ids, mask, seed, **gen):
    _patch(model, mode, monkeypatch)
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=mask, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True, **gen)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [[22, 15], [6, 4]], ids=["evicted", "ring-fills"])
def test_beam_search_equals_full_cache(mode, lengths, monkeypatch):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, lengths)
    gen = dict(max_new_tokens=24, num_beams=4, num_return_sequences=2, do_sample=False, length_penalty=1.0)
    ref = _run(model, "full", monkeypatch, ids, mask, 0, **gen)
    out = _run(model, mode, monkeypatch, ids, mask, 0, **gen)
    assert out.sequences.shape == ref.sequences.shape
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_sampling_several_return_sequences_equals_full_cache(mode, monkeypatch):
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, [18, 11])
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = dict(max_new_tokens=24, do_sample=True, num_return_sequences=3, top_k=0, top_p=1.0, temperature=1.0)
    ref = _run(model, "full", monkeypatch, ids, mask, seed, **gen)
    out = _run(model, mode, monkeypatch, ids, mask, seed, **gen)
    assert out.sequences.shape == ref.sequences.shape == (6, ids.shape[1] + 24)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", ["static", "cuda_graph"])
def test_static_cache_refuses_batch_changes_it_cannot_make_in_place(decode, monkeypatch):
    """Operations that would replace the fixed buffers (and leave the attention reading stale ones) raise."""
    model = tiny_model("llama")
    ids, mask = left_padded(model.config.vocab_size, [9, 7])
    _patch(model, decode, monkeypatch)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, LMInfiniteStaticCache)
    for call in (lambda: cache.batch_repeat_interleave(2), lambda: cache.batch_select_indices(torch.tensor([0])),
                 lambda: cache.crop(2), cache.layers[0].offload, cache.layers[0].prefetch):
        with pytest.raises(NotImplementedError, match="LMInfiniteStaticCache"):
            call()


@pytest.mark.parametrize("mode", MODES)
def test_distance_limit_away_from_its_default_in_every_decode_mode(mode, monkeypatch):
    """``limit_distance`` other than ``n_local`` reaches every path: each decode mode equals the full cache with the
    same limit, and the scores differ from those with the default limit (the option is really used)."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(model.config.vocab_size, [26, 19])
    gen = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    scores = {}
    for limit in (4, 17, None):
        out = {}
        for name, cfg in (("full", LMInfiniteConfig(N_GLOBAL, N_LOCAL, limit, bounded_cache=False)),
                          (mode, LMInfiniteConfig(N_GLOBAL, N_LOCAL, limit, decode=mode))):
            longkit.remove_patches(model)
            if mode == "cuda_graph" and name == mode:
                _patch_cfg_graph(model, cfg, monkeypatch)
            else:
                longkit.apply_patches(model, lm_infinite=cfg)
            out[name] = model.generate(ids, **gen)
        assert torch.equal(out[mode].sequences, out["full"].sequences), limit
        torch.testing.assert_close(torch.stack(out[mode].scores), torch.stack(out["full"].scores), atol=1e-5,
                                   rtol=1e-5)
        scores[limit] = torch.stack(out["full"].scores)
    assert (scores[4] - scores[None]).abs().max() > 1e-3 and (scores[17] - scores[None]).abs().max() > 1e-3


def _patch_cfg_graph(model, cfg, monkeypatch):
    monkeypatch.setattr(lmi, "_graph_device_ok", lambda m: True)
    longkit.apply_patches(model, lm_infinite=cfg)
    install_runner(model, runner=_CheckingRunner(model, lambda c: isinstance(c, LMInfiniteStaticCache), monkeypatch))
    _route_decode_through_compiled_call(model)
