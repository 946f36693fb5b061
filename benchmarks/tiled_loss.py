"""LM head + cross-entropy, forward and backward: peak memory and time of the full-logits loss vs tiled ones.

One GPU, one process, the same ``hidden [N, H]`` (bf16, requires grad), ``weight [V, H]`` (bf16, requires grad) and
labels (2% ignored, -100) for every method; the loss is the mean over the labels that count and ``backward()``
fills ``hidden.grad`` and ``weight.grad``. Methods:

* ``hf_full_logits`` (baseline): transformers' path, ``logits = F.linear(hidden, weight)`` (bf16, ``[N, V]``), then
  ``transformers.loss.loss_utils.ForCausalLMLoss`` (fp32 upcast of the logits, ``F.cross_entropy``);
* ``deepspeed_tiled``: DeepSpeed's ``TiledFusedLogitsLoss`` (``runtime/sequence_parallel/ulysses_sp.py``), the
  installed version's signature ``apply(fn, self, x, y, mask, shards, compute_params, output_reduction)``, with
  ``shards = ceil(N / chunk)`` (the same tokens per tile as longkit) and ``fn`` = the baseline's math on one shard
  (``F.linear`` + fp32 ``cross_entropy``, summed and divided by the global count, ``output_reduction="sum"``: its
  backward runs inside its forward and does not rescale the weight gradient by the incoming gradient, so the
  normalisation has to be inside ``fn`` for correct gradients). Skipped with a note when DeepSpeed is not
  importable;
* ``trl_chunked``: TRL's ``ChunkedLogProbFunction`` (``trl/kernels/chunked_logprob.py``, the kernel behind TRL's
  fused LM head): per-token log-probs in 4096-token × ``--trl-vocab-chunk`` (32768, TRL's own setting) tiles, fp32
  gradient accumulation, Triton on CUDA; the loss is ``-Σ logp[valid] / count``, as TRL's fused head computes it.
  Skipped with a note when TRL is not importable;
* ``longkit``: :func:`longkit.kernels.tiled_ce.tiled_cross_entropy` (``recompute=True``, the default: the logits
  are recomputed in backward, 4 GEMMs per tile), ``chunk_size=--chunk``;
* ``longkit_fwd_grad``: the same with ``recompute=False`` (gradients computed in the forward and held: 3 GEMMs).

Measured per method and token count (N = 8k, 16k, ... doubling up to ``--max-tokens``; a method that runs out of
memory is recorded as ``OOM`` and not tried at larger N): ``ms`` (median over ``--reps`` timed steps after one
warm-up, ``torch.cuda.synchronize()`` around each step), ``peak_gib`` (``torch.cuda.max_memory_allocated`` during
the warm-up step minus what was allocated before it: ``hidden``, ``weight`` and labels excluded; the logits, tiles,
saved tensors and both gradients included), ``TFLOP/s`` counted as ``6·N·V·H`` (the useful forward + backward GEMM
work; recomputing methods do more), and ``full_logits_gib`` (``N·V·4`` bytes, the fp32 logits the baseline holds).
Before timing, each method's loss and gradients are compared with the baseline's at ``--check-tokens`` tokens
(``check`` rows: loss difference, and each gradient's error norm over the baseline gradient's norm).

    PYTHONPATH=. python benchmarks/tiled_loss.py                       # V=128256, H=4096, bf16, 8k..128k tokens
    PYTHONPATH=. python benchmarks/tiled_loss.py --chunk 2048 --max-tokens 32768
    python benchmarks/tiled_loss.py --dry-run --out-dir /tmp/tl        # CPU, tiny sizes: checks the script
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from longkit.kernels.tiled_ce import tiled_cross_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# loss(hidden, weight, labels) -> 0-dim loss whose backward() fills hidden.grad and weight.grad
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------- methods
def hf_full_logits() -> LossFn:
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, w)
        return ForCausalLMLoss(logits, None, w.shape[0], shift_labels=y)

    return loss


def deepspeed_tiled(chunk: int) -> LossFn:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count = (y != -100).sum()

        def fn(_self: object, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = F.linear(x, w).float()
            return F.cross_entropy(logits, t, ignore_index=-100, reduction="sum") / count

        shards = max(1, math.ceil(h.shape[0] / chunk))
        return TiledFusedLogitsLoss.apply(fn, None, h[None], y[None], None, shards, [w], "sum")

    return loss


def trl_chunked(vocab_chunk: int) -> LossFn:
    from trl.kernels import ChunkedLogProbFunction

    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        valid = y != -100
        logp = ChunkedLogProbFunction.apply(h, w, None, y.clamp(min=0), 1.0, vocab_chunk, None, 1.0, ())[0]
        return -(logp * valid).sum() / valid.sum()

    return loss


def longkit(chunk: int, recompute: bool) -> LossFn:
    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return tiled_cross_entropy(h, w, y, chunk_size=chunk, recompute=recompute)

    return loss


def build_methods(args: argparse.Namespace) -> tuple[dict[str, LossFn], dict[str, str]]:
    """The methods that can run here, and a note for each one skipped."""
    methods: dict[str, LossFn] = {"hf_full_logits": hf_full_logits()}
    notes: dict[str, str] = {}
    for name, make in (("deepspeed_tiled", lambda: deepspeed_tiled(args.chunk)),
                       ("trl_chunked", lambda: trl_chunked(args.trl_vocab_chunk))):
        try:
            methods[name] = make()
        except Exception as e:  # noqa: BLE001 - an optional baseline that does not import is skipped, with the reason
            notes[name] = f"skipped: {type(e).__name__}: {e}"
    methods["longkit"] = longkit(args.chunk, True)
    methods["longkit_fwd_grad"] = longkit(args.chunk, False)
    return methods, notes


# ----------------------------------------------------------------------------- measuring
def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(n)
    hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=gen) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    labels[torch.rand(n, device=device, generator=gen) < 0.02] = -100
    return hidden, weight, labels


def step(fn: LossFn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: LossFn, inputs: tuple[torch.Tensor, ...], reps: int, device: str) -> dict[str, Any]:
    """Peak memory of one (warm-up) step beyond the inputs, then the median time of ``reps`` steps."""
    hidden, weight, labels = inputs
    hidden.grad = weight.grad = None
    peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    step(fn, *inputs)
    sync(device)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step(fn, *inputs)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_gib": peak}


def check_rows(methods: dict[str, LossFn], n: int, args: argparse.Namespace, dtype: torch.dtype,
               device: str) -> list[dict[str, Any]]:
    """Each method's loss and gradients vs the baseline's on one input."""
    inputs = make_inputs(n, args.hidden, args.vocab, dtype, device)
    want = step(methods["hf_full_logits"], *inputs)
    want_g = [t.grad.float().clone() for t in inputs[:2]]
    rows = []
    for name, fn in methods.items():
        got = step(fn, *inputs)
        errs = [((t.grad.float() - g).norm() / g.norm()).item() for t, g in zip(inputs[:2], want_g)]
        rows.append({"method": name, "tokens": n, "loss": got.item(), "loss_diff": abs(got.item() - want.item()),
                     "dhidden_rel": errs[0], "dweight_rel": errs[1]})
        inputs[0].grad = inputs[1].grad = None
    del inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--min-tokens", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=131072, help="doubling from --min-tokens up to this")
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per tile (longkit, DeepSpeed's shards)")
    ap.add_argument("--trl-vocab-chunk", type=int, default=32768, help="TRL's vocabulary tile (its own default)")
    ap.add_argument("--check-tokens", type=int, default=4096, help="tokens of the correctness check")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (V=512, H=64, 256..512 tokens)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, tag = "cpu", "cpu_dry_run"
        args.vocab, args.hidden, args.min_tokens, args.max_tokens = 512, 64, 256, 512
        args.chunk, args.trl_vocab_chunk, args.check_tokens, args.reps = 96, 200, 200, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run for a CPU check of the script)")
        device, tag = "cuda", gpu_tag(torch.cuda.get_device_name(0))
    dtype = DTYPES[args.dtype]
    methods, notes = build_methods(args)
    for name, note in notes.items():
        print(f"{name}: {note}")

    checks = check_rows(methods, args.check_tokens, args, dtype, device)
    print_table(checks, ["method", "tokens", "loss", "loss_diff", "dhidden_rel", "dweight_rel"],
                title="check: loss and gradients vs hf_full_logits (gradients: |error| / |baseline|)")

    rows: list[dict[str, Any]] = []
    out_of_memory: set[str] = set()
    n = args.min_tokens
    while n <= args.max_tokens:
        inputs = make_inputs(n, args.hidden, args.vocab, dtype, device)
        for name, fn in methods.items():
            row: dict[str, Any] = {"method": name, "tokens": n, "full_logits_gib": n * args.vocab * 4 / 2**30}
            if name in out_of_memory:
                continue
            try:
                row.update(measure(fn, inputs, args.reps, device))
                row["TFLOP/s"] = 6 * n * args.vocab * args.hidden / row["ms"] / 1e9
                row["status"] = "ok"
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                out_of_memory.add(name)
                row["status"] = "OOM"
            inputs[0].grad = inputs[1].grad = None
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
        del inputs
        n *= 2

    print_table(rows, ["method", "tokens", "status", "ms", "peak_gib", "TFLOP/s", "full_logits_gib"],
                title=f"LM head + CE fwd+bwd, V={args.vocab} H={args.hidden} {args.dtype}, chunk {args.chunk} ({tag})")
    if device != "cuda":
        notes["peak_gib"] = "measured on CUDA only (torch.cuda.max_memory_allocated); empty in a CPU dry run"
    if notes:
        print("\n".join(f"note: {k}: {v}" for k, v in notes.items()))
    save_results(f"tiled_loss_{tag}", rows, {"checks": checks, "notes": notes,
                                             "args": {k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()}}, args.out_dir)


if __name__ == "__main__":
    main()
