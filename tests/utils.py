"""Tiny randomly initialised models of real architectures, built from configs (no network)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48)

_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def tiny_model(model_type: str = "llama", dtype: torch.dtype = torch.float32, **overrides):
    """A 2-layer GQA model of ``model_type`` with random weights, in eval mode, without an EOS token for
    ``generate()``: a random model emits its config's EOS id now and then, and a run that stops early makes a
    length check depend on the seed (tests that need EOS set ``model.generation_config.eos_token_id``)."""
    cfg_name, model_name, extra = _CONFIGS[model_type]
    cfg = getattr(transformers, cfg_name)(**{**TINY, **extra, **overrides})
    cfg._attn_implementation = "sdpa"
    model = getattr(transformers, model_name)(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def left_padded(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` left-padded with id 0, and the matching 0/1 attention mask."""
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t))
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, t - n:] = 1
        ids[b, : t - n] = 0
    return ids, mask
