"""LM-Infinite on CUDA: the Triton-kernel prefill path and the fused decode path against the CPU reference."""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit import LMInfiniteConfig
from tests.utils import left_padded, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_cuda_prefill_and_decode_match_cpu_reference(model_type):
    cfg = LMInfiniteConfig(n_global=4, n_local=64)
    model = tiny_model(model_type, max_position_embeddings=64, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, **({"head_dim": 64} if model_type == "qwen3" else {}))
    longkit.apply_patches(model, lm_infinite=cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 300))
    with torch.no_grad():
        ref = model(ids).logits
        gpu = model.cuda().to(torch.bfloat16)
        out = gpu(ids.cuda()).logits.float().cpu()
    assert _rel(out, ref) < 2e-2, _rel(out, ref)
    # Bounded-cache generation equals full-cache generation on the GPU too.
    gen = dict(max_new_tokens=40, do_sample=False)
    a = gpu.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), **gen)
    longkit.apply_patches(gpu, lm_infinite=LMInfiniteConfig(n_global=4, n_local=64, bounded_cache=False))
    b = gpu.generate(ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), **gen)
    assert (a == b).float().mean().item() > 0.95  # bf16: identical up to rare near-ties


def test_cuda_left_padding_uses_reference_path_and_matches_cpu():
    model = tiny_model("llama", max_position_embeddings=32)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=3, n_local=32))
    ids = torch.randint(1, model.config.vocab_size, (2, 80))
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        out = model.cuda()(ids.cuda(), attention_mask=mask.cuda(), position_ids=pos.cuda()).logits.cpu()
    real = mask.bool()
    assert _rel(out[real], ref[real]) < 1e-3


# --------------------------------------------------------------------------- static cache + CUDA graphs
def _padded(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded(vocab, lengths)
    return ids.cuda(), mask.cuda()


def _gen(model, ids, mask, cfg, n_new=40):
    longkit.apply_patches(model, lm_infinite=cfg)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("lengths", [[26, 17, 30], [5, 3, 8]], ids=["ring-full", "ring-fills"])
def test_cuda_graph_generate_equals_eager_paths_fp32(model_type, lengths):
    """Graph-replayed decoding gives the eager bounded cache's tokens; the graphs were captured and replayed."""
    model = tiny_model(model_type).cuda()
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, lengths)
    kw = dict(n_global=3, n_local=12)
    ref = _gen(model, ids, mask, LMInfiniteConfig(**kw))
    static = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="static"))
    graph = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="cuda_graph"))
    runner = model._longkit_graph_runner
    phases = 1 if min(lengths) > 15 else 2
    assert runner.stats["captures"] == phases and runner.stats["replays"] == 39 - phases, runner.stats
    assert torch.equal(graph.sequences, ref.sequences) and torch.equal(static.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(graph.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(graph.scores), torch.stack(static.scores), atol=1e-5, rtol=1e-5)


def test_cuda_graph_bf16_uses_maskless_flash_step_and_matches_static():
    """bf16, head dim 64: the ring-full step passes no mask (flash-only SDPA accepts it); graph == eager static."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longkit.hf_patches.lm_infinite_static import LMInfiniteStaticCache

    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).cuda().bfloat16()
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, [70, 52])
    kw = dict(n_global=4, n_local=32)
    static = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="static"), 48)
    graph = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="cuda_graph"), 48)
    assert torch.equal(graph.sequences, static.sequences)
    ref = _gen(model, ids, mask, LMInfiniteConfig(**kw), 48)
    assert (graph.sequences == ref.sequences).float().mean().item() > 0.95  # bf16: rare near-ties may differ
    cache = graph.past_key_values
    assert isinstance(cache, LMInfiniteStaticCache) and cache.graph_phase() == "full"
    nxt = graph.sequences[:, -1:]
    pos = (torch.cat([mask, torch.ones_like(graph.sequences[:, ids.shape[1]:])], 1).cumsum(-1) - 1)[:, -1:]
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model(nxt, position_ids=pos, past_key_values=cache)  # raises if the step needed a mask


def test_vanilla_static_cache_graphed_decode_matches_dynamic():
    """The benchmark's vanilla baseline: HF StaticCache + the same runner equals HF's default generate."""
    from longkit.hf_patches.lm_infinite_graph import graphed_decode

    model = tiny_model("llama").cuda()
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, [20, 14])
    gen = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **gen)
    with graphed_decode(model) as runner:
        out = model.generate(ids, cache_implementation="static", **gen)
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 22, runner.stats
    assert torch.equal(out, ref)
