"""Probe: does Triton 3.6's Hopper warp specialisation (tl.range(warp_specialize=True), TMA loads) speed up
plain causal attention kernels vs longkit's kernels, in one run? Prints and writes JSON to ``$WS_PROBE_OUT``
(default ``research/results``)::

    HD=128 python research/ws_probe/run.py
"""

# ruff: noqa: B023 - the closures are timed inside the same loop iteration
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import ws_dkdv, ws_dq, ws_fwd  # noqa: E402

from longkit.kernels.masked_attn.launch import flash_masked_attention_bwd, flash_masked_attention_fwd  # noqa: E402

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
LOG2E = 1.4426950408889634
res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def run_probe(B, H, T, D, dtype=torch.bfloat16, fwd_cfgs=(), dkdv_cfgs=(), dq_cfgs=(), check=False):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(4))
    scale = D**-0.5
    out_ref, lse = flash_masked_attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, scale)
    delta = (out_ref.float() * do.float()).sum(-1)
    rows = []
    if check:
        qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scale)
        o.backward(do.float())
        ref = {"out": o.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
    def time_cfgs(kernel, cfgs, launch, errors):
        """Time ``launch(bm, bn, nw, st, ws)`` per config; ``errors()`` gives the row's error columns."""
        for cfg in cfgs:
            f = lambda: launch(*cfg)
            try:
                f()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is a row too
                rows.append({"kernel": kernel, "cfg": list(cfg), "error": str(e)[:200]})
                continue
            rows.append({"kernel": kernel, "cfg": list(cfg), "ms": bench(f), **errors()})

    o, l2 = torch.empty_like(q), torch.empty(B, H, T, device="cuda")
    dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
    time_cfgs(
        "fwd", fwd_cfgs,
        lambda bm, bn, nw, st, ws: ws_fwd[(T // bm, B * H)](
            q, k, v, o, l2, T, scale * LOG2E, D=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=nw, num_stages=st),
        lambda: {"err_vs_longkit": (o.float() - out_ref.float()).abs().max().item(),
                 **({"err_vs_ref": (o.float() - ref["out"]).abs().max().item()} if check else {})},
    )
    time_cfgs(
        "dkdv", dkdv_cfgs,
        lambda bm, bn, nw, st, ws: ws_dkdv[(T // bn, B * H)](
            q, k, v, do, lse, delta, dk, dv, T, scale * LOG2E, scale, D=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws,
            num_warps=nw, num_stages=st),
        lambda: {"err_vs_ref": max((dk.float() - ref["dk"]).abs().max().item(),
                                   (dv.float() - ref["dv"]).abs().max().item())} if check else {},
    )
    time_cfgs(
        "dq", dq_cfgs,
        lambda bm, bn, nw, st, ws: ws_dq[(T // bm, B * H)](
            q, k, v, do, lse, delta, dq, T, scale * LOG2E, scale, D=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws,
            num_warps=nw, num_stages=st),
        lambda: {"err_vs_ref": (dq.float() - ref["dq"]).abs().max().item()} if check else {},
    )
    # baselines: longkit fwd, longkit bwd per kernel (profiler), cuDNN SDPA fwd / fwd+bwd
    rows.append(
        {
            "kernel": "fwd",
            "cfg": "longkit",
            "ms": bench(lambda: flash_masked_attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, scale)),
        }
    )
    bwd = lambda: flash_masked_attention_bwd(do, None, q, k, v, out_ref, lse, None, None, None, None, 0, 0, 0, scale)
    rows.append({"kernel": "bwd", "cfg": "longkit", "ms": bench(bwd)})
    bwd()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            bwd()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if "dkdv" in e.key or "dq_kernel" in e.key:
            rows.append(
                {
                    "kernel": "dkdv" if "dkdv" in e.key else "dq",
                    "cfg": "longkit(profiler)",
                    "ms": e.device_time_total / e.count / 1000,
                }
            )
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(be):
                rows.append(
                    {
                        "kernel": "fwd",
                        "cfg": f"sdpa_{name}",
                        "ms": bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)),
                    }
                )
        except Exception as e:
            rows.append({"kernel": "fwd", "cfg": f"sdpa_{name}", "error": str(e)[:200]})
    for r in rows:
        r.update({"B": B, "H": H, "T": T, "D": D})
        if "ms" in r:
            pairs = B * H * T * (T + 1) / 2
            mult = {"fwd": 4, "dkdv": 8, "dq": 6, "bwd": 14}[r["kernel"]]  # 2 FLOP per MAC per product
            r["tflops"] = mult * D * pairs / r["ms"] / 1e9
        print(json.dumps(r), flush=True)
    res["rows"] += rows


if __name__ == "__main__":
    D = int(os.environ.get("HD", "128"))
    fwd_cfgs = [(128, 128, 8, 3, False), (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 64, 4, 4, True)]
    dkdv_cfgs = [(64, 128, 8, 2, False), (64, 128, 4, 2, True), (64, 128, 4, 3, True), (32, 128, 4, 3, True)]
    dq_cfgs = [(128, 64, 8, 3, False), (128, 64, 4, 2, True), (128, 64, 4, 3, True), (64, 64, 4, 3, True)]
    run_probe(1, 4, 1024, D, fwd_cfgs=fwd_cfgs, dkdv_cfgs=dkdv_cfgs, dq_cfgs=dq_cfgs, check=True)
    for T in (4096, 16384):
        run_probe(65536 // T, 32, T, D, fwd_cfgs=fwd_cfgs, dkdv_cfgs=dkdv_cfgs, dq_cfgs=dq_cfgs)
    out = Path(os.environ.get("WS_PROBE_OUT", Path(__file__).resolve().parents[1] / "results")) / f"ws_probe_hd{D}.json"
    out.write_text(json.dumps(res, indent=1))
