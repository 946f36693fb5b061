"""Training-step throughput and peak memory: stock forward vs longkit prefix sharing vs prefix sharing + packing.

One GPU, one process, the same random-weight model and the same batches for every method:

* ``stock`` (baseline, its fastest honest configuration on one H100 with TRL 1.16's defaults): the model loaded
  with ``attn_implementation='sdpa'`` (``--stock-attn flash_attention_2`` where ``flash_attn`` is importable),
  the padded batch exactly as TRL's collators build it;
* ``longkit``: ``longkit.apply_patches(model, prefix_sharing=PrefixSharingConfig(pack=False))`` on the policy and
  the reference model (what ``PrefixSharingDPOTrainer`` / ``PrefixSharingGRPOTrainer`` install): every shared
  prompt is computed once, one padded row per group;
* ``longkit_pack``: the same with ``PrefixSharingConfig(pack=True)``: all groups in one packed row, no padding.

The JSON records which stock attention ran (``stock_attn``); the committed results used ``sdpa`` unless their
``stock_attn`` says otherwise.

What is timed (the part of a training step that prefix sharing changes), per step, ``torch.cuda.synchronize()``
before and after, median over ``--steps`` timed steps after ``--warmup`` steps:

* DPO: the reference model's forward under ``no_grad`` (a copy of the policy's initial weights, as TRL's reload
  from the policy's path gives; with LoRA the policy with its adapters disabled, as TRL does), then the policy's
  forward, the sigmoid DPO loss on summed completion log-probs, and ``backward()``;
* GRPO: the policy's forward, TRL's default ``dapo`` loss (per-token ``-exp(logp - logp.detach()) * advantage``,
  summed over completion tokens / their count) and ``backward()``; no reference forward at TRL 1.16's default
  ``beta=0`` (``--grpo-beta > 0`` adds the reference forward and the k3 KL term). Generation, rewards and
  advantages are not timed: every batch is pre-built (random advantages), so generation cannot dominate.

Not timed, identical for every method: the optimizer step and ``zero_grad`` (O(parameters), independent of the
batch). Each forward is TRL's fused-LM-head path written out without TRL: the backbone (``model.base_model``,
what longkit patches) gives hidden states ``[rows, L, H]``; the positions whose next token is a completion token
go through the LM head in chunks of ``--logprob-chunk`` tokens (a small autograd function here, the same for every
method: bf16 GEMM, fp32 log-softmax, logits recomputed in backward, never ``[rows, L, vocab]``). Gradient
checkpointing is on (TRL's default; ``--no-grad-ckpt`` turns it off). The benchmark needs neither TRL nor PEFT
(PEFT only for LoRA: ``--shape 8b`` or ``--lora``; without PEFT those runs are refused with a message).

Model: a random-weight Llama (bf16, built from a ``LlamaConfig`` on the GPU; speed does not depend on the weights).
``--shape 1b`` (default): Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 128256, tied embeddings), full fine-tune; ``--shape 8b``: Llama-3-8B's shape (hidden 4096, 32 layers,
intermediate 14336, untied), LoRA r=16 on every projection (PEFT), results named ``..._8b``.

Data: synthetic token ids drawn uniformly from the model's vocabulary (ids >= 4, 0 = padding): what a word-level
tokenizer whose vocabulary is the model's gives, without text (nothing here reads text, and speed does not depend
on the ids). Lengths are drawn from log-normal distributions whose medians follow public sets; the shapes are
approximations chosen by hand, not fitted to the sets:

* ``dpo_short`` (UltraFeedback-like preference pairs): prompt median 150 tokens (sigma 1.0, 16..1024), chosen and
  rejected responses median 250 each (sigma 0.6, 16..1024), 8 pairs per batch (TRL's default batch size), each
  row cut to TRL's default ``max_length=1024`` (``keep_start``);
* ``dpo_long`` (long-document preference pairs, e.g. summarisation / QA over a document): prompt median 4096
  (sigma 0.35, 2048..8192), responses median 300 (sigma 0.5, 32..1024), 4 pairs per batch, ``max_length=8192``;
* ``grpo_math`` (GSM8K/MATH-style few-shot prompts): prompt median 1000 (sigma 0.25, 600..2000), G=8 completions
  per prompt, median 200 (sigma 0.5, 16..512 = TRL's default ``max_completion_length``), 2 prompts per batch
  (16 completions); the prompt is >= 4x a completion at the medians.

Batch layouts are TRL 1.16's: DPO ``prompt+chosen`` rows of every pair, then ``prompt+rejected`` rows, right
padded; GRPO each left-padded prompt repeated G times (consecutive rows), then the right-padded completions.

Columns: ``samples/s`` (DPO: preference pairs, GRPO: completions per second), ``tokens/s`` (non-padding tokens of
the batch per second: the same numerator for every method), ``speedup`` (samples/s over stock's), ``peak_gib``
(``torch.cuda.max_memory_allocated`` over the method's steps, reset per method; the policy's and the reference's
weights and the gradients included, no optimizer state), ``tok_computed`` (per step, policy forward: stock
computes the padded ``rows x L``, longkit the packed rows of its ``last_plan``), ``tok_in_batch`` (non-padding
tokens), ``max_dlogp`` (max |log-prob difference| to stock over the completion tokens of the first batch, a no-grad
forward; expected around 1e-2 in bf16, ~1e-6 in fp32: a check that the methods compute the same thing, not an
assertion).

    # CPU check (< 1 min): a tiny random Llama (2 layers, hidden 64), tiny lengths, fp32, 1 timed step
    python benchmarks/prefix_sharing.py --dry-run --out-dir /tmp/ps_bench
    # the measurement (one GPU): -> results/prefix_sharing_<gpu>.json
    python benchmarks/prefix_sharing.py
    python benchmarks/prefix_sharing.py --shape 8b                      # needs peft; -> prefix_sharing_<gpu>_8b
    python benchmarks/prefix_sharing.py --datasets dpo_long --methods stock longkit_pack --steps 10
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import random
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from benchmarks.rope_long_context import gpu_tag  # noqa: E402

METHODS = ("stock", "longkit", "longkit_pack")
FIRST_ID = 4  # ids 0..3: pad/eos/bos/unk of a word-level tokenizer; the data uses the rest


@dataclass(frozen=True)
class DataSpec:
    """Length distributions and batch shape of one synthetic dataset (log-normal lengths, clipped)."""

    name: str
    kind: str  # "dpo" or "grpo"
    prompt: tuple[int, float, int, int]  # median, sigma, min, max
    completion: tuple[int, float, int, int]
    prompts_per_batch: int
    per_prompt: int  # DPO: 2 (chosen, rejected); GRPO: G
    max_length: int | None  # DPO: each row cut to this (TRL's keep_start); GRPO: no cut
    mirrors: str


DATASETS = {
    "dpo_short": DataSpec("dpo_short", "dpo", (150, 1.0, 16, 1024), (250, 0.6, 16, 1024), 8, 2, 1024,
                          "UltraFeedback-like preference pairs"),
    "dpo_long": DataSpec("dpo_long", "dpo", (4096, 0.35, 2048, 8192), (300, 0.5, 32, 1024), 4, 2, 8192,
                         "long-document preference pairs"),
    "grpo_math": DataSpec("grpo_math", "grpo", (1000, 0.25, 600, 2000), (200, 0.5, 16, 512), 2, 8, None,
                          "GSM8K/MATH-style few-shot prompts, G=8"),
}
DRY_DATASETS = {
    "dpo_short": DataSpec("dpo_short", "dpo", (24, 0.5, 16, 64), (12, 0.5, 2, 32), 4, 2, 80, "dry run"),
    "dpo_long": DataSpec("dpo_long", "dpo", (128, 0.3, 96, 192), (16, 0.5, 4, 48), 2, 2, 256, "dry run"),
    "grpo_math": DataSpec("grpo_math", "grpo", (64, 0.25, 48, 96), (12, 0.5, 2, 24), 2, 8, None, "dry run"),
}

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=131072),
    "dry": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- data
@dataclass
class Batch:
    """One training batch in TRL's layout. ``labels``: the token where it is a completion token, else -100."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L]
    advantages: torch.Tensor  # [N] (GRPO; zeros for DPO)
    samples: int  # DPO: pairs; GRPO: completions

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.advantages.to(device), self.samples)


def _length(rng: random.Random, spec: tuple[int, float, int, int]) -> int:
    median, sigma, lo, hi = spec
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def dpo_batch(spec: DataSpec, rng: random.Random, vocab: int) -> Batch:
    """TRL's ``DataCollatorForPreference``: ``prompt+chosen`` rows, then ``prompt+rejected`` rows, each cut to
    ``max_length`` (keep_start), right padded; labels on the completion tokens."""
    chosen, rejected = [], []
    for _ in range(spec.prompts_per_batch):
        p = _tokens(rng, _length(rng, spec.prompt), vocab)
        for out in (chosen, rejected):
            c = _tokens(rng, _length(rng, spec.completion), vocab)
            out.append(((p + c)[:spec.max_length], len(p)))
    rows = chosen + rejected
    width = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, plen) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, plen:len(r)] = ids[i, plen:len(r)]
    return Batch(ids, mask, labels, torch.zeros(len(rows)), spec.prompts_per_batch)


def grpo_batch(spec: DataSpec, rng: random.Random, vocab: int) -> Batch:
    """TRL's GRPO layout: each prompt left-padded to the longest prompt and repeated G times (consecutive rows),
    then the right-padded completions; labels on the completion tokens; group-normalised random advantages."""
    prompts = [_tokens(rng, _length(rng, spec.prompt), vocab) for _ in range(spec.prompts_per_batch)]
    comps = [[_tokens(rng, _length(rng, spec.completion), vocab) for _ in range(spec.per_prompt)] for _ in prompts]
    pw, cw = max(map(len, prompts)), max(len(c) for cs in comps for c in cs)
    n = len(prompts) * spec.per_prompt
    ids = torch.zeros(n, pw + cw, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for g, (p, cs) in enumerate(zip(prompts, comps)):
        for k, c in enumerate(cs):
            i = g * spec.per_prompt + k
            ids[i, pw - len(p):pw], mask[i, pw - len(p):pw] = torch.tensor(p), 1
            ids[i, pw:pw + len(c)], mask[i, pw:pw + len(c)] = torch.tensor(c), 1
            labels[i, pw:pw + len(c)] = ids[i, pw:pw + len(c)]
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    rewards = torch.rand(len(prompts), spec.per_prompt, generator=gen)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return Batch(ids, mask, labels, adv.reshape(-1), n)


def make_batches(spec: DataSpec, count: int, vocab: int, seed: int) -> list[Batch]:
    rng = random.Random(f"{seed}-{spec.name}")
    build = dpo_batch if spec.kind == "dpo" else grpo_batch
    return [build(spec, rng, vocab) for _ in range(count)]


# ----------------------------------------------------------------------------- log-probs (TRL's fused head, no TRL)
class ChunkedLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[targets]`` per token, ``chunk`` tokens at a time; the backward recomputes
    each chunk's logits, so no ``[tokens, vocab]`` tensor outlives a chunk. GEMMs in the weights' dtype, softmax
    in fp32, the weight gradient accumulated in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # noqa: ANN401
                chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None])[:, 0] - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN401
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            g = (h @ weight.t()).float().softmax(-1).neg_()  # d logp[t] / d logits = onehot(t) - softmax
            g[torch.arange(len(t), device=g.device), t] += 1
            g = g.mul_(grad[s:s + ctx.chunk, None]).to(hidden.dtype)
            if need_h:
                gh[s:s + ctx.chunk] = g @ weight
            if need_w:
                gw += (g.t() @ h).float()
        return gh, None if gw is None else gw.to(weight.dtype), None, None


def token_logps(model: Any, batch: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN401
    """Per completion token of ``batch``: the log-prob of its token under ``model`` (flat ``[M]``, fp32) and its row.

    The backbone (``model.base_model``, patched or not) runs on the whole batch; only positions whose next token
    is labelled go through the LM head (TRL's fused head does the same)."""
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              use_cache=False).last_hidden_state
    labels = batch.labels[:, 1:]
    keep = labels != -100
    rows = keep.nonzero()[:, 0]
    weight = model.get_output_embeddings().weight
    return ChunkedLogProbs.apply(hidden[:, :-1][keep], weight, labels[keep], chunk), rows


def _row_sums(lp: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


# ----------------------------------------------------------------------------- models
class Models:
    """The policy (a transformers CausalLM, possibly inside PEFT) and how to run the reference forward."""

    def __init__(self, shape: str, lora: bool, dtype: torch.dtype, attn: str, device: torch.device, seed: int,
                 grad_ckpt: bool) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(**SHAPES[shape], attention_dropout=0.0)
        torch.manual_seed(seed)
        with torch.device(device):
            self.hf = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
        self.peft = None
        self.ref = None
        if lora:
            from peft import LoraConfig, get_peft_model

            self.peft = get_peft_model(self.hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=LORA_TARGETS))
            self.hf = self.peft.get_base_model()  # LoRA layers are injected in place: calling hf runs them
        else:
            self.ref = copy.deepcopy(self.hf).eval().requires_grad_(False)
        if grad_ckpt:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf.train()
        self.params = [p for p in self.hf.parameters() if p.requires_grad]

    def patch(self, cfg: Any) -> None:  # noqa: ANN401
        import longkit

        for m in (self.hf, self.ref):
            if m is not None:
                longkit.remove_patches(m)
                if cfg is not None:
                    longkit.apply_patches(m, prefix_sharing=cfg)

    def reference(self) -> tuple[Any, AbstractContextManager]:  # noqa: ANN401
        """(model, context) of the reference forward: the frozen copy, or the policy with its adapters off."""
        if self.peft is not None:
            return self.hf, self.peft.disable_adapter()
        return self.ref, nullcontext()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def train_step(models: Models, batch: Batch, spec: DataSpec, args: argparse.Namespace) -> torch.Tensor:
    """The timed part of one training step (see the module docstring); returns the loss (detached)."""
    n = batch.input_ids.shape[0]
    ref_lp = None
    if spec.kind == "dpo" or args.grpo_beta > 0:
        ref, ctx = models.reference()
        with torch.no_grad(), ctx:
            ref_lp, _ = token_logps(ref, batch, args.logprob_chunk)
    lp, rows = token_logps(models.hf, batch, args.logprob_chunk)  # the policy's forward last: its plan is kept
    if spec.kind == "dpo":
        pol, ref_s = _row_sums(lp, rows, n), _row_sums(ref_lp, rows, n)
        half = n // 2
        margin = (pol[:half] - ref_s[:half]) - (pol[half:] - ref_s[half:])
        loss = -F.logsigmoid(args.dpo_beta * margin).mean()
    else:
        per_tok = -torch.exp(lp - lp.detach()) * batch.advantages[rows]
        if ref_lp is not None:
            d = ref_lp - lp
            per_tok = per_tok + args.grpo_beta * (torch.exp(d) - d - 1)
        loss = per_tok.sum() / max(1, lp.numel())
    loss.backward()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # (gc.collect costs seconds with transformers imported: only where memory is measured)
        gc.collect()
        torch.cuda.empty_cache()


def run_method(models: Models, method: str, spec: DataSpec, batches: list[Batch], stock_lp: torch.Tensor | None,
               args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm-up and timed steps of one method on one dataset: one table row (and the first batch's log-probs)."""
    from longkit.hf_patches.prefix_sharing import PrefixSharingConfig
    from longkit.hf_patches.prefix_sharing.patch import last_plan

    cfg = None if method == "stock" else PrefixSharingConfig(min_shared_tokens=args.min_shared_tokens,
                                                             pack=method == "longkit_pack")
    models.patch(cfg)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():  # the consistency check: first batch, no grad, same weights for every method
        lp0 = token_logps(models.hf, batches[0], args.logprob_chunk)[0].float()
    diff = None if stock_lp is None else float((lp0 - stock_lp).abs().max())
    times, computed, losses = [], [], []
    for i, batch in enumerate(batches):
        models.zero_grad()
        _sync(device)
        t0 = time.perf_counter()
        losses.append(train_step(models, batch, spec, args))
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            plan = last_plan(models.hf) if cfg is not None else None
            computed.append(batch.input_ids.numel() if plan is None else plan.input_ids.numel())
    models.zero_grad()
    timed = batches[args.warmup:]
    step_s = statistics.median(times)
    samples = statistics.mean(b.samples for b in timed)
    valid = statistics.mean(int(b.attention_mask.sum()) for b in timed)
    row: dict[str, Any] = {
        "dataset": spec.name, "method": method,
        "attention": args.stock_attn if method == "stock" else f"longkit masked_attention ({args.kernel})",
        "samples_per_s": samples / step_s, "tokens_per_s": valid / step_s, "speedup": None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "tok_computed": statistics.mean(computed), "tok_in_batch": valid,
        "tok_padded": statistics.mean(b.input_ids.numel() for b in timed),
        "rows": timed[0].input_ids.shape[0], "samples": samples, "max_dlogp": diff,
        "step_ms_median": 1000 * step_s, "step_ms": [1000 * t for t in times],
        "loss_first": float(losses[0]),
    }
    print(f"  [{spec.name}] {method:12s} {1000 * step_s:9.1f} ms/step  {row['samples_per_s']:8.2f} samples/s  "
          f"computed {row['tok_computed']:.0f} / {valid:.0f} tokens"
          + (f"  peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else "")
          + (f"  max|dlogp| {diff:.2e}" if diff is not None else ""), flush=True)
    return row, lp0


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b", help="Llama-3.2-1B or Llama-3-8B shapes")
    ap.add_argument("--lora", action="store_true", help="LoRA r=16 on every projection (PEFT; always on for 8b)")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--stock-attn", choices=["sdpa", "flash_attention_2"], default="sdpa",
                    help="the stock model's attention (flash_attention_2 needs flash_attn)")
    ap.add_argument("--prompts-per-batch", type=int, help="override every dataset's prompts (pairs) per batch")
    ap.add_argument("--warmup", type=int, help="untimed steps per method (default 2; dry run 1)")
    ap.add_argument("--steps", type=int, help="timed steps per method (default 5; dry run 1)")
    ap.add_argument("--min-shared-tokens", type=int, default=16)
    ap.add_argument("--logprob-chunk", type=int, help="tokens per LM-head chunk (default 2048; dry run 64)")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--grpo-beta", type=float, default=0.0,
                    help="KL coefficient; > 0 adds the reference forward to the GRPO step (TRL 1.16 default 0)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny random Llama (2 layers, hidden 64), tiny lengths, fp32: checks the script")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, shape, dtype, specs, tag = torch.device("cpu"), "dry", torch.float32, DRY_DATASETS, "cpu_dry_run"
        warmup, steps, chunk = 1, 1, 64
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the measurement needs a CUDA GPU; use --dry-run to check the script on CPU")
        device, shape, dtype, specs = torch.device("cuda"), args.shape, torch.bfloat16, DATASETS
        tag = gpu_tag(torch.cuda.get_device_name(0)) + ("_8b" if shape == "8b" else "")
        warmup, steps, chunk = 2, 5, 2048
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    args.logprob_chunk = chunk if args.logprob_chunk is None else args.logprob_chunk
    if min(args.steps, args.logprob_chunk, args.prompts_per_batch or 1) < 1 or args.warmup < 0:
        raise SystemExit("--steps, --logprob-chunk and --prompts-per-batch must be >= 1, --warmup >= 0")
    lora = args.lora or args.shape == "8b"
    if lora and importlib.util.find_spec("peft") is None:
        raise SystemExit("skipped: LoRA (--shape 8b / --lora) needs peft, which is not installed (pip install peft); "
                         "the full fine-tune of --shape 1b needs nothing more")
    if args.stock_attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("--stock-attn flash_attention_2 needs the flash_attn package; use sdpa")
    args.kernel = "triton" if device.type == "cuda" else "naive"
    if args.prompts_per_batch:
        specs = {k: DataSpec(**{**asdict(v), "prompts_per_batch": args.prompts_per_batch}) for k, v in specs.items()}

    print(f"building the {shape} model ({'LoRA' if lora else 'full fine-tune'}, {dtype}, {args.stock_attn}) on "
          f"{device}", flush=True)
    models = Models(shape, lora, dtype, args.stock_attn, device, args.seed, not args.no_grad_ckpt)
    name = f"prefix_sharing_{tag}"
    extra = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"shape": shape, **SHAPES[shape], "dtype": str(dtype), "lora": lora,
                  "lora_config": {"r": 16, "alpha": 32, "targets": LORA_TARGETS} if lora else None,
                  "gradient_checkpointing": not args.no_grad_ckpt,
                  "trainable_params": sum(p.numel() for p in models.params)},
        "stock_attn": args.stock_attn,
        "datasets": {k: asdict(specs[k]) for k in args.datasets},
        "timed": "per step: reference forward (no grad; DPO, or GRPO with --grpo-beta > 0) + policy forward + loss "
                 "+ backward; chunked LM-head log-probs on completion tokens; optimizer step excluded",
    }
    rows: list[dict[str, Any]] = []
    path = None
    for ds in args.datasets:
        spec = specs[ds]
        batches = [b.to(device) for b in
                   make_batches(spec, args.warmup + args.steps, SHAPES[shape]["vocab_size"], args.seed)]
        stock_lp, ds_rows = None, []
        for method in [m for m in METHODS if m in args.methods]:
            try:
                row, lp0 = run_method(models, method, spec, batches, stock_lp, args, device)
            except torch.cuda.OutOfMemoryError as e:  # a result too: stock may not fit where longkit does
                models.zero_grad()
                row, lp0 = {"dataset": ds, "method": method, "error": f"OOM: {str(e).splitlines()[0]}"}, None
                print(f"  [{ds}] {method}: out of memory", flush=True)
            if method == "stock":
                stock_lp = lp0
            ds_rows.append(row)
        base = next((r for r in ds_rows if r["method"] == "stock" and "error" not in r), None)
        for r in ds_rows:
            if base is not None and "error" not in r:
                r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        rows += ds_rows
        models.patch(None)
        del batches
        _free(device)
        path = save_results(name, rows, extra, args.out_dir)  # after every dataset: a cut-short run keeps its rows
    print_table(rows, ["dataset", "method", "samples_per_s", "tokens_per_s", "speedup", "peak_gib", "tok_computed",
                       "tok_in_batch", "max_dlogp"],
                title=f"prefix sharing, training step ({tag}; {shape}{' LoRA' if lora else ''}, {dtype}, stock "
                      f"attention {args.stock_attn})")
    return path


if __name__ == "__main__":
    main()
