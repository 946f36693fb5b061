"""The shared attention switch and the host entry points' adapter tables.

* one way to read the model type (the text config's), one supported-model table, the same refusal of
  multimodal wrappers by LM-Infinite and by Ulysses;
* the switch restores the model when transformers refuses the implementation;
* every ``apply_patches`` technique, DeepSpeed sequence-parallel mode and vLLM installer names a module that
  exists and has the functions its host calls.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers

import longkit
from longkit import LMInfiniteConfig, UnsupportedModelError
from longkit.hf_patches import attention as switch
from longkit.hf_patches import get_patches
from longkit.hf_patches.registry import TECHNIQUES
from tests.utils import tiny_model


def _tiny_llava():
    tc = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(text_config=tc, vision_config=vc))


def test_model_type_is_read_from_the_text_config():
    llava = _tiny_llava()
    assert switch.model_type(llava) == "llama" and switch.model_type(llava.config) == "llama"
    assert switch.model_type(tiny_model("qwen3")) == "qwen3"
    assert switch.model_type(torch.nn.Linear(2, 2)) is None


def test_multimodal_wrapper_is_refused_the_same_way_by_every_technique():
    from longkit.deepspeed_ext import SequenceParallelConfig, ulysses

    llava = _tiny_llava()
    impl = llava.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="multimodal model .*'llava' around a 'llama'"):
        longkit.apply_patches(llava, lm_infinite=True)
    with pytest.raises(UnsupportedModelError, match="multimodal model .*'llava' around a 'llama'"):
        ulysses.install(llava, group=None, rank=0, world=2, config=SequenceParallelConfig(size=2))
    assert llava.config._attn_implementation == impl and get_patches(llava) is None


def test_non_transformers_module_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a transformers model"):
        longkit.apply_patches(torch.nn.Linear(2, 2), lm_infinite=True)


def test_sliding_window_is_read_with_use_sliding_window():
    cfg = transformers.Qwen2Config(sliding_window=32, use_sliding_window=True)
    assert switch.sliding_window(cfg) == 32
    cfg.use_sliding_window = False
    assert switch.sliding_window(cfg) is None
    assert switch.sliding_window(transformers.MistralConfig(sliding_window=None)) is None


def test_refused_implementation_is_rolled_back(monkeypatch):
    model = tiny_model("llama")
    attns = switch.attention_modules(model, "test")
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, key: None)
    with pytest.raises(UnsupportedModelError, match="refused"):
        switch.switch_attention(model, "longkit_test_refused", lambda *a, **k: None, lambda *a, **k: None, attns,
                                "_longkit_test_state", lambda m: object())
    assert not any(hasattr(m, "_longkit_test_state") for m in attns)


def test_every_technique_names_an_installing_module():
    for name, tech in TECHNIQUES.items():
        module = importlib.import_module(tech.module)
        assert callable(module.install) and callable(module.uninstall), name
        assert tech.model_types <= switch.SUPPORTED_MODEL_TYPES
        assert tech.config_cls.__name__ in longkit.__all__


def test_install_through_the_registry_round_trips():
    model = tiny_model("llama")
    impl = model.config._attn_implementation
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=8))
    assert model.config._attn_implementation == "longkit_lm_infinite"
    assert get_patches(model).undo["lm_infinite"]["touched"] == model.config.num_hidden_layers
    longkit.remove_patches(model)
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_longkit_lm_infinite") for m in model.modules())


def test_every_sequence_parallel_mode_has_an_adapter():
    from longkit.deepspeed_ext import config as ds_config
    from longkit.deepspeed_ext.adapters import SP_ADAPTERS, sp_adapter
    from longkit.errors import ConfigError

    assert set(ds_config._SP_MODES) == set(SP_ADAPTERS)
    for mode in SP_ADAPTERS:
        adapter = sp_adapter(mode)
        assert callable(adapter.install) and callable(adapter.uninstall)
    with pytest.raises(ConfigError, match="no sequence-parallel adapter"):
        sp_adapter("ring")


def test_vllm_installers_resolve():
    from longkit.vllm_plugins import INSTALLERS

    assert INSTALLERS, "the plugin must install something"
    for inst in INSTALLERS:
        module, function = inst.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), inst.target


def test_training_techniques_compose_through_apply_patches():
    """Activation offload, tiled loss and prefix sharing together: same loss and gradients, all undone."""
    import warnings

    model = tiny_model("llama", max_position_embeddings=128).train()
    ids = torch.randint(1, 96, (3, 40))
    ids[1, :20] = ids[0, :20]  # two rows share a prefix
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA: offload saves no memory"
        longkit.apply_patches(model, activation_offload=True, tiled_loss={"chunk_size": 16},
                              prefix_sharing={"min_shared_tokens": 8})
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert get_patches(model).configs.keys() == {"activation_offload", "tiled_loss", "prefix_sharing"}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)
    longkit.remove_patches(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.model)
    assert model.config._attn_implementation == "sdpa"
