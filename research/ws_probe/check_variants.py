"""Correctness of kernel variants on the GPU, each case in its own process with a time limit.

A crashed launch kills its CUDA context, and a hung one everything after it: run each (variant, mask, head dim) in a
subprocess, so one bad case costs its own time limit and the next cases still run. Each case compares the forward
output / lse and dq / dk / dv against the launcher with the variant's environment unset, on the same inputs.

    python research/ws_probe/check_variants.py --case "LONGKIT_ATTN_WS_DQ=1:causal:128" ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def one(env: str, mask_name: str, D: int, T: int) -> dict:
    import torch

    from longkit.kernels import causal, documents, sink_window
    from longkit.kernels.masked_attn import launch

    masks = {
        "causal": causal(),
        "lambda": sink_window(4, T // 4),
        "documents": documents(torch.tensor([0, 300, 301, 1500, 1500, T - 1000, T], device="cuda")),
        "docs_sink": documents(torch.tensor([0, 1200, T], device="cuda")) & sink_window(4, 300),
    }
    mask = masks[mask_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv = 1, 4, 2
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn_like(q)
    geo = (mask.cu_seqlens, mask.prefix_segments, 0, mask.n_global, mask.n_local or 0, D ** -0.5)

    def run() -> list:
        out, lse = launch.flash_masked_attention_fwd(q, k, v, None, None, *geo)
        dq, dk, dv, _, _ = launch.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, *geo)
        torch.cuda.synchronize()
        return [out, lse, dq, dk, dv]

    pairs = dict(kv.split("=", 1) for kv in env.split(";"))
    os.environ.update(pairs)
    got = run()
    # the variant's kernels, read before the reference run replaces them
    kernels = {k_: getattr(v_, "name", str(v_)) for k_, v_ in launch.LAST_LAUNCH.items()}
    for name in pairs:
        os.environ.pop(name)
    ref = run()
    names = ["out", "lse", "dq", "dk", "dv"]
    err = {n: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
           for n, a, b in zip(names, got, ref)}
    return {"nan": any(bool(t.isnan().any()) for t in got), **err, "kernels": kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", required=True, help="ENV=VALUE[;ENV=VALUE]:mask:head_dim")
    ap.add_argument("--T", type=int, default=4091)
    ap.add_argument("--timeout", type=int, default=90)
    ap.add_argument("--jobs", type=int, default=4, help="cases checked at once (each its own process)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--passing", default=None, metavar="FILE",
                    help="write the environments that passed every case they ran (no error, NaN or error > 2%%), one "
                         "per line (to feed benchmarks/attention.py --env-variants)")
    args = ap.parse_args()
    if args.one:
        env, mask, D = args.case[0].rsplit(":", 2)
        print(json.dumps(one(env, mask, int(D), args.T)))
        return
    def check(case: str) -> dict:
        cmd = [sys.executable, __file__, "--one", "--T", str(args.T), "--case", case]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout} s (hang?)"}
        res["case"] = case
        print(json.dumps(res), flush=True)
        return res

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(check, args.case))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.passing:
        ok: dict[str, bool] = {}
        for r in results:
            env = r["case"].rsplit(":", 2)[0]
            good = "error" not in r and not r["nan"] and max(r[n] for n in ("out", "lse", "dq", "dk", "dv")) < 0.02
            ok[env] = ok.get(env, True) and good
        Path(args.passing).write_text("".join(f"{e}\n" for e, g in ok.items() if g))


if __name__ == "__main__":
    main()
