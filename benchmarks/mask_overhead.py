"""Host-side cost of the public ``masked_attention`` call on masks that carry tensors (documents, shared prefix).

The mask's tensor checks read CUDA values (a host-GPU sync) and the kernels' per-token tables take about ten
small launches. Both are now done once per mask object (and again after an in-place change of its tensors);
before, every call did them, and the GPU idled while the host caught up. One run times, per mask kind:

* ``kernel``: ``flash_masked_attention_fwd`` / ``_bwd`` alone (tables memoised; no validation);
* ``same_mask``: ``masked_attention`` reusing one mask object (as every layer of a model does);
* ``new_mask_per_call``: ``masked_attention`` with a fresh, equal mask object on every call (the checks and
  tables redone each call: what every call cost before the memo).

    PYTHONPATH=. python benchmarks/mask_overhead.py [--out-dir DIR] [--hd 128 64] [--seqlen 16384]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._harness import print_table, save_results  # noqa: E402

# ruff: noqa: B023 - closures over loop variables are timed inside the same iteration
from benchmarks.attention import bench, make_case  # noqa: E402
from longkit.kernels import masked_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hd", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--masks", nargs="+", default=["documents", "shared_prefix", "causal"])
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from longkit.kernels.masked_attn import launch as flash

    rows: list[dict[str, Any]] = []
    for D in args.hd:
        for kind in args.masks:
            case = make_case(kind, args.seqlen, "cuda")
            B, H, L, mask = case["B"], case["H"], case["T"], case["mask"]
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
                       for _ in range(3))
            do = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
            cu, seg = mask.cu_seqlens, mask.prefix_segments
            geo = (cu, seg, 0, mask.n_global, mask.n_local or 0, D ** -0.5)
            out, lse = flash.flash_masked_attention_fwd(q.detach(), k.detach(), v.detach(), None, None, *geo)
            variants = {
                "kernel": (lambda: flash.flash_masked_attention_fwd(q, k, v, None, None, *geo),
                           lambda: flash.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, *geo)),
                "same_mask": (lambda: masked_attention(q, k, v, mask=mask), None),
                # dataclasses.replace makes an equal mask without the memo: checks and tables run again
                "new_mask_per_call": (lambda: masked_attention(q, k, v, mask=dataclasses.replace(mask)), None),
            }
            for name, (fwd, bwd) in variants.items():
                fwd_ms = bench(fwd, False, [q, k, v], do)
                if bwd is not None:
                    import triton.testing

                    bwd_ms = triton.testing.do_bench(bwd, warmup=25, rep=100, return_mode="median")
                    fb_ms = fwd_ms + bwd_ms
                else:
                    fb_ms = bench(fwd, True, [q, k, v], do)
                row = {"D": D, "T": L, "mask": kind, "variant": name, "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms}
                rows.append(row)
                print({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
            torch.cuda.empty_cache()
    print_table(rows, ["D", "T", "mask", "variant", "fwd_ms", "fwdbwd_ms"], title="masked_attention host cost, bf16")
    save_results("mask_overhead", rows, None, args.out_dir)


if __name__ == "__main__":
    main()
