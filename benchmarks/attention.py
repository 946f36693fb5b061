"""Masked flash attention (longkit Triton) vs FlexAttention and SDPA, forward and forward+backward.

TFLOP/s count only visible (query, key) pairs, exactly (per-row closed forms): forward = 4·D per pair,
forward+backward = 3.5x forward. Usage (on a GPU)::

    PYTHONPATH=. python benchmarks/attention.py [--out-dir DIR] [--hd 64 128] [--seqlens 4096 16384 65536]
        [--masks causal causal_gqa lambda lambda_qglobal documents shared_prefix] [--no-flex] [--tag part1]

Shapes: B·T = 65536 tokens, H = 32 (MHA; ``causal_gqa``: 32 query heads on 8 kv heads, as Llama-3-8B).
Documents / shared prefix need B = 1 (packed), so they use one row of T tokens and H = 32·(65536 // T)
heads (the same token·head volume).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import env_info, print_table, save_results  # noqa: E402

# ruff: noqa: B023 - closures over loop variables are timed inside the same iteration
from longkit.kernels import AttentionMask, causal, documents, masked_attention, shared_prefix, sink_window  # noqa: E402

N_LOCAL, N_GLOBAL = 4096, 4


def _doc_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lens, s = [], 0
    while s < total:
        n = min(rng.randint(lo, hi), total - s)
        lens.append(n)
        s += n
    return lens


def make_case(kind: str, T: int, device: str) -> dict[str, Any]:
    """Mask, batch, heads, lengths and flex mask_mod for a mask kind at sequence length ``T``."""
    tokens = 65536
    if kind in ("causal", "causal_gqa", "lambda", "lambda_qglobal"):
        B, H, L = max(1, tokens // T), 32, T
        mask = causal() if kind.startswith("causal") else sink_window(N_GLOBAL, N_LOCAL)
        return {"mask": mask, "B": B, "H": H, "Hkv": 8 if kind == "causal_gqa" else H, "T": L, "doc": None,
                "seg": None}
    H = 32 * max(1, tokens // T)
    if kind == "documents":
        lens = _doc_lengths(T, 256, 4096, seed=T)
        segs = None
    elif kind == "shared_prefix":
        P, C, R = 2048, 512, 512
        n_pairs = max(1, T // (P + C + 1 + R))
        lens = [P + C + 1 + R] * n_pairs
        segs = [[P - 1, P + C]] * n_pairs
    else:
        raise ValueError(kind)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    mask = documents(cu)
    seg = None
    if segs is not None:
        seg = torch.tensor(segs, dtype=torch.int32, device=device)
        mask = mask & shared_prefix(seg)
    return {"mask": mask, "B": 1, "H": H, "Hkv": H, "T": int(cu[-1]), "doc": cu, "seg": seg}


def visible_pairs(mask: AttentionMask, B: int, T: int) -> int:
    """Exact number of visible (query, key) pairs per head (closed form per row, no dense mask)."""
    p = torch.arange(T, dtype=torch.float64)
    lo = torch.zeros(T, dtype=torch.float64)
    if mask.cu_seqlens is not None:
        cu = mask.cu_seqlens.cpu().long()
        doc = torch.bucketize(torch.arange(T), cu[1:], right=True).clamp_max(cu.numel() - 2)
        lo = cu[doc].double()
    base = p - lo + 1
    if mask.n_local is not None:
        local = torch.minimum(base, torch.full_like(base, mask.n_local))
        extra = (p - mask.n_local + 1 - lo).clamp(min=0).clamp(max=mask.n_global)
        base = local + extra
    total = base.sum().item() * B
    if mask.prefix_segments is not None:
        seg = mask.prefix_segments.cpu().long()
        if mask.cu_seqlens is not None:
            cu = mask.cu_seqlens.cpu().long()
            L = (cu[1:] - cu[:-1]).clamp(min=0)
            c, r = seg[:, 0].clamp(max=L), seg[:, 1].clamp(max=L)
            total -= ((L - r).clamp(min=0) * (r - c)).sum().item()
    return int(total)


def flex_mask_mod(case: dict[str, Any]):  # noqa: ANN201
    mask: AttentionMask = case["mask"]
    if case["doc"] is not None:
        T = case["T"]
        cu = case["doc"].long()
        doc = torch.bucketize(torch.arange(T, device=cu.device), cu[1:], right=True).clamp_max(cu.numel() - 2)
        start = cu[doc]
        if case["seg"] is not None:
            seg = case["seg"].long()
            cs, rs = seg[doc, 0] + start, seg[doc, 1] + start

            def mm(b, h, q, kv):  # noqa: ANN001, ANN202
                hidden = (q >= rs[q]) & (kv >= cs[q]) & (kv < rs[q])
                return (q >= kv) & (doc[q] == doc[kv]) & ~hidden
            return mm

        def mm(b, h, q, kv):  # noqa: ANN001, ANN202
            return (q >= kv) & (doc[q] == doc[kv])
        return mm
    if mask.n_local is not None:
        nl, ng = mask.n_local, mask.n_global

        def mm(b, h, q, kv):  # noqa: ANN001, ANN202
            return (q >= kv) & (((q - kv) < nl) | (kv < ng))
        return mm

    def mm(b, h, q, kv):  # noqa: ANN001, ANN202
        return q >= kv
    return mm


def bench(fn, grad: bool, tensors: list[torch.Tensor], do: torch.Tensor, rep_ms: int = 100) -> float:  # noqa: ANN001
    import triton.testing

    if not grad:
        def run():  # noqa: ANN202
            with torch.no_grad():
                fn()
    else:
        def run():  # noqa: ANN202
            out = fn()
            torch.autograd.grad(out, tensors, do)
    return triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median")


def run_once(fn, tensors: list[torch.Tensor], do: torch.Tensor, no_bwd: bool) -> None:  # noqa: ANN001
    """One untimed forward (and forward+backward): compiles whatever ``fn`` compiles."""
    with torch.no_grad():
        fn()
    if not no_bwd:
        torch.autograd.grad(fn(), tensors, do)
    torch.cuda.synchronize()


def time_impls(impls: list[tuple[str, Any, list[torch.Tensor]]], do: torch.Tensor, args: argparse.Namespace,
               base: dict[str, Any], fwd_flops: float) -> list[dict[str, Any]]:
    """Rows for one case: every implementation is run (and compiled) once first, then timed in ``args.rounds``
    rounds, each round in a rotated order so that none is always timed first (after an idle compile) or last; the
    row holds the median over rounds (and the per-round times when there are several)."""
    import statistics

    timed = []
    for name, fn, ts in impls:
        row = {**base, "impl": name}
        try:
            run_once(fn, ts, do, args.no_bwd)
        except Exception as e:  # noqa: BLE001 - a baseline may not support a shape
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        timed.append((fn, ts, row))
    rep = args.rep_ms or 100
    for rnd in range(args.rounds):
        k = rnd % len(timed)
        for fn, ts, row in timed[k:] + timed[:k]:
            if "error" in row:
                continue
            try:
                row.setdefault("fwd_runs", []).append(bench(fn, False, ts, do, rep))
                if not args.no_bwd:
                    row.setdefault("fwdbwd_runs", []).append(bench(fn, True, ts, do, rep))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rows = []
    for _fn, _ts, row in timed:
        for key, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
            runs = row.get(f"{key}_runs") if "error" not in row else None
            if runs:
                row[f"{key}_ms"] = statistics.median(runs)
                row[f"{key}_tflops"] = mult * fwd_flops / row[f"{key}_ms"] / 1e9
            if args.rounds == 1 or not runs:
                row.pop(f"{key}_runs", None)
        rows.append(row)
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    return rows


FWD_SWEEP = ["128,64,8,3", "128,128,8,3", "128,64,8,4", "128,64,4,3", "64,64,4,3"]
BWD_SWEEP = ["64,128,8,2;128,64,8,2", "64,128,8,3;128,64,8,3", "64,128,8,1;128,64,8,1", "32,128,4,3;128,32,4,3",
             "64,64,4,3;64,64,4,3", "128,128,8,2;128,128,8,2"]
# profiler name -> column; the TMA dk/dv (dkdv_tma.py) is reported as bwd_dkdv too
BWD_KERNELS = {"_bwd_dkdv_kernel": "bwd_dkdv", "_bwd_dkdv_tma_kernel": "bwd_dkdv", "_bwd_dkdv_ws_kernel": "bwd_dkdv",
               "_bwd_dq_kernel": "bwd_dq",
               "_bwd_preprocess_kernel": "bwd_preprocess"}


def kernel_ms(fn, n: int = 5) -> dict[str, float]:  # noqa: ANN001
    """Mean device ms per call of each backward kernel launched by ``fn`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        for name, key in BWD_KERNELS.items():
            if name in e.key:
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                out[key] = out.get(key, 0.0) + t / 1e3 / n
    return out


def _load_module(path: str):  # noqa: ANN202
    """A kernel module from a file (e.g. the previous commit's flash.py), for a before/after in one run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"longkit_flash_ref_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    # its relative imports (the TMA dk/dv launcher) resolve in the installed package; without this they fail and
    # the old file silently falls back to the pointer dk/dv, so its backward is not the one it shipped with
    mod.__package__ = "longkit.kernels.masked_attn"
    spec.loader.exec_module(mod)
    return mod


def sweep(args: argparse.Namespace) -> None:
    """Time the Triton kernels under several block configs (env overrides read by the launchers), the
    backward split per kernel, and optionally an older kernel file (``--ref-kernel``) in the same run."""
    import os

    import triton.testing

    from longkit.kernels.masked_attn import launch as flash

    mods = [("current", flash)] + [(Path(p).stem, _load_module(p)) for p in args.ref_kernel]
    fwd_cfgs = args.fwd_cfgs if args.fwd_cfgs is not None else FWD_SWEEP
    bwd_cfgs = args.bwd_cfgs if args.bwd_cfgs is not None else BWD_SWEEP
    rows = []
    reference: dict[tuple, list[torch.Tensor]] = {}

    def record(row: dict[str, Any], fn, mod) -> None:  # noqa: ANN001
        try:
            if args.warm_only:
                fn()
                torch.cuda.synchronize()
                return
            if row["pass"] == "bwd":
                row.update(kernel_ms(fn))
            ms = triton.testing.do_bench(fn, warmup=10, rep=args.rep_ms or 50, return_mode="median")
            if hasattr(mod, "launch_stats"):  # older kernel files may lack it
                keys = ("fwd",) if row["pass"] == "fwd" else ("bwd_dkdv", "bwd_dkdv_sink", "bwd_dq")
                stats = mod.launch_stats()
                row["regs/spills"] = " ".join(f"{k_}:{stats[k_]['regs']}/{stats[k_]['spills']}"
                                              for k_ in keys if k_ in stats)
            mult = 2.5 if row["pass"] == "bwd" else 1.0
            row.update(ms=ms, tflops=mult * flops / ms / 1e9)
            # every variant must give the current default's result (relative max error over all outputs)
            got = [t for t in fn() if t is not None]
            key = (row["mask"], row["D"], row["pass"])
            ref = reference.setdefault(key, got)
            row["rel_err"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                                 for a, b in zip(got, ref))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)

    for D in args.hd:
        for kind in args.masks:
            case = make_case(kind, args.seqlens[0], "cuda")
            B, H, L, mask = case["B"], case["H"], case["T"], case["mask"]
            q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(B, case["Hkv"], L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            do = torch.randn_like(q)
            qg = kg = None
            if kind == "lambda_qglobal":
                qg, kg = torch.randn_like(q), torch.randn(B, H, N_GLOBAL, D, device="cuda", dtype=torch.bfloat16)
            flops = 4.0 * D * visible_pairs(mask, B, L) * H
            n_local = mask.n_local or 0
            geo = (mask.cu_seqlens, mask.prefix_segments, 0, mask.n_global, n_local, D ** -0.5)
            base = {"D": D, "T": L, "mask": kind}
            for label, mod in mods:
                out, lse = mod.flash_masked_attention_fwd(q, k, v, qg, kg, *geo)
                # None = the launcher's own default; the config list applies to the current kernel only
                extra_f, extra_b = (fwd_cfgs, bwd_cfgs) if label == "current" else ([], [])
                for cfg in [None, *extra_f]:
                    if cfg is not None:
                        os.environ["LONGKIT_ATTN_FWD_CONFIG"] = cfg
                    record({**base, "kernel": label, "pass": "fwd", "cfg": cfg or "default"},
                           lambda mod=mod: mod.flash_masked_attention_fwd(q, k, v, qg, kg, *geo), mod)
                    os.environ.pop("LONGKIT_ATTN_FWD_CONFIG", None)
                for cfg in [None, *extra_b]:
                    if cfg is not None:
                        os.environ["LONGKIT_ATTN_BWD_CONFIG"] = cfg
                    record({**base, "kernel": label, "pass": "bwd", "cfg": cfg or "default"},
                           lambda mod=mod, out=out, lse=lse: mod.flash_masked_attention_bwd(
                               do, None, q, k, v, out, lse, qg, kg, *geo), mod)
                    os.environ.pop("LONGKIT_ATTN_BWD_CONFIG", None)
                for variant in args.env_variants if label == "current" else []:
                    # the backward (or with a "fwd:" prefix the forward) under other launcher settings, e.g.
                    # LONGKIT_ATTN_TMA_DKDV=0 (the pointer dk/dv), fwd:LONGKIT_ATTN_WS_FWD=0 (the pointer forward)
                    fwd_variant = variant.startswith("fwd:")
                    pairs = dict(kv.split("=", 1) for kv in variant.removeprefix("fwd:").split(";"))
                    saved = {k_: os.environ.get(k_) for k_ in pairs}
                    os.environ.update(pairs)
                    if fwd_variant:
                        record({**base, "kernel": label, "pass": "fwd", "cfg": variant},
                               lambda mod=mod: mod.flash_masked_attention_fwd(q, k, v, qg, kg, *geo), mod)
                    else:
                        record({**base, "kernel": label, "pass": "bwd", "cfg": variant},
                               lambda mod=mod, out=out, lse=lse: mod.flash_masked_attention_bwd(
                                   do, None, q, k, v, out, lse, qg, kg, *geo), mod)
                    for k_, v_ in saved.items():
                        if v_ is None:
                            os.environ.pop(k_, None)
                        else:
                            os.environ[k_] = v_
            reference.clear()
            torch.cuda.empty_cache()
    if args.warm_only:
        return
    print_table(rows, ["D", "T", "mask", "kernel", "pass", "cfg", "ms", "tflops", "bwd_dkdv", "bwd_dq",
                       "bwd_preprocess", "regs/spills", "rel_err", "error"], title="kernel config sweep, bf16")
    save_results(f"attention_sweep{args.tag}", rows, None, args.out_dir)


def precompile(args: argparse.Namespace, workers: int) -> None:
    """Compile every kernel the run will time in parallel subprocesses first, so that Triton's and Inductor's
    on-disk caches are warm: compiling is CPU-bound, timing needs the GPU alone, and the machine has many
    cores. One job per (head dim, length, mask), and per config in a sweep."""
    import itertools
    import subprocess
    import time

    t0 = time.time()
    # only longkit's Triton kernels. Flex in parallel jobs was slower than compiling it in the timed process:
    # 15 jobs with Inductor's own worker pools thrashed 16 cores (an H200 run timed out before the first row),
    # and 12 jobs with one compile thread each had not finished after 560 s, where the timed process alone
    # compiles Flex for two masks in 60-250 s (BENCHMARKS.md, "Running it")
    common = [sys.executable, __file__, "--warm-only", "--no-flex"]
    if args.no_bwd:
        common.append("--no-bwd")
    jobs = []
    lengths = args.seqlens[:1] if args.sweep else args.seqlens
    for D, T, kind in itertools.product(args.hd, lengths, args.masks):
        job = [*common, "--hd", str(D), "--seqlens", str(T), "--masks", kind]
        if not args.sweep:
            jobs.append(job)
            continue
        fwd = args.fwd_cfgs if args.fwd_cfgs is not None else FWD_SWEEP
        bwd = args.bwd_cfgs if args.bwd_cfgs is not None else BWD_SWEEP
        for i in range(max(len(fwd), len(bwd), len(args.env_variants), 1)):
            jobs.append([*job, "--sweep", "--ref-kernel", *args.ref_kernel, "--fwd-cfgs", *fwd[i:i + 1],
                         "--bwd-cfgs", *bwd[i:i + 1], "--env-variants", *args.env_variants[i:i + 1]])
    running: list[subprocess.Popen] = []
    for cmd in jobs:
        while len(running) >= workers:
            running = [p for p in running if p.poll() is None]
            time.sleep(0.2)
        running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in running:
        p.wait()
    print(f"precompiled: {len(jobs)} jobs, {workers} workers, {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hd", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--masks", nargs="+",
                    default=["causal", "causal_gqa", "lambda", "lambda_qglobal", "documents", "shared_prefix"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--sweep", action="store_true", help="time kernel configs at the first --seqlens and exit")
    ap.add_argument("--fwd-cfgs", nargs="*", default=None, help="sweep: 'BM,BN,warps,stages' forward configs")
    ap.add_argument("--bwd-cfgs", nargs="*", default=None, help="sweep: 'dkdv;dq' backward configs")
    ap.add_argument("--ref-kernel", nargs="*", default=[], help="sweep: older flash.py files timed alongside")
    ap.add_argument("--env-variants", nargs="*", default=[],
                    help="sweep: extra backward rows under 'NAME=VALUE[;NAME=VALUE]' environment settings; "
                         "'fwd:NAME=VALUE' times the forward instead")
    ap.add_argument("--precompile-workers", type=int, default=0,
                    help="compile longkit's kernels first in this many parallel processes (warms Triton's disk cache)")
    ap.add_argument("--compile-cache", type=Path, default=None,
                    help="keep Inductor's and Triton's compiled kernels here (Flex's compiles dominate a run; a cache "
                         "kept for a later run skips them)")
    ap.add_argument("--rep-ms", type=int, default=None,
                    help="time each row for about this long (Triton's do_bench; the median is reported). Default 100 "
                         "(50 in a sweep): one call of a 64k forward+backward, and a sweep's single rows of the same "
                         "kernel differed by up to 15%% at 16k, so longer windows give steadier medians")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every implementation of a case this many times, in rotated order, and report the "
                         "median (all are compiled and run once before any timing)")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_cache is not None:
        import os

        # read when compiling, so setting them now (also for the precompile subprocesses) takes effect
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((args.compile_cache / "inductor").resolve())
        os.environ["TRITON_CACHE_DIR"] = str((args.compile_cache / "triton").resolve())
    if args.precompile_workers > 0 and not args.warm_only:
        precompile(args, args.precompile_workers)
    if args.sweep:
        sweep(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # every (shape, mask_mod, grad mode) compiles anew; past dynamo's recompile limit flex_attention would fall
    # back to its eager path, which materialises [B, H, T, T] scores (out of memory, or a crippled baseline)
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 4096)
    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    rows: list[dict[str, Any]] = []
    for D in args.hd:
        for T in args.seqlens:
            for kind in args.masks:
                case = make_case(kind, T, dev)
                B, H, L, mask = case["B"], case["H"], case["T"], case["mask"]
                g = torch.Generator(device=dev).manual_seed(0)

                def r(*s: int) -> torch.Tensor:
                    return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)

                Hkv = case["Hkv"]
                q, k, v = r(B, H, L, D), r(B, Hkv, L, D), r(B, Hkv, L, D)
                do = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=g)
                extra: dict[str, torch.Tensor] = {}
                if kind == "lambda_qglobal":
                    extra = {"q_global": r(B, H, L, D), "k_global": r(B, H, N_GLOBAL, D)}
                tensors = [q, k, v, *extra.values()]
                pairs = visible_pairs(mask, B, L)
                fwd_flops = 4.0 * D * pairs * H
                density = pairs / (B * L * L)
                impls: list[tuple[str, Any, list[torch.Tensor]]] = [
                    ("longkit", lambda: masked_attention(q, k, v, mask=mask, **extra), tensors)]
                if kind.startswith("causal"):
                    backends = (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))
                    for name, be in backends:
                        def f(be=be):  # noqa: ANN001, ANN202
                            with sdpa_kernel([be]):
                                return torch.nn.functional.scaled_dot_product_attention(
                                    q, k, v, is_causal=True, enable_gqa=Hkv != H)
                        impls.append((name, f, [q, k, v]))
                if not args.no_flex and kind != "lambda_qglobal":
                    bm = create_block_mask(flex_mask_mod(case), None, None, L, L, device=dev, _compile=True)
                    impls.append(("flex", lambda bm=bm: flex(q, k, v, block_mask=bm, enable_gqa=Hkv != H), [q, k, v]))
                if args.warm_only:  # compile only (see precompile); errors surface in the timed run
                    for _name, fn, ts in impls:
                        try:
                            run_once(fn, ts, do, args.no_bwd)
                        except Exception:  # noqa: BLE001, S112
                            pass
                    continue
                rows.extend(time_impls(impls, do, args, {"D": D, "T": L, "B": B, "H": H, "mask": kind,
                                                         "density": round(density, 4)}, fwd_flops))
                torch.cuda.empty_cache()
                if args.out_dir is not None and rows:  # keep what was measured if the run is cut short
                    save_results(f"attention_partial{args.tag}", rows, None, args.out_dir)
    if args.warm_only:
        return
    # speed-ups vs flex / best sdpa in the same (D, T, mask)
    for row in rows:
        if row["impl"] != "longkit" or "fwd_ms" not in row:
            continue
        def comparable(x: dict[str, Any], row: dict[str, Any] = row) -> bool:
            qglobal_vs_flex = row["mask"] == "lambda_qglobal" and x["mask"] == "lambda" and x["impl"] == "flex"
            return (x["D"] == row["D"] and x["T"] == row["T"] and x["impl"] != "longkit" and "fwd_ms" in x
                    and (x["mask"] == row["mask"] or qglobal_vs_flex))

        same = [x for x in rows if comparable(x)]
        for x in same:
            key = "flex" if x["impl"] == "flex" else x["impl"]
            row[f"fwd_x_{key}"] = round(x["fwd_ms"] / row["fwd_ms"], 3)
            if "fwdbwd_ms" in row and "fwdbwd_ms" in x:
                row[f"fwdbwd_x_{key}"] = round(x["fwdbwd_ms"] / row["fwdbwd_ms"], 3)
    print_table(rows, ["D", "T", "B", "H", "mask", "density", "impl", "fwd_ms", "fwd_tflops", "fwdbwd_ms",
                       "fwdbwd_tflops", "fwd_x_flex", "fwdbwd_x_flex", "fwd_x_sdpa_flash", "fwd_x_sdpa_cudnn",
                       "error"], title="masked attention, bf16")
    name = torch.cuda.get_device_name(0).lower()
    short = "h100" if "h100" in name else "h200" if "h200" in name else name.split()[-1]
    meta = {"n_local": N_LOCAL, "n_global": N_GLOBAL, "rep_ms": args.rep_ms or 100, "rounds": args.rounds,
            "env_extra": env_info().get("device")}
    save_results(f"attention_{short}{args.tag}", rows, meta, args.out_dir)


if __name__ == "__main__":
    main()
