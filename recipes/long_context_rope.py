"""Long-context fine-tune of a Hugging Face causal LM with a RoPE basis: linear, YaRN or Giraffe's power/truncated.

The model's RoPE type is switched with ``longkit.apply_patches(model, rope=RopeConfig(...))`` (Giraffe's types
are registered in transformers' rope-init table, so the fine-tuned model saves and loads as usual once
``longkit.register_rope_types()`` ran), then it is fine-tuned for a few steps on sequences longer than its
``max_position_embeddings`` (real text: the Python standard library's sources on this machine). Held-out
perplexity at the long length is printed before and after.

    # CPU, toy size (a tiny random Llama with a byte vocabulary "pretrained" for 128 positions), < 1 minute
    python recipes/long_context_rope.py --rope-type giraffe_truncated
    python recipes/long_context_rope.py --rope-type giraffe_power --power 0.5 --seq-len 512
    python recipes/long_context_rope.py --rope-type linear --factor 4
    # the embedded SmolLM2-135M-Instruct (8k positions) and its tokenizer, saved afterwards
    python recipes/long_context_rope.py --model default --rope-type giraffe_truncated --seq-len 16384 \\
        --steps 50 --save /tmp/smollm2-giraffe
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

ROPE_TYPES = ("linear", "yarn", "giraffe_power", "giraffe_truncated")


class ByteTokenizer:
    """Bytes as token ids (vocabulary 256): enough to train the tiny random model on real text."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


def _stdlib_texts(min_chars: int) -> list[tuple[str, str]]:
    """(name, text) of the standard library's source files of at least ``min_chars`` characters, largest first."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.stat().st_size >= min_chars),
                   key=lambda p: (-p.stat().st_size, p.name))
    if len(files) < 2:
        raise SystemExit(f"fewer than 2 standard-library files hold {min_chars} characters; lower --seq-len")
    return [(p.name, p.read_text(errors="replace")) for p in files]


def build_data(tokenizer, seq_len: int, train_count: int, eval_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows ``[N, seq_len]``: training ones from every file but the first, held-out ones from the first."""
    texts = _stdlib_texts(seq_len)
    held_out = tokenizer.encode(texts[0][1])
    windows = lambda ids, n: [ids[s:s + seq_len] for s in range(0, len(ids) - seq_len + 1, seq_len)][:n]  # noqa: E731
    evals = windows(held_out, eval_count)
    train: list[list[int]] = []
    for _, text in texts[1:]:
        train += windows(tokenizer.encode(text), train_count - len(train))
        if len(train) >= train_count:
            break
    if not evals or not train:
        raise SystemExit(f"not enough text for {seq_len}-token windows; lower --seq-len")
    return torch.tensor(train), torch.tensor(evals)


def build_model(name: str, train_len: int, device: torch.device):
    """(model, tokenizer, pretraining length). ``tiny``: a random Llama whose pretraining length is ``train_len``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=train_len)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device), ByteTokenizer()
    if name == "default":
        from longkit.models import load_default

        model, tok = load_default()
        return model.float().to(device), tok
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(name)


def rope_config(args: argparse.Namespace, train_len: int):
    """The :class:`longkit.RopeConfig` the arguments describe (options a type does not take are refused there)."""
    from longkit import RopeConfig

    factor = args.factor
    if factor is None and args.rope_type in ("linear", "yarn"):
        factor = max(1.0, args.seq_len / train_len)  # interpolate the long length into the pretrained range
    opts = {"factor": factor, "power": args.power, "a": args.a, "b": args.b, "rho": args.rho}
    return RopeConfig(args.rope_type, **{k: v for k, v in opts.items() if v is not None})


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int) -> float:
    """exp(mean next-token loss) over the windows ``[N, T]``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch].to(model.device)
        total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
        count += len(ids)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rope-type", choices=ROPE_TYPES, default="giraffe_truncated")
    ap.add_argument("--factor", type=float, help="linear scale (linear/yarn: default seq-len / pretraining length; "
                                                 "giraffe types: applied first, default 1)")
    ap.add_argument("--power", type=float, help="giraffe_power: f_i * (1 - 2i/d)^power (default 0.5)")
    ap.add_argument("--a", type=float, help="giraffe_truncated: frequencies <= a stop rotating (default b/8)")
    ap.add_argument("--b", type=float, help="giraffe_truncated: frequencies >= b are kept (default 2π / pretraining "
                                            "length)")
    ap.add_argument("--rho", type=float, help="giraffe_truncated: the frequency of the band between a and b "
                                              "(default b/16)")
    ap.add_argument("--model", default="tiny", help="'tiny' (random, byte vocabulary), 'default' (SmolLM2) or a "
                                                    "model directory")
    ap.add_argument("--train-len", type=int, default=128, help="the tiny model's pretraining length "
                                                              "(max_position_embeddings)")
    ap.add_argument("--seq-len", type=int, default=512, help="fine-tuning and evaluation length (beyond the model's "
                                                             "max_position_embeddings)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save", help="directory to save the fine-tuned model to (then reloaded as a check)")
    args = ap.parse_args(argv)

    import longkit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_model(args.model, args.train_len, device)
    train_len = int(model.config.max_position_embeddings)
    if args.seq_len <= train_len:
        print(f"note: --seq-len {args.seq_len} is within the model's {train_len} positions")
    rope = rope_config(args, train_len)
    longkit.apply_patches(model, rope=rope)  # resolves the defaults against the pretraining length
    model.config.max_position_embeddings = max(train_len, args.seq_len)  # the new context length, recorded on save
    print(f"{type(model).__name__}, pretrained length {train_len}, fine-tuning at {args.seq_len}; "
          f"rope_parameters {model.config.rope_parameters}")

    train, held_out = build_data(tokenizer, args.seq_len, args.steps * args.batch, args.eval_windows)
    before = perplexity(model, held_out, args.batch)
    print(f"held-out perplexity before: {before:.3f}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = train[(step * args.batch) % len(train):][:args.batch].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step}: loss {float(loss.detach()):.4f}")
    after = perplexity(model, held_out, args.batch)
    print(f"held-out perplexity after: {after:.3f}  ({args.steps} steps, {time.perf_counter() - t0:.1f} s)")

    if args.save:
        from transformers import AutoModelForCausalLM

        model.save_pretrained(args.save)
        longkit.register_rope_types()  # what any other process needs before from_pretrained
        reloaded = AutoModelForCausalLM.from_pretrained(args.save, dtype=torch.float32).to(device)
        print(f"saved to {args.save}; reloaded rope_type {reloaded.config.rope_parameters['rope_type']}, held-out "
              f"perplexity {perplexity(reloaded, held_out, args.batch):.3f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
