"""Launch one attention forward (or forward+backward) a few times, for a profiler to attach to.

Times nothing itself: ``benchmarks/attention.py`` does the timing. This script exists so that ``ncu`` profiles
exactly the shapes the benchmark times (same ``make_case``), e.g. on a GPU machine::

    ncu --clock-control none -k regex:_fwd_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SourceCounters -o fwd4k \\
        python research/profile_attention.py --hd 128 --T 4096 --mask causal --impl longkit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.attention import N_GLOBAL, make_case  # noqa: E402
from longkit.kernels import masked_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hd", type=int, default=128)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--mask", default="causal",
                    choices=["causal", "causal_gqa", "lambda", "lambda_qglobal", "documents", "shared_prefix"])
    ap.add_argument("--impl", default="longkit", choices=["longkit", "sdpa_cudnn", "sdpa_flash"])
    ap.add_argument("--bwd", action="store_true", help="forward and backward (default: forward only)")
    ap.add_argument("--iters", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.impl != "longkit" and not args.mask.startswith("causal"):
        raise SystemExit("SDPA runs the causal masks only")
    case = make_case(args.mask, args.T, "cuda")
    B, H, Hkv, L, D = case["B"], case["H"], case["Hkv"], case["T"], args.hd
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(args.bwd)

    q, k, v = r(B, H, L, D), r(B, Hkv, L, D), r(B, Hkv, L, D)
    extra = {"q_global": r(B, H, L, D), "k_global": r(B, Hkv, N_GLOBAL, D)} if args.mask == "lambda_qglobal" else {}
    do = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def run() -> torch.Tensor:
        if args.impl == "longkit":
            return masked_attention(q, k, v, mask=case["mask"], **extra)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = SDPBackend.CUDNN_ATTENTION if args.impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)

    for _ in range(args.iters):
        if args.bwd:
            torch.autograd.grad(run(), [q, k, v, *extra.values()], do)
        else:
            with torch.no_grad():
                run()
    torch.cuda.synchronize()
    print(f"{args.impl} {args.mask} hd {D} T {L} B {B} H {H}/{Hkv}: {args.iters} launches done")


if __name__ == "__main__":
    main()
