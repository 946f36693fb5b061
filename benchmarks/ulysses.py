"""Ulysses sequence-parallel training throughput: no SP vs longkit vs DeepSpeed's ALST, same run.

Random-weight Llama (``--shape llama-1b``: hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 32000;
``llama3-8b``; ``tiny`` for CPU smoke runs), bf16 on CUDA, ZeRO-2, torch AdamW, non-reentrant gradient
checkpointing on every layer, micro-batch 1. Each entry of
``--runs`` is ``IMPL[@NPROC]:SEQ`` and is launched as its own ``torchrun`` (a clean process group and
allocator per entry), e.g.

* ``none:32768``   plain DeepSpeed data parallelism, every GPU trains its own 32k sample (SP=1);
* ``longkit:65536`` longkit Ulysses over all GPUs (``"longkit": {"sequence_parallel": ...}``), 64k per sample
  (``attention: "auto"``: causal SDPA on the gathered sequence); ``longkit_kernel:65536`` the same with
  longkit's Triton masked-attention kernel;
* ``alst:65536``   DeepSpeed 0.19.8's ``UlyssesSPAttentionHF`` + ``UlyssesSPDataLoaderAdapter`` (sdpa);
* ``none@1:8192``  one process only (the exact-loss check against ``longkit:8192`` on the same samples).

Reported per entry: median step time (after ``--warmup`` steps), tokens/s per GPU, peak GiB per GPU, the
per-step losses. ``--max-len IMPL...`` doubles the sequence from ``--max-start`` until a step fails (OOM) and
reports the largest that trained. ``none``, ``alst`` and ``longkit`` run PyTorch SDPA for the attention itself
(PyTorch picks flash/cuDNN on H100/H200), ``longkit_kernel`` longkit's Triton kernel.

    python benchmarks/ulysses.py --gpus 2 --runs none:32768 longkit:65536 longkit_kernel:65536 alst:65536 \
        none@1:8192 longkit:8192 --max-len none longkit alst
    python benchmarks/ulysses.py --gpus 2 --shape tiny --runs none:256 longkit:512 alst:512 none@1:256 longkit:256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
}


# ------------------------------------------------------------------------------------------ worker
def _worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=1 << 22, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp_size = 1 if args.impl == "none" else world
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": cuda}, "steps_per_print": 10**9,
    }
    seq, steps = args.seq, args.warmup + args.steps
    # Sample i is the same for every impl; a data-parallel rank r trains samples r, r + dp, ...
    dp = world // sp_size
    samples = [torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(i))
               for i in range(steps * dp)]
    mine = samples[rank // sp_size::dp]

    def full_batch(ids):
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).unsqueeze(0)}

    times, losses = [], []

    def timed(fn) -> None:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(round(float(loss), 5))

    if args.impl in ("none", "longkit", "longkit_kernel"):
        from longkit.deepspeed_ext import initialize

        attention = "kernel" if args.impl == "longkit_kernel" else "auto"
        ds_config["longkit"] = {"sequence_parallel": {"mode": "ulysses", "size": sp_size, "attention": attention}}
        engine, _, _, _, sp = initialize(model, ds_config, model_parameters=model.parameters())

        def step(ids):
            shard = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in sp.shard_batch(full_batch(ids)).items()}
            loss = engine(**shard).loss
            engine.backward(loss)
            engine.step()
            return loss.detach()
    elif args.impl == "alst":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=world,
            micro_batch_size=1, seq_length_is_variable=True)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config, mpu=mpu)
        group, sp_rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
        chunk = seq // world

        def step(ids):
            # What UlyssesSPDataLoaderAdapter does, without its gather (every rank already has the sample).
            b = full_batch(ids)
            shift = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:]
            sl = slice(sp_rank * chunk, (sp_rank + 1) * chunk)
            shard = {"input_ids": b["input_ids"][:, sl].to(dev), "position_ids": b["position_ids"][:, sl].to(dev),
                     "labels": shift[:, sl].contiguous().to(dev), "shift_labels": shift[:, sl].contiguous().to(dev)}
            out = engine(**shard)
            good = (shard["shift_labels"] != -100).sum()
            lp = torch.distributed.nn.functional.all_gather(out.loss, group=group)
            gp = torch.distributed.nn.functional.all_gather(good, group=group)
            loss = (torch.stack(lp) * torch.stack(gp)).sum() / torch.stack(gp).sum()
            engine.backward(loss)
            engine.step()
            return loss.detach()
    else:
        raise SystemExit(f"unknown impl {args.impl}")

    error = None
    try:
        for ids in mine[:steps]:
            timed(lambda ids=ids: step(ids))
    except torch.OutOfMemoryError as e:
        error = f"OOM: {str(e)[:200]}"
    t = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2] if len(times) > args.warmup else None
    row = {"impl": args.impl, "nproc": world, "sp": sp_size, "seq": seq,
           "step_s": t, "tok_s_per_gpu": (seq * dp / t / world) if t else None,
           "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
           "losses": losses, "error": error}
    if rank == 0:
        Path(args.json).write_text(json.dumps(row))


# ------------------------------------------------------------------------------------------ driver
def _launch(entry: str, args: argparse.Namespace, steps: int | None = None) -> dict[str, Any]:
    impl, seq = entry.split(":")
    nproc = args.gpus
    if "@" in impl:
        impl, n = impl.split("@")
        nproc = int(n)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29400 + (hash(entry) % 500)), __file__, "--worker", "--impl", impl, "--seq", seq,
               "--shape", args.shape, "--json", str(out), "--warmup", str(args.warmup),
               "--steps", str(steps if steps is not None else args.steps)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
        text = proc.stdout + proc.stderr
        oom = "OutOfMemory" in text or "out of memory" in text
        # the exception line (torchrun ends its report with a rule of '=' signs, which says nothing)
        lines = [ln.strip() for ln in text.splitlines() if ("Error" in ln or "Exception" in ln) and ln.strip()]
        why = lines[-1][:300] if lines else (text.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "nproc": nproc, "seq": int(seq), "error": ("OOM" if oom else "failed") + ": " + why}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="processes per entry (GPUs, or CPU processes with gloo)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--runs", nargs="*", default=[],
                    help="entries IMPL[@NPROC]:SEQ (impl: none, longkit, longkit_kernel, alst)")
    ap.add_argument("--max-len", nargs="*", default=[], help="impls whose max trainable length to search")
    ap.add_argument("--max-start", type=int, default=32768)
    ap.add_argument("--max-limit", type=int, default=1 << 21)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    from benchmarks._harness import print_table, save_results

    rows: list[dict[str, Any]] = []
    name = f"ulysses{('_' + args.tag) if args.tag else ''}"
    for entry in args.runs:
        rows.append(_launch(entry, args))
        print(json.dumps(rows[-1]), flush=True)
        save_results(name, rows, out_dir=args.out_dir)
    max_rows = []
    for impl in args.max_len:
        seq, best, failed = args.max_start, None, None
        while seq <= args.max_limit:
            r = _launch(f"{impl}:{seq}", args, steps=1)
            print(json.dumps(r), flush=True)
            if r.get("error") or not r.get("step_s"):
                failed = seq
                break
            best, seq = r, seq * 2
        # first_failure None: every length up to --max-limit trained (the true maximum is higher)
        max_rows.append({"impl": impl, "max_seq": best["seq"] if best else None,
                         "peak_gib": best.get("peak_gib") if best else None, "first_failure": failed,
                         "max_limit": args.max_limit})
        save_results(name, rows, extra={"max_len": max_rows}, out_dir=args.out_dir)
    cols = ["impl", "nproc", "sp", "seq", "step_s", "tok_s_per_gpu", "peak_gib", "error"]
    print_table(rows, cols, title=f"Ulysses training step, {args.shape}")
    # Same samples, same length: the loss of every SP entry vs the one-process entry.
    for r in rows:
        if r.get("sp", 1) == 1:
            continue
        ref = next((q for q in rows if q["nproc"] == 1 and q["seq"] == r["seq"]), None)
        if ref and r.get("losses") and ref.get("losses"):
            diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
            print(f"loss check {r['impl']}@{r['nproc']}:{r['seq']} vs one process: max |diff| = {max(diffs):.2e}")
            r["loss_max_abs_diff_vs_1proc"] = max(diffs)
    if max_rows:
        print_table(max_rows, title="max trainable sequence length (doubling search)")
    print("saved", save_results(name, rows, extra={"max_len": max_rows}, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
