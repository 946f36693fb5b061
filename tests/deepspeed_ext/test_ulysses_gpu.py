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


def _run(model, shard):
    out = model(**shard)
    out.loss.backward()
    return out.loss.detach().float(), out.logits.detach().float(), {n: p.grad.float() for n, p in
                                                                   model.named_parameters()}


def _check_against_fp32(ulysses_run, bf16_run, fp32_run, real) -> None:
    """Ulysses (bf16) may be at most twice as far from the fp32 run as HF's own bf16 sdpa run is: loss, logits
    of real tokens, every parameter's gradient (elementwise, floors relative to that tensor's own scale)."""
    from longkit.kernels.testing import assert_close

    (lu, xu, gu), (lb, xb, gb), (l32, x32, g32) = ulysses_run, bf16_run, fp32_run
    assert abs(lu - l32) <= 2 * abs(lb - l32) + 1e-4 * abs(l32), (float(lu), float(lb), float(l32))
    assert_close("logits", x32[real], xu[real], lowprec_ref=xb[real], atol_floor=1e-3 * x32[real].abs().max().item())
    for n in g32:
        assert_close(f"grad {n}", g32[n], gu[n], lowprec_ref=gb[n], atol_floor=1e-3 * g32[n].abs().max().item())


@pytest.mark.parametrize("kind, attention, wrong_mask", [
    ("plain", "auto", False), ("plain", "kernel", False), ("packed", "auto", False), ("right_pad", "auto", False),
    ("plain", "kernel", True)])
def test_cuda_path_matches_sdpa(group, kind, attention, wrong_mask, monkeypatch):
    """Against an fp32 run of the same (bf16-rounded) weights; ``wrong_mask`` drops each query's farthest key
    inside the kernel call and must fail the check (it shows the tolerance can catch a mask error)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longkit.deepspeed_ext import SequenceParallel, SequenceParallelConfig, ulysses
    from longkit.kernels import masked_attention, sink_window

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    ref = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).train()
    ref32 = copy.deepcopy(ref).float()
    model = copy.deepcopy(ref)
    undo = ulysses.install(model, group, rank=0, world=1, config=SequenceParallelConfig(size=1, attention=attention))
    if wrong_mask:
        monkeypatch.setattr(ulysses, "masked_attention", lambda q, k, v, mask, scale: masked_attention(
            q, k, v, mask=sink_window(0, q.shape[2] - 1), scale=scale))
    B, T = (1, 2048) if kind == "packed" else (2, 1500)
    ids = torch.randint(0, 1000, (B, T), device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone()}
    real = torch.ones(B, T, dtype=torch.bool, device="cuda")
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
        real = mask.bool()
    shard = SequenceParallel(SequenceParallelConfig(size=1)).shard_batch(batch)
    runs = _run(model, shard), _run(ref, shard), _run(ref32, shard)
    if wrong_mask:
        with pytest.raises(AssertionError):
            _check_against_fp32(*runs, real)
    else:
        _check_against_fp32(*runs, real)
    ulysses.uninstall(model, undo)
