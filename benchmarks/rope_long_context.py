"""Held-out perplexity at 1x, 2x and 4x the pretraining length per RoPE type, after a short long-context fine-tune.

The model is the embedded default, SmolLM2-135M-Instruct (pretrained for ``P = 8192`` positions, RoPE base 1e5).
Every configuration starts from a freshly loaded copy:

* ``base`` (baseline): the unmodified model, no fine-tune: what the pretrained RoPE gives beyond ``P``;
* ``finetune_default`` (baseline): the same fine-tune as below with the model's own RoPE: what fine-tuning alone buys;
* ``linear``, ``yarn``, ``giraffe_power``, ``giraffe_truncated``: ``longkit.apply_patches(model,
  rope=RopeConfig(type))`` with recipes/long_context_rope.py's defaults (linear/yarn: ``factor = train-len / P``,
  2 by default; giraffe_power: ``power=0.5``; giraffe_truncated: ``b = 2π/P, a = b/8, rho = b/16``), then the fine-tune.

Fine-tune: full model, ``--steps`` AdamW steps (no weight decay, linear warm-up over the first 10% of steps, then
constant ``--lr``, gradient norm clipped to 1) on ``--batch`` windows of ``--train-len`` tokens (default ``2P``),
gradient checkpointing on. The default ``--lr 5e-5`` is a judgement, not a tuned value: PI and YaRN fine-tune 7B
models at 2e-5 for hundreds of steps; a 135M model tolerates more, and 30 steps need it to move at all. Weights,
gradients and optimizer state are fp32; on CUDA the forward runs under bf16 autocast (``--dtype bf16``, the default
there; ``--dtype fp32`` turns it off), on CPU in fp32.

Data (real text, offline): the Python standard library's top-level ``.py`` files on this machine, each tokenized
on its own and joined with a blank line. Held-out text: the largest files (``_pydecimal.py``, then ``turtle.py``,
... until ``--eval-windows x max(--eval-lens)`` tokens are there); training text: the other files, largest first;
the JSON lists both. Window ``i`` at length ``L`` is tokens ``[i*Lmax, i*Lmax + L)`` of the held-out stream, so
the shorter windows are prefixes of the longest ones (same starting points, the longer ones read on). Perplexity:
``exp`` of the mean next-token loss over all windows of that length (hidden states from one no-grad forward, the
cross-entropy through ``lm_head`` in chunks, so no full-length logits are kept).

    # CPU check of the script (< 1 min): a tiny random Llama, byte tokenizer, P=64, eval at 64/128/256, 3 steps
    python benchmarks/rope_long_context.py --dry-run --out-dir /tmp/rope_bench
    # the measurement (CUDA): fine-tune at 16384, evaluate at 8192/16384/32768 -> results/rope_long_context_<gpu>.json
    python benchmarks/rope_long_context.py
    python benchmarks/rope_long_context.py --types base finetune_default giraffe_truncated --steps 60

How to read it: one row per configuration, one ``ppl@L`` column per evaluation length (lower is better). The
``ppl@P`` column shows what a configuration costs inside the pretrained range; ``ppl@2P`` is the fine-tuning
length; ``ppl@4P`` is extrapolation beyond anything fine-tuned. A RoPE type is worth its patch where it beats
``finetune_default`` (same data, same steps) at ``2P``/``4P`` without losing much at ``P``; ``base`` shows how
far the pretrained model breaks beyond ``P``. ``loss_first``/``loss_last`` are the first and last training
losses (a diverging fine-tune shows there); ``train_s``/``eval_s`` are wall seconds. One run, one data order,
no repeats (the run-to-run spread is not measured): read differences of a few percent in perplexity with caution.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402

ROPE_TYPES = ("linear", "yarn", "giraffe_power", "giraffe_truncated")
CONFIGS = ("base", "finetune_default", *ROPE_TYPES)
DRY_PRETRAIN_LEN = 64
LOSS_CHUNK = 4096  # positions per lm_head + cross-entropy chunk in the evaluation


class ByteTokenizer:
    """Bytes as token ids (vocabulary 256), for the dry run's tiny random model."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``: the short name in the results file's name."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_model(dry_run: bool, device: torch.device) -> tuple[Any, Any]:
    """A freshly loaded fp32 ``(model, tokenizer)``: SmolLM2-135M-Instruct, or the dry run's tiny random Llama
    (always the same initial weights)."""
    if dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=DRY_PRETRAIN_LEN)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device), ByteTokenizer()
    from longkit.models import load_default

    return load_default(dtype=torch.float32, device=device)


def load_tokenizer(dry_run: bool) -> Any:
    """The tokenizer :func:`load_model` returns, without loading a model."""
    if dry_run:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from longkit.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    tok.model_max_length = 1 << 30  # whole files are tokenized at once; silence the "longer than" warning
    return tok


def rope_config(rope_type: str, train_len: int, pretrain_len: int):
    """recipes/long_context_rope.py's default :class:`longkit.RopeConfig` for ``rope_type`` (linear/yarn interpolate
    the fine-tuning length into the pretrained range; the Giraffe types take RopeConfig's own defaults)."""
    from longkit import RopeConfig

    if rope_type in ("linear", "yarn"):
        return RopeConfig(rope_type, factor=max(1.0, train_len / pretrain_len))
    return RopeConfig(rope_type)


def build_data(tokenizer: Any, train_tokens: int, held_out_tokens: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  dict[str, Any]]:
    """``(train [train_tokens], held_out [held_out_tokens], description)`` token streams from stdlib ``.py`` files.

    Held-out: the largest files until ``held_out_tokens`` are reached; training: the others, largest first, until
    ``train_tokens``. Files are tokenized one by one and joined with the tokens of a blank line.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: (-p.stat().st_size, p.name))
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    streams: dict[str, list[int]] = {"held_out": [], "train": []}
    names: dict[str, list[str]] = {"held_out": [], "train": []}
    wanted = {"held_out": held_out_tokens, "train": train_tokens}
    part = "held_out"
    for p in files:
        if len(streams[part]) >= wanted[part]:
            if part == "train":
                break
            part = "train"
        ids = tokenizer.encode(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        streams[part] += (sep if streams[part] else []) + ids
        names[part].append(p.name)
    for part, n in wanted.items():
        if len(streams[part]) < n:
            raise SystemExit(f"the standard library ({stdlib}) holds {len(streams[part])} {part} tokens, fewer than "
                             f"the {n} needed; lower --steps, --train-len, --eval-windows or --eval-lens")
    desc = {"source": f"python-stdlib ({stdlib}), top-level *.py, each file tokenized alone, joined by a blank line",
            "held_out_files": names["held_out"], "train_files": names["train"],
            "held_out_tokens_used": held_out_tokens, "train_tokens_used": train_tokens}
    return torch.tensor(streams["train"][:train_tokens]), torch.tensor(streams["held_out"][:held_out_tokens]), desc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor, amp: dict[str, Any]) -> float:
    """Summed next-token loss of one window ``ids [1, T]`` (``T - 1`` predictions).

    One forward of the decoder for the hidden states ``[1, T, H]``, then ``lm_head`` and the cross-entropy in chunks
    of :data:`LOSS_CHUNK` positions, so at most ``LOSS_CHUNK x vocab`` fp32 logits exist at a time.
    """
    with torch.autocast(**amp):
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    total = 0.0
    for s in range(0, ids.shape[1] - 1, LOSS_CHUNK):
        e = min(s + LOSS_CHUNK, ids.shape[1] - 1)
        with torch.autocast(**amp):
            logits = head(hidden[0, s:e])
        total += float(F.cross_entropy(logits.float(), ids[0, s + 1:e + 1], reduction="sum"))
    return total


def perplexities(model: Any, held_out: torch.Tensor, eval_lens: list[int], windows: int,
                 amp: dict[str, Any]) -> dict[int, float]:
    """``{L: exp(mean next-token loss)}`` over windows ``[i*Lmax, i*Lmax + L)``, ``i < windows``."""
    model.eval()
    stride, out = max(eval_lens), {}
    for L in eval_lens:
        nll = sum(window_nll(model, held_out[i * stride:i * stride + L][None].to(model.device), amp)
                  for i in range(windows))
        mean = nll / (windows * (L - 1))
        out[L] = math.inf if mean > 700 else math.exp(mean)  # a nan loss stays nan
    return out


def finetune(model: Any, train: torch.Tensor, args: argparse.Namespace, amp: dict[str, Any]) -> list[float]:
    """``args.steps`` AdamW steps on consecutive ``[batch, train_len]`` windows of ``train``; the losses."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    windows = train.view(-1, args.train_len)
    losses = []
    for step in range(args.steps):
        ids = windows[step * args.batch:(step + 1) * args.batch].to(model.device)
        with torch.autocast(**amp):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"    step {step}: loss {losses[-1]:.4f}", flush=True)
    model.gradient_checkpointing_disable()
    return losses


def run_config(name: str, args: argparse.Namespace, device: torch.device, pretrain_len: int, train: torch.Tensor,
               held_out: torch.Tensor, amp: dict[str, Any]) -> dict[str, Any]:
    """Load a fresh model, patch (RoPE types), fine-tune (all but ``base``), evaluate: one table row."""
    import longkit

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _ = load_model(args.dry_run, device)
    if name in ROPE_TYPES:
        longkit.apply_patches(model, rope=rope_config(name, args.train_len, pretrain_len))
        model.config.max_position_embeddings = max(pretrain_len, args.train_len)  # as the recipe records it
    row: dict[str, Any] = {"config": name, "rope_parameters": dict(model.config.rope_parameters)}
    print(f"[{name}] rope_parameters {row['rope_parameters']}", flush=True)
    torch.manual_seed(args.seed)
    losses: list[float] = []
    t1 = time.perf_counter()
    if name != "base":
        losses = finetune(model, train, args, amp)
    _sync(device)
    t2 = time.perf_counter()
    ppl = perplexities(model, held_out, args.eval_lens, args.eval_windows, amp)
    _sync(device)
    t3 = time.perf_counter()
    row.update({f"ppl@{L}": v for L, v in ppl.items()})
    row.update({"loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                "train_s": t2 - t1 if losses else None, "eval_s": t3 - t2, "total_s": t3 - t0, "train_losses": losses})
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"[{name}] " + "  ".join(f"ppl@{L} {v:.4g}" for L, v in ppl.items())
          + f"  (train {t2 - t1:.1f} s, eval {t3 - t2:.1f} s)", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to run")
    ap.add_argument("--train-len", type=int, help="fine-tuning length in tokens (default 2x the pretraining length)")
    ap.add_argument("--eval-lens", type=int, nargs="+", help="evaluation lengths (default 1x, 2x, 4x pretraining)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default 30; dry run 3)")
    ap.add_argument("--batch", type=int, default=1, help="windows per step")
    ap.add_argument("--lr", type=float, help="peak learning rate (default 5e-5; dry run 1e-3)")
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out windows per evaluation length")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="forward precision; weights stay fp32 (default: bf16 autocast on CUDA, fp32 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, a tiny random Llama with a byte tokenizer (pretraining length 64): checks the script")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, tag, pretrain_len = torch.device("cpu"), "cpu_dry_run", DRY_PRETRAIN_LEN
        steps, lr = 3, 1e-3
    else:
        from transformers import AutoConfig

        from longkit.models import default_model_dir

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tag = gpu_tag(torch.cuda.get_device_name(0)) if device.type == "cuda" else "cpu"
        model_cfg = AutoConfig.from_pretrained(default_model_dir(), local_files_only=True)
        pretrain_len = int(model_cfg.max_position_embeddings)
        steps, lr = 30, 5e-5
    args.steps = steps if args.steps is None else args.steps
    args.lr = lr if args.lr is None else args.lr
    args.train_len = 2 * pretrain_len if args.train_len is None else args.train_len
    args.eval_lens = sorted(set(args.eval_lens or [pretrain_len, 2 * pretrain_len, 4 * pretrain_len]))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": args.dtype == "bf16"}
    if min(args.steps, args.batch, args.eval_windows, args.train_len - 1, min(args.eval_lens) - 1) < 1:
        raise SystemExit("--steps, --batch and --eval-windows must be >= 1, --train-len and --eval-lens >= 2")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")

    tokenizer = load_tokenizer(args.dry_run)
    train, held_out, data = build_data(tokenizer, args.steps * args.batch * args.train_len,
                                       args.eval_windows * max(args.eval_lens))
    print(f"pretraining length {pretrain_len}; fine-tune at {args.train_len} for {args.steps} steps (lr {args.lr}, "
          f"{args.dtype}); eval at {args.eval_lens} on {args.eval_windows} windows of {data['held_out_files']}",
          flush=True)
    name = f"rope_long_context_{tag}"
    extra = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "model": "tiny random Llama (dry run)" if args.dry_run else "SmolLM2-135M-Instruct (longkit default)",
             "pretrain_len": pretrain_len, "data": data,
             "precision": "fp32 weights and AdamW state; forward "
                          + ("bf16 autocast" if args.dtype == "bf16" else "fp32"),
             "optimizer": "AdamW, weight decay 0, linear warm-up over max(1, steps // 10) steps then constant lr, "
                          "grad-norm clip 1.0, gradient checkpointing"}
    rows: list[dict[str, Any]] = []
    path = Path()
    for cfg in [c for c in CONFIGS if c in args.types]:
        rows.append(run_config(cfg, args, device, pretrain_len, train, held_out, amp))
        path = save_results(name, rows, extra, args.out_dir)  # after every config: a cut-short run keeps its rows
    print_table(rows, ["config", *(f"ppl@{L}" for L in args.eval_lens), "loss_first", "loss_last", "train_s"],
                title=f"held-out perplexity ({tag}; pretraining length {pretrain_len}, fine-tuned at "
                      f"{args.train_len} for {args.steps} steps)")
    return path


if __name__ == "__main__":
    main()
