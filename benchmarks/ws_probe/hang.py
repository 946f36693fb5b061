"""Does the TMA dk/dv kernel (``dkdv_tma.py``) run under Triton 3.6's Hopper warp specialisation?

History (H200, 2026-12-01): the first specialised version compiled but never finished, while the same kernel
unspecialised matched the pointer kernel. The TTGIR shows why (offline, ``benchmarks/kernel_regs.py`` style
compile): the pass splits the k/v loads before the loop between its two consumer warpgroups (64 of the 128 kv
rows each) and shrinks the box of descriptors made *in the kernel* to match, but a *host* descriptor keeps its
128-row box (``tensordesc_meta``), so each copy delivers twice the bytes its barrier waits for. The kernel now
makes its k/v descriptors in the kernel when ``LONGKIT_ATTN_TMA_DKDV_WARPSPEC=1``.

This runs, each in its own process with a timeout, at a small causal shape:

* the kernel with ``LONGKIT_ATTN_TMA_DKDV_WARPSPEC=1`` (expected to finish and match the pointer kernel);
* the same with host k/v descriptors, the first version (expected to hang);
* the probe's simplified dk/dv (``kernels.py``) with device- and host-made descriptors (expected: the device
  one finishes, the host one hangs).

    PYTHONPATH=. python benchmarks/ws_probe/hang.py [--with-expected-hangs]
"""

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SRC = (ROOT / "longkit/kernels/masked_attn/dkdv_tma.py").read_text()
KV_IN_KERNEL = "    if WARP_SPEC:\n        # The specialisation pass splits this load"

RUN = textwrap.dedent("""
    import os, sys, torch, importlib.util
    sys.path.insert(0, "{root}")
    import longkit.kernels.masked_attn.flash as flash
    spec = importlib.util.spec_from_file_location("longkit.kernels.masked_attn.dkdv_tma", "{path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["longkit.kernels.masked_attn.dkdv_tma"] = mod
    spec.loader.exec_module(mod)
    B, H, T, D = 1, 2, {T}, 128
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = flash.flash_masked_attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, D ** -0.5)
    os.environ["LONGKIT_ATTN_TMA_DKDV"] = "0"
    ref = flash.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, None, None, 0, 0, 0, D ** -0.5)
    os.environ["LONGKIT_ATTN_TMA_DKDV"] = "1"
    os.environ["LONGKIT_ATTN_TMA_DKDV_WARPSPEC"] = "{ws}"
    got = flash.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, None, None, 0, 0, 0, D ** -0.5)
    torch.cuda.synchronize()
    print("RESULT max |tma - pointer| (dq, dk, dv)",
          [round((a.float() - b.float()).abs().max().item(), 4) for a, b in zip(got[:3], ref[:3])])
""")

PROBE_RUN = textwrap.dedent("""
    import sys, torch, triton
    from triton.tools.tensor_descriptor import TensorDescriptor
    sys.path.insert(0, "{here}")
    from kernels import ws_dkdv, ws_dkdv_host
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    B, H, T, D, BM, BN = 1, 2, 256, 128, 64, 128
    q, k, v, do = (torch.randn(B * H * T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    lse = torch.randn(B * H * T, device="cuda").abs() + 5
    delta = torch.randn(B * H * T, device="cuda")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if "{kind}" == "device":
        ws_dkdv[(T // BN, B * H)](q, k, v, do, lse, delta, dk, dv, T, 0.1, 0.1, D=D, BLOCK_M=BM, BLOCK_N=BN,
                                  WS=True, num_warps=4, num_stages=3)
    else:
        pairs = ((q, BM), (k, BN), (v, BN), (do, BM))
        d = [TensorDescriptor(t, [B * H * T, D], [D, 1], [bm, D]) for t, bm in pairs]
        l1 = [TensorDescriptor(t, [B * H * T], [1], [BM]) for t in (lse, delta)]
        ws_dkdv_host[(T // BN, B * H)](*d, *l1, dk, dv, T, 0.1, 0.1, D=D, BLOCK_M=BM, BLOCK_N=BN, WS=True,
                                       num_warps=4, num_stages=3)
    torch.cuda.synchronize()
    print("RESULT finished")
""")


def _run(code: str, timeout: float = 60) -> str:
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT (hang)"
    res = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    return res[0] if res else r.stderr[-300:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-expected-hangs", action="store_true",
                    help="also run the host-descriptor forms (each costs its full timeout when it hangs)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    args = ap.parse_args()
    host_kv = SRC.replace(KV_IN_KERNEL, "    if False:\n        # The specialisation pass splits this load")
    assert host_kv != SRC, "the kernel's k/v branch moved: update KV_IN_KERNEL"
    cases = [("specialised, k/v descriptors in the kernel", SRC, "1"),
             ("plain (not specialised)", SRC, "0")]
    if args.with_expected_hangs:
        cases.append(("specialised, host k/v descriptors (first version)", host_kv, "1"))
    for i, (label, src, ws) in enumerate(cases):
        path = Path(f"/tmp/dkdv_tma_hang_{i}.py")
        path.write_text(src)
        print(label, "|", _run(RUN.format(root=ROOT, path=path, T=256, ws=ws), args.timeout), flush=True)
    for kind in ("device", "host") if args.with_expected_hangs else ("device",):
        code = PROBE_RUN.format(here=Path(__file__).resolve().parent, kind=kind)
        print(f"probe dk/dv, specialised, {kind}-made descriptors |", _run(code, args.timeout), flush=True)


if __name__ == "__main__":
    main()
