"""What differs across the supported transformers versions (5.17-5.25) and how the adapters keep one behaviour.

5.24 renamed the cache argument ``past_key_values`` -> ``cache`` (models, ``generate()``'s model kwargs,
outputs) and moved the refusal of uncroppable caches in assisted generation after the prefill.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from packaging.version import Version

import longkit
from longkit import LMInfiniteConfig
from longkit.hf_patches.compat import cache_kwarg
from longkit.hf_patches.lm_infinite import LMInfiniteCache, LMInfiniteStaticCache
from tests.utils import tiny_model

_RENAMED = Version(transformers.__version__).release >= (5, 24)


def test_cache_kwarg_is_the_installed_versions_name():
    assert cache_kwarg() == ("cache" if _RENAMED else "past_key_values")
    model = tiny_model("llama")
    assert cache_kwarg() in inspect.signature(model.forward).parameters


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generate_uses_the_bounded_cache_without_deprecated_names(decode):
    """The cache goes in under generate()'s own key: no deprecation path (a FutureWarning from 5.24 on), and
    generate() returns it under that name."""
    model = tiny_model("qwen3")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=8, decode=decode))
    ids = torch.randint(1, model.config.vocab_size, (2, 14))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, cache_kwarg())
    assert isinstance(cache, LMInfiniteStaticCache if decode == "static" else LMInfiniteCache)
    assert cache.get_seq_length() == ids.shape[1] + 5
    assert cache.stored_tokens() == 2 + 8  # bounded: evicted beyond n_global + n_local


@pytest.mark.parametrize("given", [False, True], ids=["built", "given"])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_assisted_generation_is_refused_before_the_prompt_runs(decode, given):
    """Same error on every version: up to 5.23 generate() reached crop(), from 5.24 it raised its own
    ValueError after the prefill. Also for a bounded cache the user passes in."""
    model = tiny_model("llama")
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=8, decode=decode))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, model.config.vocab_size, (1, 20))
    extra = {cache_kwarg(): LMInfiniteCache(model.config.num_hidden_layers, 2, 8)} if given else {}
    with pytest.raises(NotImplementedError, match=r"assisted/speculative .*bounded_cache=False"):
        model.generate(ids, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2, **extra)
    assert not calls


def test_assisted_generation_with_the_full_cache_equals_plain_generation():
    """``bounded_cache=False`` (the fix the error names) works on every version: prompt lookup gives the same
    greedy tokens as plain decoding with the same LM-Infinite attention."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=8, bounded_cache=False))
    ids = torch.randint(1, 20, (1, 24))
    ids[0, 12:] = ids[0, :12]  # a repeat, so prompt lookup has drafts to verify
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(plain, assisted)
