"""The quantized KV cache on the default model (SmolLM2-135M-Instruct, fp32, CPU): 4-bit keys and values agree with the
full-precision cache on most greedy tokens of a real document.

Agreement is teacher-forced: the stock greedy continuation is fed token by token through the quantized cache and each
step's argmax compared with the stock token, so one early difference does not decide the rest. Measured with these
settings (192-token prompts of ``_pydecimal.py`` at token offsets 0, 700 and 1400; 16 tokens; window 32, so the prompt
is read quantized): 4-bit rotated 16, 14, 16 of 16; 3-bit rotated 16, 13, 16 (and at 256-token prompts, 24 tokens:
4-bit rotated 23, 23, 24 of 24; 3-bit rotated 22, 19, 24). The threshold is 12 of 16 for 4-bit rotated (offset 0).
"""

from __future__ import annotations

import pytest
import torch

import longkit
from longkit.config import KVCacheConfig
from longkit.hf_patches.kv_cache import QuantizedKVCache

PROMPT, NEW, THRESHOLD = 192, 16, 12


@pytest.fixture(scope="module")
def default_model():
    from longkit.models import DefaultModelMissingError, find_text_document, load_default

    try:
        model, tok = load_default(dtype=torch.float32)
    except DefaultModelMissingError as e:
        pytest.skip(str(e))
    model.generation_config.eos_token_id = None
    _, text = find_text_document(2 * PROMPT, tok)
    return model, tok(text, return_tensors="pt").input_ids[:, :PROMPT]


@torch.no_grad()
def _teacher_forced_hits(model, ids: torch.Tensor, ref: torch.Tensor, cfg: KVCacheConfig) -> int:
    cache = QuantizedKVCache(model.config, cfg)
    logits = model(ids, past_key_values=cache).logits[0, -1]
    hits = int(logits.argmax() == ref[0])
    for t in range(1, ref.numel()):
        logits = model(ref[None, t - 1:t], past_key_values=cache).logits[0, -1]
        hits += int(logits.argmax() == ref[t])
    assert cache.packed_tokens() == PROMPT + NEW - 1 - cfg.residual_length  # the prompt was read quantized
    return hits


def test_4bit_agrees_with_full_precision_on_most_tokens(default_model):
    model, ids = default_model
    ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, PROMPT:]
    cfg = KVCacheConfig(key_bits=4, value_bits=4, residual_length=32)
    longkit.apply_patches(model, kv_cache=cfg)
    try:
        hits = _teacher_forced_hits(model, ids, ref, cfg)
    finally:
        longkit.remove_patches(model)
    assert hits >= THRESHOLD, f"4-bit cache agreed on {hits} of {NEW} greedy tokens (threshold {THRESHOLD})"
