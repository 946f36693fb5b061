"""Ulysses attention's CUDA path (Triton masked-attention kernel, NCCL all-to-all) on one GPU.

A one-rank NCCL group runs the real all-to-all and kernel code; the model must match the same model with
HF's sdpa attention (bf16 tolerances). Multi-GPU equivalence is covered on CPU/gloo by
test_ulysses_dist.py; multi-GPU throughput by benchmarks/ulysses.py.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # parallel test workers must not collide
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    return dist.group.WORLD


@pytest.mark.parametrize("kind, attention", [("plain", "auto"), ("plain", "kernel"), ("packed", "auto"),
                                             ("right_pad", "auto")])
def test_cuda_path_matches_sdpa(group, kind, attention):
    from transformers import LlamaConfig, LlamaForCausalLM

    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig, ulysses

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    ref = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    model = copy.deepcopy(ref)
    undo = ulysses.install(model, group, rank=0, world=1, config=SequenceParallelConfig(size=1, attention=attention))
    B, T = (1, 2048) if kind == "packed" else (2, 1500)
    ids = torch.randint(0, 1000, (B, T), device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone()}
    if kind == "packed":
        cuts = [0, 700, 1300, T]
        batch["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:])]).view(1, -1).cuda()
        for c in cuts[1:-1]:
            batch["labels"][0, c] = -100
    if kind == "right_pad":
        mask = torch.ones(B, T, dtype=torch.long, device="cuda")
        mask[1, 1100:] = 0
        batch["labels"][mask == 0] = -100
        batch["attention_mask"] = mask
    shard = SequenceParallel(SequenceParallelConfig(size=1)).shard_batch(batch)
    loss = model(**shard).loss
    loss.backward()
    ref_loss = ref(**shard).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * abs(ref_loss.item())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        err = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12)
        assert err < 5e-2, (n, float(err))
    ulysses.uninstall(model, undo)
