"""Long-context SFT of a Hugging Face causal LM with Ulysses sequence parallelism (DeepSpeed + longkit).

Each sample is a long real document (Python standard-library sources found on this machine) as the prompt
and its continuation as the response; only the response is trained on. The sequence is split across the
ranks of a sequence-parallel group by the ``"longkit"`` section of the DeepSpeed config, so a group of
``size`` GPUs trains sequences ``size`` times longer than one GPU could.

    # CPU, 2 processes (gloo), toy size: a tiny random Llama with a byte-level vocabulary
    torchrun --nproc_per_node 2 recipes/long_context_sft.py --steps 4 --seq-len 1024
    # the embedded SmolLM2-135M-Instruct and its tokenizer
    torchrun --nproc_per_node 2 recipes/long_context_sft.py --model default --seq-len 2048 --steps 2
    # GPUs: bf16, longer sequences (set "bf16": {"enabled": true} in the config)
    torchrun --nproc_per_node 8 recipes/long_context_sft.py --model /path/to/llama --config my_ds.json \
        --seq-len 131072
    # one GPU or CPU process, no sequence parallelism; activation offload + tiled loss/MLP for longer sequences
    torchrun --nproc_per_node 1 recipes/long_context_sft.py --sp-size 1 --gradient-checkpointing \
        --activation-offload --tiled-loss --tiled-mlp --seq-len 2048
    # a linear-attention hybrid (MiniMax-style: lightning attention + softmax layers) with LASP-2H
    torchrun --nproc_per_node 2 recipes/long_context_sft.py --model tiny-minimax \
        --config recipes/configs/lasp2_sp2_zero2.json --seq-len 1024

``--activation-offload`` adds ``"activation_offload": {}`` to the config's ``"longkit"`` section (saved tensors of
each layer to host memory); ``--tiled-loss`` applies ``longkit.apply_patches(model, tiled_loss=True)`` (the LM head
and loss in token tiles: no ``[tokens, vocab]`` logits), ``--tiled-mlp`` ``apply_patches(model, tiled_mlp=True)``
(each MLP in token tiles, recomputed in backward). ``--model tiny-minimax`` / ``tiny-qwen3.5`` /
``tiny-kimi-linear`` are tiny random linear-attention hybrids (lightning attention / Gated DeltaNet / Kimi delta
attention layers between softmax layers) for
``"sequence_parallel": {"mode": "lasp2"}`` (``recipes/configs/lasp2_sp2_zero2.json``): the linear layers pass their
state between ranks (LASP-2), the softmax layers use Ulysses. The longest length each reaches on a GPU is measured by
``benchmarks/offload.py`` and ``benchmarks/tiled_loss.py``: on an H100 capped at 24 GiB (Llama-3.2-1B shape, full
training, batch 1) checkpointing alone trains 65,536-token sequences, ``--activation-offload --tiled-mlp`` 131,072
(BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _documents(min_chars: int) -> list[str]:
    """Real text available offline: the Python standard library's larger source files, largest first."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.stat().st_size >= min_chars),
                   key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise SystemExit(f"no standard-library file has {min_chars} characters; lower --seq-len")
    return [p.read_text(errors="replace") for p in files]


# tiny random linear-attention hybrids (config class, model class, extra config) for LASP-2
TINY_HYBRIDS = {
    "tiny-minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", dict(num_local_experts=1, num_experts_per_tok=1,
                                                                 block_size=64)),
    "tiny-qwen3.5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)),
    "tiny-kimi-linear": ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
        linear_num_heads=4, linear_head_dim=32, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32, num_local_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
        n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


class ByteTokenizer:
    """Bytes as token ids (vocabulary 256): enough to train the tiny random model on real text."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


def build_model(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device), ByteTokenizer()
    if name in TINY_HYBRIDS:
        import transformers

        cfg_name, model_name, extra = TINY_HYBRIDS[name]
        cfg = getattr(transformers, cfg_name)(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1 << 20,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"], **extra)
        torch.manual_seed(0)
        return getattr(transformers, model_name)(cfg).to(device), ByteTokenizer()
    if name == "default":
        from longkit.models import default_model_dir

        name = str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(name)


def build_samples(tokenizer, seq_len: int, response_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` samples of ``seq_len`` tokens: document prefix (no loss) + continuation (loss)."""
    samples = []
    for text in _documents(seq_len * 2):
        ids = tokenizer.encode(text)
        for start in range(0, len(ids) - seq_len, seq_len):
            chunk = torch.tensor(ids[start:start + seq_len])
            labels = chunk.clone()
            labels[: seq_len - response_len] = -100
            samples.append({"input_ids": chunk, "labels": labels})
            if len(samples) == count:
                return samples
    if not samples:
        raise SystemExit(f"no document holds {seq_len} tokens; lower --seq-len")
    return samples


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "configs" / "ulysses_sp2_zero2.json"),
                    help="DeepSpeed JSON config with a \"longkit\" section")
    ap.add_argument("--model", default="tiny", help="'tiny' (random Llama, byte vocabulary), 'tiny-minimax' / "
                                                    "'tiny-qwen3.5' / 'tiny-kimi-linear' (random linear-attention "
                                                    "hybrids, for mode lasp2), 'default' (SmolLM2) or a model "
                                                    "directory")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--response-len", type=int, default=256, help="trained tokens at the end of each sample")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--sp-size", type=int, help="override the config's sequence_parallel.size (1: no Ulysses)")
    ap.add_argument("--activation-offload", action="store_true", help="offload each layer's saved tensors to the host")
    ap.add_argument("--tiled-loss", action="store_true", help="LM head + cross-entropy in token tiles (no full logits)")
    ap.add_argument("--tiled-mlp", action="store_true", help="each decoder layer's MLP in token tiles")
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = ap.parse_args(argv)

    import deepspeed
    import torch.distributed as dist

    import longkit
    from longkit.deepspeed_ext import initialize, parse_ds_config
    from longkit.deepspeed_ext.config import load_ds_config

    deepspeed.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, tokenizer = build_model(args.model, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = load_ds_config(args.config)
    section = config.setdefault("longkit", {})
    if args.sp_size is not None:
        section.setdefault("sequence_parallel", {"mode": "ulysses"})["size"] = args.sp_size
    if args.activation_offload:
        section["activation_offload"] = {}
    if args.tiled_loss or args.tiled_mlp:
        longkit.apply_patches(model, tiled_loss=args.tiled_loss or None, tiled_mlp=args.tiled_mlp or None)
    args.config = config
    sp_size = parse_ds_config(args.config).sequence_parallel.size
    dp = dist.get_world_size() // sp_size
    data = build_samples(tokenizer, args.seq_len, args.response_len, args.steps * dp)
    engine, _, loader, _, sp = initialize(model, args.config, model_parameters=model.parameters(),
                                          training_data=data, collate_fn=collate)
    rank = dist.get_rank()
    if rank == 0:
        print(f"world {dist.get_world_size()}, sequence-parallel size {sp_size}, {args.seq_len} tokens per sample, "
              f"{args.seq_len // sp_size} per rank", flush=True)
    losses = []
    for step, shard in enumerate(loader):
        t0 = time.perf_counter()
        loss = engine(**shard).loss  # the whole sample's loss, the same on every rank of the group
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if rank == 0:
            dt = time.perf_counter() - t0
            print(f"step {step}: loss {losses[-1]:.4f}  {args.seq_len * dp / dt / dist.get_world_size():.0f} "
                  "tokens/s per rank", flush=True)
        if step + 1 >= args.steps:
            break
    return losses


if __name__ == "__main__":
    main()
