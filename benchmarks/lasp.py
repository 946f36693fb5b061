"""Linear attention for LASP-2: the kernel's forward+backward against PyTorch and flash-linear-attention.

One process, one GPU. Per shape and op, the same inputs (bf16 ``q, k, v``, an fp32 initial state, a random output
gradient) go through forward and backward of:

* ``longkit``: :func:`longkit.kernels.linear_attn.linear_attention` (Triton on CUDA) /
  :func:`~longkit.kernels.linear_attn.gated_delta_rule`;
* ``torch_chunked``: the chunked PyTorch path of the same math (``chunk_*_torch``, eager: what runs on CPU);
* ``fla``: flash-linear-attention's kernel for the same layer, ``chunk_simple_gla(q, k, v, g_gamma=log_decay)``
  for decayed linear attention (lightning attention / MiniMax) and ``chunk_gated_delta_rule`` for Gated DeltaNet,
  in its own ``[B, T, H, D]`` layout (the transposes are made once, outside the timing). Skipped with a note when
  ``fla`` is not importable.

Ops: ``lightning`` (per-head constant decay ``log_decay [H]``, scale 1, as MiniMax) and ``gdn`` (gated delta rule,
per-token gates ``g`` and ``beta``, scale ``1/sqrt(D)``, L2-normalised q/k as Qwen3-Next). Before timing, each
implementation's output and gradients are compared with longkit's (max relative error reported). Timing:
``triton.testing.do_bench`` median of forward + backward (gradients of q, k, v, the gates and the initial
state); tokens/s counts ``B·T``; ``vs_fla`` = fla's time / this one's (above 1: faster than fla).

``--sp ENTRY...``: the sequence-parallel training step instead (LASP-2H through the DeepSpeed ``"longkit"`` section,
ZeRO-2, bf16 on CUDA / fp32 with gloo on CPU). Each entry ``IMPL@NPROC:SEQ`` runs as its own
``torch.distributed.run`` with ``NPROC`` processes (GPUs): ``lasp2@4:131072`` = SP 4 over a 131072-token sample,
``none@1:32768`` = one process. Random-weight MiniMax-style hybrid (``--sp-shape``: ``1b`` = hidden 2048, 16 layers,
7 lightning-attention layers per softmax layer, 16 heads of 128, one expert; ``tiny`` for CPU). Reported: step time,
tokens/s per GPU, peak GiB, and the communication share: the time inside LASP-2's all-gather / reduce-scatter /
halo exchange and Ulysses' all-to-all (timed around each call, after a device synchronisation, so the share is an
upper bound of what overlap could hide), over the step time. Works at any number of processes, one included.

    python benchmarks/lasp.py                                 # H=16, D=128, T = 4k..64k, B=1
    python benchmarks/lasp.py --ops lightning --seqlens 16384 --batch 4 --heads 32 --hd 64 128
    python benchmarks/lasp.py --dry-run                       # CPU, tiny shapes: checks the script
    python benchmarks/lasp.py --sp none@1:32768 lasp2@1:32768 lasp2@2:65536 lasp2@4:131072
    python benchmarks/lasp.py --sp lasp2@2:512 none@1:512 --sp-shape tiny      # CPU, gloo
"""

from __future__ import annotations

import argparse
import importlib.util
import math
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
from benchmarks.rope_rerotate import gpu_tag  # noqa: E402
from longkit.kernels.linear_attn import (  # noqa: E402
    chunk_gated_delta_rule_torch,
    chunk_linear_attention_torch,
    gated_delta_rule,
    linear_attention,
)

OPS = ("lightning", "gdn")


def cpu_bench(fn: Callable[[], object], reps: int = 3) -> float:
    """Median milliseconds of ``reps`` calls after one warm-up (the dry run's stand-in for ``do_bench``)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_inputs(op: str, B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str,
                seed: int) -> dict[str, torch.Tensor]:
    """Inputs of one shape, leaves requiring grad (gates in fp32, as the models keep them)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    x: dict[str, torch.Tensor] = {
        "q": rnd(B, H, T, D).to(dtype), "k": rnd(B, H, T, D).to(dtype), "v": rnd(B, H, T, D).to(dtype),
        "h0": rnd(B, H, D, D, scale=0.1),
    }
    if op == "lightning":
        # MiniMax's per-head slopes: decay exp(-s_h), s_h = 2^(-8 (h+1) / H); keys scaled so states stay O(1)
        x["k"] = (x["k"].float() / math.sqrt(D)).to(dtype)
        x["log_decay"] = -(2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)).to(device)
    else:
        x["g"] = F.logsigmoid(rnd(B, H, T) + 4.0)  # gates near 1, as a trained Gated DeltaNet has
        x["beta"] = torch.sigmoid(rnd(B, H, T))
    x["do"] = rnd(B, H, T, D).to(dtype)
    for name, t in x.items():
        if name != "do":
            t.requires_grad_(True)
    return x


def _grads(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for n, t in x.items() if n != "do" and t.requires_grad]


def longkit_fn(op: str, x: dict[str, torch.Tensor], torch_path: bool = False) -> Callable[[], torch.Tensor]:
    D = x["q"].shape[-1]
    if op == "lightning":
        f = chunk_linear_attention_torch if torch_path else linear_attention
        return lambda: f(x["q"], x["k"], x["v"], x["log_decay"], scale=1.0, initial_state=x["h0"],
                         output_final_state=False)[0]
    f = chunk_gated_delta_rule_torch if torch_path else gated_delta_rule
    return lambda: f(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=D ** -0.5, initial_state=x["h0"],
                     output_final_state=False, use_qk_l2norm=True)[0]


def fla_fn(op: str, x: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """fla's kernel in its ``[B, T, H, D]`` layout (inputs transposed once, here); ``None`` without fla."""
    if importlib.util.find_spec("fla") is None:
        return None
    tq, tk, tv = (x[n].detach().transpose(1, 2).contiguous().requires_grad_(True) for n in ("q", "k", "v"))
    x.update(fla_q=tq, fla_k=tk, fla_v=tv)
    D = tq.shape[-1]
    if op == "lightning":
        from fla.ops.simple_gla import chunk_simple_gla

        def run() -> torch.Tensor:
            o, _ = chunk_simple_gla(tq, tk, tv, g_gamma=x["log_decay"], scale=1.0, initial_state=x["h0"],
                                    output_final_state=False)
            return o.transpose(1, 2)
        return run
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    tg, tb = (x[n].detach().transpose(1, 2).contiguous().requires_grad_(True) for n in ("g", "beta"))
    x.update(fla_g=tg, fla_beta=tb)

    def run_gdn() -> torch.Tensor:
        o, _ = chunk_gated_delta_rule(tq, tk, tv, g=tg, beta=tb, scale=D ** -0.5, initial_state=x["h0"],
                                      output_final_state=False, use_qk_l2norm_in_kernel=True)
        return o.transpose(1, 2)
    return run_gdn


def fwd_bwd(fn: Callable[[], torch.Tensor], do: torch.Tensor, leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().backward(do)
    return step


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-12))


def run_shape(op: str, B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str, seed: int,
              bench: Callable[[Callable[[], object]], float], torch_max_t: int) -> list[dict[str, Any]]:
    x = make_inputs(op, B, H, T, D, dtype, device, seed)
    ours = [n for n in x if n != "do" and not n.startswith("fla_")]
    variants: dict[str, tuple[Callable[[], torch.Tensor], list[str]]] = {"longkit": (longkit_fn(op, x), ours)}
    if T <= torch_max_t:
        variants["torch_chunked"] = (longkit_fn(op, x, torch_path=True), ours)
    fla = fla_fn(op, x) if device == "cuda" else None
    if fla is not None:
        fla_names = ["fla_q", "fla_k", "fla_v", "h0"] + (["log_decay"] if op == "lightning" else ["fla_g", "fla_beta"])
        variants["fla"] = (fla, fla_names)

    # correctness against longkit first: output and every gradient (fla's in its layout, transposed back)
    ref_out = variants["longkit"][0]()
    ref_out.backward(x["do"])
    ref = {"o": ref_out.detach()} | {n: x[n].grad.detach().clone() for n in ours}
    rows: list[dict[str, Any]] = []
    for name, (fn, names) in variants.items():
        for n in set(ours) | set(names):
            x[n].grad = None
        try:
            out = fn()
            out.backward(x["do"])
        except RuntimeError as e:  # e.g. fla refusing its gated backward on Triton < 3.7.1 on Hopper
            msg = str(e).splitlines()[0][:160]
            print(f"{op} B={B} H={H} T={T} D={D} {name}: not run ({msg})", flush=True)
            rows.append({"op": op, "B": B, "H": H, "T": T, "D": D, "impl": name, "error": msg})
            continue
        errs = [_rel(out, ref["o"])]
        for n in names:
            base = n.removeprefix("fla_")
            got = x[n].grad
            if got is None:  # fla's chunk_simple_gla treats g_gamma (the per-head decay) as a constant
                print(f"  {name}: no gradient for {base} (not compared; its backward skips that work)", flush=True)
                continue
            if n.startswith("fla_"):
                got = got.transpose(1, 2)
            errs.append(_rel(got, ref[base]))
        ms = bench(fwd_bwd(fn, x["do"], [x[n] for n in names]))
        rows.append({"op": op, "B": B, "H": H, "T": T, "D": D, "impl": name, "ms": ms, "tok_s": B * T / ms * 1e3,
                     "max_rel_err_vs_longkit": max(errs)})
        print(f"{op} B={B} H={H} T={T} D={D} {name}: {ms:.3f} ms, max rel err vs longkit {max(errs):.2e}", flush=True)
    fla_ms = next((r["ms"] for r in rows if r["impl"] == "fla" and "ms" in r), None)
    for r in rows:
        r["vs_fla"] = fla_ms / r["ms"] if fla_ms and "ms" in r else None
    return rows


# ------------------------------------------------------------------------------------- sequence parallelism
SP_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, block_size=16,
                 layer_types=["linear_attention", "full_attention"] * 2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=8, head_dim=128, block_size=256,
               layer_types=(["linear_attention"] * 7 + ["full_attention"]) * 2),
}


def _timed_comm(cuda: bool) -> dict[str, float]:
    """Wrap the collectives LASP-2 and Ulysses call with timers; returns the running totals (seconds)."""
    import torch.distributed as dist

    from longkit.deepspeed_ext import all_to_all, lasp2_comm

    totals = {"comm_s": 0.0, "calls": 0}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:  # noqa: ANN401
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            totals["comm_s"] += time.perf_counter() - t0
            totals["calls"] += 1
            return out
        return wrapper

    lasp2_comm._all_gather = timed(lasp2_comm._all_gather)
    lasp2_comm._reduce_scatter = timed(lasp2_comm._reduce_scatter)
    lasp2_comm._p2p = timed(lasp2_comm._p2p)
    class _TimedDist:  # torch.distributed as Ulysses' module sees it, with all_to_all_single timed
        all_to_all_single = staticmethod(timed(dist.all_to_all_single))

        def __getattr__(self, name: str) -> Any:  # noqa: ANN401
            return getattr(dist, name)

    all_to_all.dist = _TimedDist()
    return totals


def _sp_worker(args: argparse.Namespace) -> None:
    import json
    import os

    import deepspeed
    import torch.distributed as dist
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    from longkit.deepspeed_ext import initialize

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = MiniMaxConfig(**SP_SHAPES[args.sp_shape], num_local_experts=1, num_experts_per_tok=1,
                        max_position_embeddings=1 << 22)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = MiniMaxForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp = 1 if args.impl == "none" else world
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": cuda}, "steps_per_print": 10**9,
        "longkit": {"sequence_parallel": {"mode": "lasp2" if sp > 1 else "ulysses", "size": sp}},
    }
    engine, _, _, _, spobj = initialize(model, ds_config, model_parameters=model.parameters())
    totals = _timed_comm(cuda)
    steps = args.warmup + args.steps
    dp = world // sp
    times, comm, losses, error = [], [], [], None
    try:
        for i in range(steps):
            ids = torch.randint(0, cfg.vocab_size, (1, args.seq),
                                generator=torch.Generator().manual_seed(i * dp + rank // sp))
            batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(args.seq)[None]}
            shard = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in spobj.shard_batch(batch).items()}
            if cuda:
                torch.cuda.synchronize()
            c0, t0 = totals["comm_s"], time.perf_counter()
            loss = engine(**shard).loss
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            comm.append(totals["comm_s"] - c0)
            losses.append(round(float(loss), 5))
    except torch.OutOfMemoryError as e:
        error = f"OOM: {str(e)[:200]}"
    timed_steps = list(range(args.warmup, len(times)))
    step_s = statistics.median([times[i] for i in timed_steps]) if timed_steps else None
    comm_s = statistics.median([comm[i] for i in timed_steps]) if timed_steps else None
    row = {"impl": args.impl, "nproc": world, "sp": sp, "seq": args.seq, "tokens_per_gpu": args.seq * dp // world,
           "step_s": step_s, "tok_s_per_gpu": (args.seq * dp / step_s / world) if step_s else None,
           "comm_s": comm_s, "comm_share": (comm_s / step_s) if step_s else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "losses": losses,
           "error": error}
    if rank == 0:
        Path(args.json).write_text(json.dumps(row))


def _sp_launch(entry: str, args: argparse.Namespace) -> dict[str, Any]:
    import json
    import os
    import subprocess
    import tempfile

    impl, seq = entry.split(":")
    impl, nproc = impl.split("@") if "@" in impl else (impl, "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_port",
               str(29500 + (hash(entry) % 400)), __file__, "--sp-worker", "--impl", impl, "--seq", seq,
               "--sp-shape", args.sp_shape, "--json", str(out), "--warmup", str(args.warmup),
               "--steps", str(args.steps)]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.exists():
            return json.loads(out.read_text())
        text = proc.stdout + proc.stderr
        lines = [ln.strip() for ln in text.splitlines() if ("Error" in ln or "Exception" in ln) and ln.strip()]
        why = lines[-1][:300] if lines else (text.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "nproc": int(nproc), "seq": int(seq), "error": why}


def run_sp(args: argparse.Namespace) -> Path:
    rows = []
    for entry in args.sp:
        rows.append(_sp_launch(entry, args))
        print(rows[-1], flush=True)
    tag = args.sp_shape if not torch.cuda.is_available() else gpu_tag(torch.cuda.get_device_name(0))
    base = next((r for r in rows if r.get("nproc") == 1 and r.get("tok_s_per_gpu")), None)
    for r in rows:
        r["tok_s_per_gpu_vs_1"] = (r["tok_s_per_gpu"] / base["tok_s_per_gpu"]
                                   if base and r.get("tok_s_per_gpu") else None)
        ref = next((q for q in rows if q.get("nproc") == 1 and q.get("seq") == r.get("seq") and q.get("losses")), None)
        if ref is not None and r is not ref and r.get("losses"):  # same samples: SP must give the same losses
            r["loss_max_abs_diff_vs_1proc"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
            print(f"loss check {r['impl']}@{r['nproc']}:{r['seq']}: max |diff| vs one process "
                  f"{r['loss_max_abs_diff_vs_1proc']:.2e}")
    print_table(rows, ["impl", "nproc", "sp", "seq", "tokens_per_gpu", "step_s", "tok_s_per_gpu", "tok_s_per_gpu_vs_1",
                       "comm_share", "peak_gib", "error"],
                title=f"LASP-2H training step, MiniMax-style {args.sp_shape} ({tag})")
    return save_results(f"lasp_sp_{tag}_{args.sp_shape}", rows, {"args": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()}}, args.out_dir)


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sp", nargs="+", default=None, help="sequence-parallel entries IMPL@NPROC:SEQ (impl: lasp2, "
                                                          "none)")
    ap.add_argument("--sp-shape", choices=sorted(SP_SHAPES), default="1b")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--hd", type=int, nargs="+", default=[128], help="head dims (Dk = Dv)")
    ap.add_argument("--torch-max-t", type=int, default=16384, help="longest T the eager PyTorch path is timed at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script without a GPU")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.sp_worker:
        _sp_worker(args)
        return
    if args.sp:
        return run_sp(args)

    if args.dry_run:
        device, tag, dtype = "cpu", "cpu_dry_run", torch.float32
        args.seqlens, args.batch, args.heads, args.hd = [64, 128], 1, 2, [16]
        bench: Callable[[Callable[[], object]], float] = cpu_bench
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run for a CPU check of the script)")
        import triton.testing

        device, tag, dtype = "cuda", gpu_tag(torch.cuda.get_device_name(0)), torch.bfloat16

        def bench(fn: Callable[[], object]) -> float:
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    if device == "cuda" and importlib.util.find_spec("fla") is None:
        print("note: flash-linear-attention (fla) is not importable: the fla column is skipped")
    rows: list[dict[str, Any]] = []
    for op in args.ops:
        for D in args.hd:
            for T in args.seqlens:
                rows += run_shape(op, args.batch, args.heads, T, D, dtype, device, args.seed, bench,
                                  args.torch_max_t)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows, ["op", "B", "H", "T", "D", "impl", "ms", "tok_s", "vs_fla", "max_rel_err_vs_longkit"],
                title=f"linear attention forward+backward ({tag}, {str(dtype).removeprefix('torch.')})")
    return save_results(f"lasp_kernel_{tag}", rows, {"args": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()}}, args.out_dir)


if __name__ == "__main__":
    main()
