"""Decode attention over a quantized KV cache against bf16 decode attention: time, bytes read, memory.

One process, one GPU. Per shape (batch ``B``, context ``T``, head dim ``D``; Llama-3-8B's GQA by default: 32 query
heads over 8 KV heads), one decode step's attention (one query token per row) over a cache of ``T`` tokens:

* ``sdpa_bf16`` (baseline): ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` on the bf16 cache
  ``[B, Hkv, T, D]`` (PyTorch picks its fastest backend for the shape: flash / memory-efficient / cuDNN);
* ``longkit_bf16``: longkit's shared masked-attention kernel on the same bf16 cache (its decode path);
* ``longkit_<spec>``: :func:`longkit.kernels.kv_quant.quantized_decode_attention` over the packed cache (the fused
  split-K kernel that dequantizes tiles in registers), for 4/3/2-bit rotated caches and a 3-bit cache with the QJL
  sketch (``--specs``).

Columns: ``ms`` (``triton.testing.do_bench`` median: eager calls, host work included), ``ms_graph`` (the same call
captured once in a CUDA graph and replayed, ``do_bench_cudagraph``: GPU time only, as a decode loop under CUDA graphs
sees it; ``--no-graph`` skips it), ``speedup`` over ``sdpa_bf16`` (graph times where measured), ``kv_bytes`` per
layer (the bf16 cache, or the packed cache: exactly ``bytes_per_token × T × B`` with scales, zeros and sketches),
``GB/s`` (cache bytes read per call / time, graph time where measured) and ``of_copy`` (that rate over the device's
measured copy bandwidth, read + write of a 1 GiB tensor), ``mem_ratio`` (bf16 bytes / these bytes). Before timing,
every quantized output is compared with exact bf16 attention on the same (unquantized) keys and values
(``rel_err``), and the kernel with the reference on the same packed cache for the first shape (``kernel_vs_ref``).

``sequences_at_<N>GiB`` (``--budget-gib``): how many rows of ``T`` tokens fit a KV budget of N GiB for the whole
model (``--layers`` layers), from the exact bytes per token: the capacity gain where bf16 runs out of memory.

    python benchmarks/kv_decode.py                                     # B 1/8/32, T 8k..128k, D 128
    python benchmarks/kv_decode.py --hd 64 --heads 9 --kv-heads 3      # SmolLM2's heads
    python benchmarks/kv_decode.py --dry-run                           # CPU, tiny shapes, reference path
    python benchmarks/kv_decode.py --tiles 64:4 128:8:2 --specs 4bit   # also split-kernel tiles BLOCK_N:warps[:stages]

``--tiles``: each quantized spec also runs with these tiles of the split kernel (rows ``longkit_<spec>@<tile>``),
in place of the built-in choice (``launch._decode_config``) for that row only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from benchmarks.rope_rerotate import gpu_tag  # noqa: E402
from longkit.kernels import causal, masked_attention  # noqa: E402
from longkit.kernels.kv_quant import (  # noqa: E402
    KVQuantSpec,
    KVQuantState,
    PackedKV,
    bytes_per_token,
    quantize_kv,
    quantized_decode_attention,
)

SPECS: dict[str, KVQuantSpec] = {
    "4bit": KVQuantSpec(key_bits=4, value_bits=4, group_size=32),
    "3bit": KVQuantSpec(key_bits=3, value_bits=3, group_size=32),
    "2bit": KVQuantSpec(key_bits=2, value_bits=2, group_size=32),
    "3bit_qjl": KVQuantSpec(key_bits=3, value_bits=3, group_size=32, qjl=True),
    "3bit_cb": KVQuantSpec(key_bits=3, value_bits=3, group_size=128, codebook=True),  # group = the head dim
}


def spec_for(name: str, head_dim: int) -> KVQuantSpec:
    """``SPECS[name]`` for heads of ``head_dim``: codebook specs use one group per head (one fp16 RMS per vector)."""
    spec = SPECS[name]
    return dataclasses.replace(spec, group_size=head_dim) if spec.codebook else spec


def cpu_bench(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, bench: Callable[[Callable[[], object]], float]) -> float:
    """GB/s of ``dst.copy_(src)`` for a 1 GiB tensor (bytes read + written); the roof for a memory-bound op."""
    n = (1 << 30) // 2 if device == "cuda" else (1 << 24) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n * 2 / ms / 1e6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def parse_tile(text: str) -> dict[str, int]:
    """``BLOCK_N:warps[:stages]`` -> the split kernel's launch options (``BLOCK_M`` stays the built-in one)."""
    parts = [int(x) for x in text.split(":")]
    if len(parts) not in (2, 3) or parts[0] < 16 or parts[0] & (parts[0] - 1) or parts[1] not in (1, 2, 4, 8, 16):
        raise argparse.ArgumentTypeError(f"--tiles entry {text!r}: want BLOCK_N:warps[:stages], BLOCK_N a power of "
                                         "two >= 16, warps 1..16 (a power of two), e.g. 64:4 or 128:8:2")
    out = {"BLOCK_N": parts[0], "num_warps": parts[1]}
    if len(parts) == 3:
        out["num_stages"] = parts[2]
    return out


@contextlib.contextmanager
def split_tiles(tile: dict[str, int] | None) -> Iterator[None]:
    """Run the split kernel with ``tile`` in place of its built-in choice (a benchmark-only override)."""
    if tile is None:
        yield
        return
    from longkit.kernels.kv_quant import launch

    built_in = launch._decode_config
    launch._decode_config = lambda *a: {**built_in(*a), **tile}
    try:
        yield
    finally:
        launch._decode_config = built_in


def _tile_name(tile: dict[str, int]) -> str:
    return f"{tile['BLOCK_N']}:{tile['num_warps']}" + (f":{tile['num_stages']}" if "num_stages" in tile else "")


def run_shape(B: int, T: int, D: int, Hq: int, Hkv: int, specs: list[str], device: str, seed: int,
              bench: Callable[[Callable[[], object]], float], copy_gbs: float, check: bool,
              graph_bench: Callable[[Callable[[], object]], float] | None = None,
              tiles: list[dict[str, int]] | None = None) -> list[dict[str, Any]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    q = torch.randn(B, Hq, 1, D, generator=g).to(device, dtype)
    scale = D ** -0.5
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale, enable_gqa=True)
    dense_bytes = k.numel() * k.element_size() * 2
    rows: list[dict[str, Any]] = []

    def row(impl: str, fn: Callable[[], object], nbytes: float, err: float | None,
            extra: dict[str, Any] | None = None) -> None:
        ms = bench(fn)
        ms_graph = None
        if graph_bench is not None:
            try:
                ms_graph = graph_bench(fn)
            except RuntimeError as e:  # e.g. a host sync inside the call: not capturable, eager time only
                print(f"  {impl}: no CUDA-graph time ({str(e).splitlines()[0][:120]})", flush=True)
                torch.cuda.synchronize()
        best = ms_graph if ms_graph is not None else ms
        rows.append({"B": B, "T": T, "D": D, "Hq": Hq, "Hkv": Hkv, "impl": impl, "ms": ms, "ms_graph": ms_graph,
                     "kv_bytes": nbytes, "GB/s": nbytes / best / 1e6, "of_copy": nbytes / best / 1e6 / copy_gbs,
                     "mem_ratio": dense_bytes / nbytes, "rel_err": err, **(extra or {})})
        print(f"B={B} T={T} D={D} {impl}: {ms:.4g} ms" + (f", graph {ms_graph:.4g} ms" if ms_graph else ""),
              flush=True)

    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
    row("sdpa_bf16", sdpa, dense_bytes, _rel(sdpa(), exact))
    mask = causal(q_offset=T - 1)
    lk = lambda: masked_attention(q, k, v, mask=mask, scale=scale)  # noqa: E731
    row("longkit_bf16", lk, dense_bytes, _rel(lk(), exact))
    for name in specs:
        spec = spec_for(name, D)
        state = KVQuantState.create(spec, head_dim=D, num_kv_heads=Hkv, device=device)
        packed = PackedKV.allocate(spec, B, Hkv, T, D, device=device,
                                  raw_dtype=dtype if dtype != torch.float32 else torch.float16)
        quantize_kv(k, v, spec, state, out=packed)
        fn = lambda p=packed, sp=spec, st=state: quantized_decode_attention(q, p, sp, st, scale=scale)  # noqa: E731
        out = fn()
        extra = {}
        if check:
            ref = quantized_decode_attention(q, packed, spec, state, scale=scale, impl="naive")
            extra["kernel_vs_ref"] = _rel(out, ref)
        nbytes = bytes_per_token(spec, D, Hkv) * T * B
        row(f"longkit_{name}", fn, nbytes, _rel(out, exact), extra)
        for tile in tiles or []:
            with split_tiles(tile):
                err = _rel(fn(), exact)
                row(f"longkit_{name}@{_tile_name(tile)}", fn, nbytes, err)
    for r in rows:  # graph times where both have one, else eager times
        key = "ms_graph" if r["ms_graph"] is not None and rows[0]["ms_graph"] is not None else "ms"
        r["speedup"] = rows[0][key] / r[key]
    return rows


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--hd", type=int, nargs="+", default=[128])
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--specs", nargs="+", choices=sorted(SPECS), default=list(SPECS))
    ap.add_argument("--layers", type=int, default=32, help="layers of the model the capacity column assumes")
    ap.add_argument("--budget-gib", type=float, default=60.0, help="KV memory of the capacity column")
    ap.add_argument("--max-gib", type=float, default=24.0, help="skip shapes whose bf16 K+V of one layer exceed this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiles", type=parse_tile, nargs="+", default=[], help="extra split-kernel tiles per quantized "
                    "spec, BLOCK_N:warps[:stages]")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timing (ms_graph)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script without a GPU")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, tag = "cpu", "cpu_dry_run"
        args.batch, args.seqlens, args.hd, args.heads, args.kv_heads = [1, 2], [64, 128], [64], 4, 2
        bench: Callable[[Callable[[], object]], float] = cpu_bench
        graph_bench: Callable[[Callable[[], object]], float] | None = None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run for a CPU check of the script)")
        import triton.testing

        device, tag = "cuda", gpu_tag(torch.cuda.get_device_name(0))

        def bench(fn: Callable[[], object]) -> float:
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

        def cuda_graph_bench(fn: Callable[[], object]) -> float:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")

        graph_bench = None if args.no_graph else cuda_graph_bench

    copy_gbs = copy_bandwidth(device, bench)
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows: list[dict[str, Any]] = []
    first = True
    for D in args.hd:
        for B in args.batch:
            for T in args.seqlens:
                if 4 * B * args.kv_heads * T * D > args.max_gib * 2**30:
                    print(f"skipped B={B} T={T} D={D}: bf16 K+V above --max-gib {args.max_gib:g}")
                    continue
                rows += run_shape(B, T, D, args.heads, args.kv_heads, args.specs, device, args.seed, bench,
                                  copy_gbs, check=first, graph_bench=graph_bench, tiles=args.tiles)
                first = False
                save_results(f"kv_decode_{tag}", rows, {"partial": True, "copy_gbs": copy_gbs}, args.out_dir)
                if device == "cuda":
                    torch.cuda.empty_cache()
    print_table(rows, ["B", "T", "D", "impl", "ms", "ms_graph", "speedup", "GB/s", "of_copy", "mem_ratio", "rel_err"],
                title=f"decode attention, one step, one layer ({tag}; {args.heads} q heads / {args.kv_heads} kv)")
    capacity = []
    for D in args.hd:
        for T in args.seqlens:
            per_seq = {"bf16": 4 * D * args.kv_heads * T * args.layers}
            per_seq |= {n: bytes_per_token(spec_for(n, D), D, args.kv_heads) * T * args.layers for n in args.specs}
            capacity.append({"T": T, "D": D, **{f"{n}_seqs": int(args.budget_gib * 2**30 // b)
                                                for n, b in per_seq.items()}})
    print_table(capacity, title=f"sequences of T tokens in {args.budget_gib:g} GiB of KV ({args.layers} layers, "
                                f"{args.kv_heads} kv heads; exact bytes per token)")
    bpt = {n: bytes_per_token(spec_for(n, D), D, args.kv_heads) for n in args.specs for D in args.hd[:1]}
    return save_results(f"kv_decode_{tag}", rows, {"capacity": capacity, "copy_gbs": copy_gbs, "bytes_per_token": bpt,
                                            "specs": {n: repr(SPECS[n]) for n in args.specs},
                                            "args": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}}, args.out_dir)


if __name__ == "__main__":
    main()
