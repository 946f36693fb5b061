"""Activation offload on one GPU: the longest trainable sequence, tokens/s and peak memory, six ways.

One process, one random-weight Llama (bf16, sdpa attention, batch 1), every method in turn on the same model; for
each method the sequence length doubles from ``--start`` until a step runs out of GPU memory (or ``--max-len``, or
the host memory an offloading method would need at the next length exceeds ``--host-limit-gib``):

* ``plain``: no gradient checkpointing, every activation on the GPU;
* ``ckpt``: HF non-reentrant gradient checkpointing on every decoder layer (``gradient_checkpointing_enable``);
* ``save_on_cpu``: ``ckpt`` + ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` around the backbone's
  forward (the checkpointed layer inputs go to pinned host memory, copied on the compute stream, and come back
  on first use in backward: PyTorch's own offload, what HF's ``gradient_checkpointing_enable(offload=True)`` does);
* ``alst``: ``save_on_cpu`` + DeepSpeed's ``TiledMLP`` (ALST's sequence-tiled MLP, ``ceil(tokens / hidden)``
  shards, ALST's rule) on every layer: the pieces of DeepSpeed's long-sequence recipe that run on one GPU (its
  checkpointed-hidden-states offload moves the same tensors as ``save_on_cpu``). Skipped without DeepSpeed;
* ``longkit``: ``ckpt`` + :class:`longkit.offload.ActivationOffloader` (the same tensors, copied on a side stream
  into pooled pinned buffers, brought back one layer ahead in backward);
* ``longkit_tiled``: ``longkit`` + ``apply_patches(model, tiled_mlp=...)`` (the MLP in tiles of the same size as
  ``alst``'s, recomputed in backward);
* ``longkit_nockpt`` (only with ``--methods``): the offloader without checkpointing (every tensor the layers save,
  no recompute).

A step: forward of the backbone (``model.model``), the LM head and cross entropy in chunks of ``--loss-chunk``
tokens with the logits recomputed in backward (the same for every method, so no ``[T, vocab]`` tensor decides the
length), backward, AdamW step. The learning rate is 0 (``--lr``): the weights never change, so every method's loss
at a length is the same number (reported), while AdamW's memory and time stay in the step. Per length: median step
time over ``--steps`` steps after ``--warmup``, tokens/s, peak GiB (``torch.cuda.max_memory_allocated``, reset per
length), the bytes the offloading methods hold on the host per step (longkit: measured by its ``stats()``;
save_on_cpu: the checkpointed inputs, ``layers x tokens x hidden x 2`` bytes) and the time those bytes need at the
measured host<->device bandwidth (``xfer_ms``: device-to-host plus host-to-device time of a pinned ``--bw-mib`` MiB
copy, timed once at the start), next to the step time: the copies overlap compute when ``xfer_ms`` is well below
the step time.

``--shape 1b``: Llama-3.2-1B's shape, full fine-tune. ``--shape 8b``: Llama-3-8B's shape with LoRA r=16 on every
projection (needs peft; refused with a message without it). ``--dry-run``: CPU, tiny model (2 layers, hidden 64),
lengths 32..256, fp32, 1 timed step: checks the script (no memory numbers; the "bandwidth" is a host memcpy).

    python benchmarks/offload.py --dry-run --out-dir /tmp/offload_bench     # CPU check, seconds
    python benchmarks/offload.py                                            # -> results/offload_<gpu>.json
    python benchmarks/offload.py --shape 8b                                 # -> results/offload_<gpu>_8b.json
    python benchmarks/offload.py --methods ckpt longkit --start 65536 --gpu-fraction 0.125
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402
from benchmarks.prefix_sharing import LORA_TARGETS, SHAPES, ChunkedLogProbs  # noqa: E402
from benchmarks.rope_long_context import gpu_tag  # noqa: E402

METHODS = ("plain", "ckpt", "save_on_cpu", "alst", "longkit", "longkit_tiled")
EXTRA_METHODS = ("longkit_nockpt",)
CKPT = {"plain": False, "ckpt": True, "save_on_cpu": True, "alst": True, "longkit": True, "longkit_tiled": True,
        "longkit_nockpt": False}
OFFLOAD_CPU = ("save_on_cpu", "alst")  # torch's save_on_cpu around the backbone


def install_ds_tiled_mlp(model: Any, tile: int) -> list[Any]:  # noqa: ANN401
    """DeepSpeed's ``TiledMLP`` (ALST) on every decoder layer's MLP of this instance, ``ceil(tokens / tile)`` shards
    (ALST's own rule is ``tile = hidden_size``); returns the MLPs patched (``uninstall_ds_tiled_mlp`` undoes it)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def make(mlp: Any) -> Any:  # noqa: ANN401
        stock = type(mlp).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            shards = max(1, math.ceil(x.shape[:-1].numel() / tile))
            params = [p for p in mlp.parameters() if p.requires_grad]
            return TiledMLP.apply(stock, mlp, x, shards, params)
        return forward

    mlps = [layer.mlp for layer in model.model.layers]
    for mlp in mlps:
        mlp.forward = make(mlp)
    return mlps


def uninstall_ds_tiled_mlp(mlps: list[Any]) -> None:
    for mlp in mlps:
        vars(mlp).pop("forward", None)


def measure_bandwidth(nbytes: int, device: torch.device, reps: int = 5) -> dict[str, Any]:
    """Host<->device GB/s of one pinned ``nbytes`` copy each way (median of ``reps``); on CPU a host memcpy."""
    n = nbytes // 2
    if device.type != "cuda":
        a, b = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t0)
        gbs = nbytes / statistics.median(times) / 1e9
        return {"d2h_gbs": gbs, "h2d_gbs": gbs, "bytes": nbytes, "kind": "host memcpy (no GPU)"}
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    dev = torch.empty(n, dtype=torch.bfloat16, device=device)
    out = {"bytes": nbytes, "kind": "pinned host <-> device, compute stream"}
    for name, dst, src in (("d2h_gbs", host, dev), ("h2d_gbs", dev, host)):
        dst.copy_(src, non_blocking=True)  # warm-up
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = nbytes / statistics.median(times) / 1e9
    del host, dev
    return out


def build_model(shape: str, lora: bool, dtype: torch.dtype, device: torch.device, max_len: int, seed: int) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{**SHAPES[shape], "max_position_embeddings": max(max_len, SHAPES[shape].get(
        "max_position_embeddings", 0))}, attention_dropout=0.0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS)).get_base_model()
        model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad path
    return model.train()


def loss_fn(model: Any, ids: torch.Tensor, chunk: int, ctx: Any) -> torch.Tensor:  # noqa: ANN401
    with ctx():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return -ChunkedLogProbs.apply(h, model.get_output_embeddings().weight, ids[:, 1:].reshape(-1), chunk).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_length(model: Any, method: str, seq: int, args: argparse.Namespace, device: torch.device,  # noqa: ANN401
               offloader: Any) -> dict[str, Any]:
    from contextlib import nullcontext

    ctx = nullcontext
    if method in OFFLOAD_CPU:
        ctx = lambda: torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed + seq)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, seq), generator=gen).to(device)
    if offloader is not None:
        offloader.pool.clear()  # the previous length's idle buffers (other sizes) would only add up on the host
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # PyTorch's cache of freed pinned blocks
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model, ids, args.loss_chunk, ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        del loss
    step_s = statistics.median(times[args.warmup:])
    row: dict[str, Any] = {"method": method, "seq": seq, "step_s": step_s, "tok_s": args.batch * seq / step_s,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                           "loss": losses[0], "host_gib": None, "xfer_ms": None}
    text = model.config
    if offloader is not None:
        s = offloader.stats()
        host = s["bytes_offloaded_last_forward"]
        row.update(tensors_offloaded=s["tensors_offloaded_last_forward"], pool_gib=s["pool_bytes"] / 2**30,
                   buffers_allocated=s["buffers_allocated"])
    elif method in OFFLOAD_CPU:  # the checkpointed inputs: one [batch, seq, hidden] tensor per layer
        host = text.num_hidden_layers * args.batch * seq * text.hidden_size * model.dtype.itemsize
    else:
        host = None
    if host is not None:
        bw = args.bandwidth
        row.update(host_gib=host / 2**30, xfer_ms=1e3 * (host / (bw["d2h_gbs"] * 1e9) + host / (bw["h2d_gbs"] * 1e9)))
    del opt
    return row


def run_method(model: Any, method: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:  # noqa: ANN401
    from longkit.config import ActivationOffloadConfig
    from longkit.offload import ActivationOffloader

    if CKPT[method]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    offloader = None
    if method.startswith("longkit"):
        offloader = ActivationOffloader(model, ActivationOffloadConfig(
            min_tensor_bytes=args.min_tensor_bytes, gpu_fraction=args.gpu_fraction, prefetch=not args.no_prefetch))
    tile = args.mlp_tile or model.config.hidden_size
    tiled_undo, ds_mlps = None, []
    if method == "longkit_tiled":
        from longkit.config import TiledMLPConfig
        from longkit.hf_patches import tiled_mlp

        tiled_undo = tiled_mlp.install(model, TiledMLPConfig(chunk_size=tile))
    elif method == "alst":
        ds_mlps = install_ds_tiled_mlp(model, tile)
    rows: list[dict[str, Any]] = []
    seq = args.start
    try:
        while seq <= args.max_len:
            error = None
            try:
                row = run_length(model, method, seq, args, device, offloader)
            except Exception as e:  # noqa: BLE001 - an OOM ends the doubling; anything else is reported too
                error = ("OOM: " if _is_oom(e) else f"{type(e).__name__}: ") + str(e).splitlines()[0][:200]
            if error is not None:
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append({"method": method, "seq": seq, "error": error})
                break
            rows.append(row)
            peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
            print(f"  {method:15s} {seq:>8d}  {row['tok_s']:10.1f} tok/s  peak {peak}", flush=True)
            if row["host_gib"] is not None and 2 * row["host_gib"] > args.host_limit_gib:
                rows.append({"method": method, "seq": 2 * seq, "error": f"host memory: would need about "
                             f"{2 * row['host_gib']:.0f} GiB > --host-limit-gib {args.host_limit_gib:.0f}"})
                break
            seq *= 2
    finally:
        if offloader is not None:
            offloader.remove()
        if tiled_undo is not None:
            tiled_mlp.uninstall(model, tiled_undo)
        uninstall_ds_tiled_mlp(ds_mlps)
    return rows


def _host_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kb / 2**20
    except (OSError, StopIteration):
        return 64.0


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b", help="Llama-3.2-1B (full) or Llama-3-8B (LoRA)")
    ap.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=list(METHODS))
    ap.add_argument("--start", type=int, help="first sequence length (default 4096; dry run 32)")
    ap.add_argument("--max-len", type=int, help="longest length tried (default 1048576; dry run 256)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, help="untimed steps per length (default 1; dry run 0)")
    ap.add_argument("--steps", type=int, help="timed steps per length (default 3; dry run 1)")
    ap.add_argument("--loss-chunk", type=int, help="tokens per LM-head chunk (default 4096; dry run 64)")
    ap.add_argument("--mlp-tile", type=int, default=None, help="tokens per MLP tile of alst and longkit_tiled "
                                                                 "(default hidden_size, ALST's rule)")
    ap.add_argument("--lr", type=float, default=0.0, help="AdamW learning rate (0: weights never change)")
    ap.add_argument("--min-tensor-bytes", type=int, help="longkit: smallest tensor offloaded (default 1 MiB; dry "
                                                         "run 0)")
    ap.add_argument("--gpu-fraction", type=float, default=0.0, help="longkit: last layers kept on the GPU")
    ap.add_argument("--no-prefetch", action="store_true", help="longkit: copy each tensor back when needed")
    ap.add_argument("--bw-mib", type=int, default=1024, help="size of the timed pinned copy")
    ap.add_argument("--host-limit-gib", type=float, help="stop doubling when an offloading method would need more "
                                                         "host memory (default 80%% of RAM)")
    ap.add_argument("--memory-gib", type=float, default=None, help="cap this process's GPU memory (torch's "
                    "per-process memory fraction), e.g. 78 to measure an 80 GB card's lengths on a larger one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, lengths 32..256: checks the script")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, shape, dtype, tag = torch.device("cpu"), "dry", torch.float32, "cpu_dry_run"
        defaults = {"start": 32, "max_len": 256, "warmup": 0, "steps": 1, "loss_chunk": 64, "min_tensor_bytes": 0}
        args.bw_mib = min(args.bw_mib, 64)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the measurement needs a CUDA GPU; use --dry-run to check the script on CPU")
        device, shape, dtype = torch.device("cuda"), args.shape, torch.bfloat16
        tag = gpu_tag(torch.cuda.get_device_name(0)) + ("_8b" if shape == "8b" else "")
        defaults = {"start": 4096, "max_len": 1 << 20, "warmup": 1, "steps": 3, "loss_chunk": 4096,
                    "min_tensor_bytes": 1 << 20}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if min(args.start, args.max_len, args.steps, args.loss_chunk, args.batch, args.bw_mib) < 1 or args.warmup < 0:
        raise SystemExit("--start, --max-len, --steps, --loss-chunk, --batch, --bw-mib must be >= 1, --warmup >= 0")
    if not 0.0 <= args.gpu_fraction <= 1.0 or args.min_tensor_bytes < 0:
        raise SystemExit("--gpu-fraction must be in [0, 1] and --min-tensor-bytes >= 0")
    if "alst" in args.methods and importlib.util.find_spec("deepspeed") is None:
        print("note: deepspeed is not importable: the alst method is skipped")
        args.methods = [m for m in args.methods if m != "alst"]
    lora = shape == "8b"
    if lora and importlib.util.find_spec("peft") is None:
        raise SystemExit("skipped: --shape 8b trains LoRA adapters and needs peft (pip install peft); --shape 1b "
                         "needs nothing more")
    args.host_limit_gib = args.host_limit_gib or 0.8 * _host_gib()
    if args.memory_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
        print(f"GPU memory capped at {args.memory_gib:g} GiB of {total / 2**30:.1f}", flush=True)
    args.bandwidth = measure_bandwidth(args.bw_mib << 20, device)
    bw = args.bandwidth
    print(f"{bw['kind']}: device->host {bw['d2h_gbs']:.1f} GB/s, host->device {bw['h2d_gbs']:.1f} GB/s", flush=True)

    print(f"building the {shape} model ({'LoRA' if lora else 'full fine-tune'}, {dtype}) on {device}", flush=True)
    model = build_model(shape, lora, dtype, device, args.max_len, args.seed)
    rows: list[dict[str, Any]] = []
    plain_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "bandwidth"}
    for i, method in enumerate(args.methods):
        rows += run_method(model, method, args, device)
        if i + 1 < len(args.methods):  # a partial file after each method: a run cut short keeps what it measured
            save_results(f"offload_{tag}{args.tag}", rows, {"partial": True, "bandwidth": bw, "args": plain_args},
                         out_dir=args.out_dir)

    summary = []
    for method in args.methods:
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        best = max(ok, key=lambda r: r["seq"]) if ok else None
        stop = next((r["error"] for r in rows if r["method"] == method and "error" in r), "--max-len reached")
        summary.append({"method": method, "max_len": best["seq"] if best else None,
                        "tok_s": best["tok_s"] if best else None, "peak_gib": best["peak_gib"] if best else None,
                        "host_gib": best["host_gib"] if best else None, "xfer_ms": best["xfer_ms"] if best else None,
                        "step_ms": 1e3 * best["step_s"] if best else None, "stopped_by": stop[:60]})
    cols = ["method", "seq", "step_s", "tok_s", "peak_gib", "host_gib", "xfer_ms", "loss", "error"]
    print_table([{c: r.get(c) for c in cols} for r in rows], cols, title=f"per length ({shape}, {device})")
    print_table(summary, title=f"max trainable length ({shape}, batch {args.batch}); host<->device "
                               f"{bw['d2h_gbs']:.1f}/{bw['h2d_gbs']:.1f} GB/s ({bw['kind']})")
    for r in rows:  # the same weights everywhere (lr 0): a method computing something else shows here
        ref = next((x for x in rows if x["seq"] == r["seq"] and "loss" in x), None)
        if "loss" in r and ref is not None and not math.isclose(r["loss"], ref["loss"], rel_tol=1e-2):
            print(f"warning: {r['method']} at {r['seq']} has loss {r['loss']:.4f}, {ref['method']} {ref['loss']:.4f}")
    text = model.config
    extra = {"summary": summary, "bandwidth": bw,
             "args": plain_args,
             "model": {"shape": shape, **SHAPES[shape], "dtype": str(dtype), "lora": lora,
                       "lora_config": {"r": 16, "alpha": 32, "targets": LORA_TARGETS} if lora else None,
                       "layers": text.num_hidden_layers, "attn": "sdpa",
                       "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)},
             "step": "backbone forward + chunked LM head/cross entropy (logits recomputed in backward) + backward "
                     f"+ AdamW (lr {args.lr}); batch {args.batch}"}
    return save_results(f"offload_{tag}{args.tag}", rows, extra, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
