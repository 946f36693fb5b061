"""LM-Infinite on CUDA: the Triton-kernel prefill path and the fused decode path against the CPU reference."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import longkit
from longkit import LMInfiniteConfig
from tests.utils import left_padded, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fp32_logits(model32, sequences: torch.Tensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """One fp32 forward of whole generated sequences through the PyTorch path (the Triton kernel would use TF32)."""
    from unittest import mock

    from longkit.hf_patches.lm_infinite import attention as lmi_attention

    kw = {}
    if prompt_mask is not None:
        mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], 1)
        kw = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad(), mock.patch.object(lmi_attention, "_kernel_available", lambda: False):
        return model32(sequences, **kw).logits.float()


def assert_greedy_equal_up_to_near_ties(a, b, prompt_len: int, model32, prompt_mask=None) -> None:  # noqa: ANN001
    """Two greedy bf16 generations (``return_dict_in_generate``, ``output_scores``) of one model by different
    paths. ``model32`` (the same weights in fp32, LM-Infinite patched) scores ``a``'s sequences in one forward: on
    the steps where both runs emitted the same tokens so far, each run may be at most twice as far from those fp32
    logits as the other one is (the two are equally precise computations of one function). A row may only first
    differ at a step where the runs differ by at least half the winning margin: a near-tie this rounding explains."""
    sa, sb = a.sequences[:, prompt_len:], b.sequences[:, prompt_len:]
    ref = _fp32_logits(model32, a.sequences, prompt_mask)[:, prompt_len - 1:-1]
    err_a = err_b = 0.0
    for row in range(sa.shape[0]):
        diff = (sa[row] != sb[row]).nonzero()
        n_same = diff[0].item() if len(diff) else sa.shape[1]
        for t in range(min(n_same + 1, sa.shape[1])):  # same prefix up to here: the same function is computed
            err_a = max(err_a, (a.scores[t][row].float() - ref[row, t]).abs().max().item())
            err_b = max(err_b, (b.scores[t][row].float() - ref[row, t]).abs().max().item())
        if n_same < sa.shape[1]:
            xa, xb = a.scores[n_same][row].float(), b.scores[n_same][row].float()
            top2 = xa.topk(2).values
            margin, noise = (top2[0] - top2[1]).item(), (xa - xb).abs().max().item()
            assert margin <= 2 * noise, f"row {row} differs at step {n_same}: margin {margin:.4f} > 2 x {noise:.4f}"
    floor = 1e-3 * ref.abs().max().item()
    assert err_a <= 2 * err_b + floor and err_b <= 2 * err_a + floor, (err_a, err_b)


def _kernel_prefill_logits(model, ids, monkeypatch, kernel: bool, wrong_window: bool = False):
    """Logits of one LM-Infinite forward on the GPU through the Triton kernel or the chunked PyTorch path;
    ``wrong_window`` narrows the kernel's window by one key (a deliberately wrong mask)."""
    import longkit.kernels as kernels
    from longkit.hf_patches.lm_infinite import attention as lmi_attention

    with monkeypatch.context() as mp:
        mp.setattr(lmi_attention, "_kernel_available", lambda: kernel)
        if wrong_window:
            right = kernels.sink_window
            mp.setattr(kernels, "sink_window", lambda n_g, n_local, q_offset=0: right(n_g, n_local - 1, q_offset))
        with torch.no_grad():
            return model(ids).logits.float()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_cuda_prefill_and_decode_match_cpu_reference(model_type, monkeypatch):
    """The kernel path (bf16) may be at most twice as far from the fp32 reference as the PyTorch path in bf16 is;
    a window one key too narrow must fail that bound."""
    from longkit.kernels.testing import assert_close

    cfg = LMInfiniteConfig(n_global=4, n_local=64, limit_distance=48)  # a limit away from its default
    model = tiny_model(model_type, max_position_embeddings=64, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, **({"head_dim": 64} if model_type == "qwen3" else {}))
    model.generation_config.eos_token_id = None  # both runs generate every step (equal lengths)
    gpu = copy.deepcopy(model).cuda().to(torch.bfloat16)
    model32 = copy.deepcopy(gpu).float()  # the bf16-rounded weights in fp32
    longkit.apply_patches(gpu, lm_infinite=cfg)
    longkit.apply_patches(model32, lm_infinite=cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), device="cuda")
    ref = _kernel_prefill_logits(model32, ids, monkeypatch, kernel=False)
    low = _kernel_prefill_logits(gpu, ids, monkeypatch, kernel=False)
    out = _kernel_prefill_logits(gpu, ids, monkeypatch, kernel=True)
    floor = 1e-3 * ref.abs().max().item()
    assert_close("logits", ref, out, lowprec_ref=low, atol_floor=floor)
    wrong = _kernel_prefill_logits(gpu, ids, monkeypatch, kernel=True, wrong_window=True)
    with pytest.raises(AssertionError):
        assert_close("logits, window one key too narrow", ref, wrong, lowprec_ref=low, atol_floor=floor)
    # Bounded-cache generation equals full-cache generation on the GPU too.
    gen = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    a = gpu.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    longkit.apply_patches(gpu, lm_infinite=replace(cfg, bounded_cache=False))
    b = gpu.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    assert_greedy_equal_up_to_near_ties(a, b, ids.shape[1], model32)


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

    from longkit.hf_patches.lm_infinite import LMInfiniteStaticCache

    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2).cuda().bfloat16()
    model32 = copy.deepcopy(model).float()  # the bf16-rounded weights in fp32, unpatched
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, [70, 52])
    kw = dict(n_global=4, n_local=32)
    static = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="static"), 48)
    graph = _gen(model, ids, mask, LMInfiniteConfig(**kw, decode="cuda_graph"), 48)
    assert torch.equal(graph.sequences, static.sequences)
    ref = _gen(model, ids, mask, LMInfiniteConfig(**kw), 48)
    longkit.apply_patches(model32, lm_infinite=LMInfiniteConfig(**kw))
    assert_greedy_equal_up_to_near_ties(graph, ref, ids.shape[1], model32, mask)
    cache = graph.past_key_values
    assert isinstance(cache, LMInfiniteStaticCache) and cache.graph_phase() == "full"
    nxt = graph.sequences[:, -1:]
    pos = (torch.cat([mask, torch.ones_like(graph.sequences[:, ids.shape[1]:])], 1).cumsum(-1) - 1)[:, -1:]
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model(nxt, position_ids=pos, past_key_values=cache)  # raises if the step needed a mask


def test_vanilla_static_cache_graphed_decode_matches_dynamic():
    """The benchmark's vanilla baseline: HF StaticCache + the same runner equals HF's default generate."""
    from longkit.hf_patches.decode_graph import graphed_decode

    model = tiny_model("llama").cuda()
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, [20, 14])
    gen = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **gen)
    with graphed_decode(model) as runner:
        out = model.generate(ids, cache_implementation="static", **gen)
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 22, runner.stats
    assert torch.equal(out, ref)


@pytest.mark.parametrize("decode", ["eager", "static", "cuda_graph"])
@pytest.mark.parametrize("search", ["beams", "sampling"])
def test_beam_search_and_sampling_equal_full_cache_on_cuda(decode, search):
    """fp32: beam search (rows reordered every step) and several sampled sequences per prompt give the full-cache
    path's sequences in every decode mode, graphs included."""
    model = tiny_model("llama").cuda()
    model.generation_config.eos_token_id = None
    ids, mask = _padded(model.config.vocab_size, [22, 15])
    gen = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    gen.update(dict(num_beams=4, num_return_sequences=2, do_sample=False) if search == "beams"
               else dict(do_sample=True, num_return_sequences=3, top_k=0))
    seed = int(torch.randint(0, 2**31 - 1, ()))
    out = {}
    for name, cfg in (("full", LMInfiniteConfig(3, 10, bounded_cache=False)), (decode, LMInfiniteConfig(
            3, 10, decode=decode))):
        longkit.apply_patches(model, lm_infinite=cfg)
        torch.manual_seed(seed)
        out[name] = model.generate(ids, **gen)
    assert out[decode].sequences.shape == out["full"].sequences.shape
    assert torch.equal(out[decode].sequences, out["full"].sequences)
    if search == "beams":
        torch.testing.assert_close(out[decode].sequences_scores, out["full"].sequences_scores, atol=1e-4, rtol=1e-4)
