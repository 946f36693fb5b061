"""Memory blocks on CUDA: the shared-kernel prefill path against the PyTorch reference, GPU generation against the
CPU reference's tokens, decode steps without host synchronisation, and the offloaded store."""

from __future__ import annotations

import copy

import pytest
import torch

import longkit
from longkit import LMInfiniteConfig
from longkit.config import MemoryConfig
from tests.utils import left_padded, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LM = LMInfiniteConfig(n_global=4, n_local=64, limit_distance=56)  # a limit away from its default
MEM = MemoryConfig(block_size=16, repr_keys=4, topk=3, chunk_size=32)


def _state(model):
    return [m._longkit_inf_memory for m in model.modules() if hasattr(m, "_longkit_inf_memory")]


def _logits(model, ids, kernel: bool) -> torch.Tensor:
    for st in _state(model):
        st.use_kernel = kernel
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("distance", [None, 40], ids=["dist_limit", "dist40"])
def test_kernel_prefill_matches_reference(model_type, distance):
    """bf16: the kernel path may be at most twice as far from the fp32 reference as the PyTorch path in bf16 is; a
    memory seen half a block (8 positions) off must fail that bound. (One position off is within bf16's error for
    some random tiny models; ``test_kernel_layout_equals_reference_path_fp32`` checks that shift in fp32.)"""
    from longkit.kernels.testing import assert_close

    model = tiny_model(model_type, max_position_embeddings=128, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, **({"head_dim": 64} if model_type == "qwen3" else {}))
    gpu = copy.deepcopy(model).cuda().to(torch.bfloat16)
    model32 = copy.deepcopy(gpu).float()
    cfg = MemoryConfig(block_size=16, repr_keys=4, topk=3, chunk_size=32, distance=distance)
    for m in (gpu, model32):
        longkit.apply_patches(m, lm_infinite=LM, memory=cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 400), device="cuda")
    ref = _logits(model32, ids, kernel=False)
    low = _logits(gpu, ids, kernel=False)
    out = _logits(gpu, ids, kernel=True)
    floor = 1e-3 * ref.abs().max().item()
    assert_close("logits", ref, out, lowprec_ref=low, atol_floor=floor)
    for st in _state(gpu):  # every attention module has its own state
        st.distance += MEM.block_size // 2
    wrong = _logits(gpu, ids, kernel=True)
    with pytest.raises(AssertionError):
        assert_close("logits, memory half a block off", ref, wrong, lowprec_ref=low, atol_floor=floor)


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return None if len(diff) == 0 else int(diff[0, -1])


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_generate_on_gpu_equals_cpu_reference_tokens(model_type):
    """fp32 on both devices (TF32 off): the GPU run (kernel prefill, SDPA decode steps) gives the CPU reference's
    greedy tokens, batched with left padding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(model_type, max_position_embeddings=128)
    model.generation_config.eos_token_id = None
    gpu = copy.deepcopy(model).cuda()
    for m in (model, gpu):
        longkit.apply_patches(m, lm_infinite=LM, memory=MEM)
    gen = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for lengths in ([300, 300], [300, 211]):  # no padding (kernel path), left padding (reference path)
        ids, mask = left_padded(model.config.vocab_size, lengths)
        cpu_out = model.generate(ids, attention_mask=mask, **gen)
        gpu_out = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **gen)
        torch.testing.assert_close(torch.stack(gpu_out.scores).cpu(), torch.stack(cpu_out.scores),
                                   atol=2e-3, rtol=2e-3)
        assert torch.equal(gpu_out.sequences.cpu(), cpu_out.sequences)


def test_decode_steps_do_not_synchronise():
    """A decode step (selection, gather, attention, received weights, block writes) reads nothing back to the host."""
    from longkit.hf_patches.inf_memory import MemoryCache

    model = tiny_model("llama", max_position_embeddings=128).cuda()
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    ids = torch.randint(1, 96, (2, 300), device="cuda")
    cache = MemoryCache(model.config.num_hidden_layers, LM.n_global, LM.n_local, None, MEM)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(40):  # crosses block completions (every 16 steps) and re-selections
                pos = torch.full((1, 1), 300 + t, device="cuda")
                model(ids[:, t:t + 1], position_ids=pos, past_key_values=cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_offload_on_cuda_equals_device_store_and_bounds_device_memory():
    model = tiny_model("llama", max_position_embeddings=128).cuda()
    model.generation_config.eos_token_id = None
    gen = dict(max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ids = torch.randint(1, 96, (1, 600), device="cuda")
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    ref = model.generate(ids, **gen)
    hkv = model.config.num_key_value_heads
    off = MemoryConfig(block_size=16, repr_keys=4, topk=3, chunk_size=32, offload=True, gpu_blocks=hkv * 3)
    longkit.apply_patches(model, lm_infinite=LM, memory=off)
    out = model.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    store = out.past_key_values.layers[0].store
    assert store.pages_k[0].is_pinned() and store.pool_k.is_cuda
    longer = model.generate(torch.randint(1, 96, (1, 1500), device="cuda"), **gen)
    a, b = out.past_key_values.nbytes(), longer.past_key_values.nbytes()
    blocks_dev = sum(layer.repr_k.nbytes for layer in longer.past_key_values.layers)
    assert b["host"] > a["host"] and b["device"] - blocks_dev == a["device"] - sum(
        layer.repr_k.nbytes for layer in out.past_key_values.layers)
