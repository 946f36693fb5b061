"""LM-Infinite on CUDA: the Triton-kernel prefill path and the fused decode path against the CPU reference."""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit import LMInfiniteConfig
from tests.utils import tiny_model

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
