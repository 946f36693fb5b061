"""RoPE re-rotation of a KV-cache suffix (PIE: keep a cache valid through an edit): bandwidth of ``rerotate_``.

After an edit, every cached key behind it moves by the edit's length: ``rerotate_(cache[:, :, start:], delta,
inv_freq)`` rotates them in place. The op is memory-bound, so it is measured against moving the same bytes. One
run times, per suffix length, on one layer's key cache ``[B, Hkv, prefix + T, D]`` (the suffix is a strided view):

* ``copy``: ``dst.copy_(src)`` of a tensor of the suffix's size: the same bytes read and written, the roof;
* ``longkit``: ``rerotate_`` with a per-token ``delta [B, T]`` (the Triton kernel);
* ``longkit_range``: ``rerotate_range_`` (one shift for the whole suffix: the kernel without a delta tensor);
* ``naive``: the plain-PyTorch reference, ``suffix.copy_(naive_rope_rotate(suffix, delta, inv_freq))`` (eager);
* ``naive_compiled`` (``--compile``): the same function under ``torch.compile`` (its fastest honest form).

GB/s counts the keys' bytes read plus written (``2·B·H·T·D·bytes``; the delta's ``B·T`` integers are left out);
``of_copy`` is the fraction of the copy's bandwidth. Timing: ``triton.testing.do_bench``, median.

    PYTHONPATH=. python benchmarks/rope_rerotate.py                 # Llama-3-8B: B=1, Hkv=8, D=128, bf16
    PYTHONPATH=. python benchmarks/rope_rerotate.py --seqlens 8192 --hd 64 128 --batch 4 --compile
    python benchmarks/rope_rerotate.py --dry-run                    # CPU, tiny shapes, reference only
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from longkit.kernels.rope import naive_rope_rotate, rerotate_, rerotate_range_  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gpu_tag(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``: the short name in the results file's name."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cpu_bench(fn: Callable[[], object], reps: int = 5) -> float:
    """Median milliseconds of ``reps`` calls after one warm-up (the dry run's stand-in for ``do_bench``)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def naive_inplace(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    keys.copy_(naive_rope_rotate(keys, delta, inv_freq))


def run_shape(B: int, H: int, T: int, D: int, prefix: int, dtype: torch.dtype, device: str, compile_ref: bool,
              bench: Callable[[Callable[[], object]], float]) -> list[dict[str, Any]]:
    """Time every variant on one shape; returns the table's rows."""
    cache = torch.randn(B, H, prefix + T, D, device=device, dtype=dtype)
    suffix = cache[:, :, prefix:]
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    delta = torch.randint(1, 4096, (B, T), device=device)
    shift = 1234
    src, dst = torch.randn(B, H, T, D, device=device, dtype=dtype), torch.empty(B, H, T, D, device=device,
                                                                                 dtype=dtype)
    # one correctness check before timing: the kernel (or the CPU reference in a dry run) against the reference
    want = naive_rope_rotate(suffix, delta, inv_freq)
    got = rerotate_(suffix.clone(), delta, inv_freq)
    if not torch.allclose(got.float(), want.float(), atol=0.07, rtol=0.02):
        raise SystemExit(f"rerotate_ disagrees with the reference at B={B} H={H} T={T} D={D}")
    variants: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(src),
        "longkit": lambda: rerotate_(suffix, delta, inv_freq),
        "longkit_range": lambda: rerotate_range_(cache, prefix, None, shift, inv_freq),
        "naive": lambda: naive_inplace(suffix, delta, inv_freq),
    }
    if compile_ref:
        compiled = torch.compile(naive_inplace)
        variants["naive_compiled"] = lambda: compiled(suffix, delta, inv_freq)
    nbytes = 2 * suffix.numel() * suffix.element_size()
    rows: list[dict[str, Any]] = []
    for name, fn in variants.items():
        ms = bench(fn)
        rows.append({"B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).removeprefix("torch."), "impl": name,
                     "ms": ms, "GB/s": nbytes / ms / 1e6})
    copy_rate = rows[0]["GB/s"]
    for r in rows:
        r["of_copy"] = r["GB/s"] / copy_rate
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072], help="suffix lengths T")
    ap.add_argument("--prefix", type=int, default=1024, help="cached tokens before the edit (left untouched)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8, help="kv heads")
    ap.add_argument("--hd", type=int, nargs="+", default=[128], help="head dims")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, the reference path: checks the script without a GPU")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, tag = "cpu", "cpu_dry_run"
        args.seqlens, args.prefix, args.batch, args.heads = [64, 128], 16, 1, 2
        args.hd, args.compile = args.hd[:1], False
        bench: Callable[[Callable[[], object]], float] = cpu_bench
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run for a CPU check of the script)")
        import triton.testing

        device, tag = "cuda", gpu_tag(torch.cuda.get_device_name(0))

        def bench(fn: Callable[[], object]) -> float:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows: list[dict[str, Any]] = []
    for D in args.hd:
        for T in args.seqlens:
            rows += run_shape(args.batch, args.heads, T, D, args.prefix, DTYPES[args.dtype], device, args.compile,
                              bench)
            if device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, ["B", "H", "T", "D", "dtype", "impl", "ms", "GB/s", "of_copy"],
                title=f"RoPE re-rotation of a cache suffix, in place ({tag}); GB/s = keys' bytes read + written")
    save_results(f"rope_rerotate_{tag}", rows, {"args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()}}, args.out_dir)


if __name__ == "__main__":
    main()
