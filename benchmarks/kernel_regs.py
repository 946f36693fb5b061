"""Registers and local memory (spills) of the masked-attention kernels, compiled offline for a GPU target.

No GPU needed: Triton compiles to PTX for ``--arch`` (default sm_90a, the H100/H200) and its bundled ``ptxas -v``
reports registers and stack per kernel. The launch is specialised the way Triton specialises a real launch
(pointers and strides divisible by 16, ``GROUP == 1`` folded to a constant), so the numbers match what
``launch_stats()`` reports on the device (stack bytes = 4 × Triton's ``n_spills``). Use it to check a kernel
change for register pressure before spending device time; it says nothing about speed. Triton also reports the
shared memory each launch needs (``smem``), which must fit the H100/H200's 227 KiB per block. For the
warp-specialised kernels (``fwd_ws``, ``fwd_ws_paired``, ``bwd_dkdv_ws``) ptxas reports the launch's registers
per thread; their consumer warpgroups raise theirs at run time with ``setmaxnreg`` (232 in the TTGIR at hd 128).

    python benchmarks/kernel_regs.py --hd 128 64 --group 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longkit.kernels.masked_attn import dkdv_tma, flash, fwd_ws

MASKS = {
    "causal": {},
    "lambda": {"HAS_WINDOW": True},
    "lambda_qglobal": {"HAS_WINDOW": True, "USE_GLOBAL": True},
    "documents": {"HAS_DOCS": True},
    "shared_prefix": {"HAS_PREFIX": True},
}
FLOAT_PTRS = {"LSE", "DELTA", "DLSE", "LSE2", "DELTA2"}
INT_PTRS = {"MQ", "MK", "MQ2"}


def _tma_descs(cfg: dict, block_d: int, dtype: str, flags: dict) -> dict[str, str]:
    """Tensor-descriptor argument types of the TMA dk/dv kernel (``dkdv_tma.py``) for these tiles."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    mq = "i32" if flags["HAS_DOCS"] or flags["HAS_PREFIX"] else "fp32"
    rows = f"tensordesc<{dtype}[1, 1, {bm}, {block_d}]>"
    cols = f"tensordesc<{dtype}[1, 1, {bn}, {block_d}]>"
    return {"q_desc": rows, "do_desc": rows, "k_desc": cols, "v_desc": cols, "lse_desc": f"tensordesc<fp32[1, {bm}]>",
            "delta_desc": f"tensordesc<fp32[1, {bm}]>", "mq_desc": f"tensordesc<{mq}[1, {bm}]>"}


def _signature(kernel: triton.JITFunction, consts: dict, dtype: str,
               descs: dict[str, str] | None = None) -> tuple[dict, dict]:
    names = kernel.arg_names
    descs = descs or {}
    n_ptrs = next(i for i, n in enumerate(names) if n.startswith(("s_", "mq_rows")) or n == "B")
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in descs:
            sig[n] = descs[n]
            continue
        elif i < n_ptrs:
            sig[n] = "*" + ("fp32" if n in FLOAT_PTRS else "i32" if n in INT_PTRS else dtype)
        elif n.startswith("sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
        if i < n_ptrs or (n.startswith("s_") and n not in kernel.do_not_specialize):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_stats(kernel: triton.JITFunction, consts: dict, num_warps: int, num_stages: int,
                  arch: int = 90, dtype: str = "bf16", descs: dict[str, str] | None = None) -> dict[str, int]:
    """Compile ``kernel`` offline; return ``{"regs", "stack", "spill_stores", "spill_loads"}`` from ptxas, the
    shared memory the launch needs (``"smem"`` bytes, Triton's figure) and whether it was warp-specialised."""
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    sig, attrs = _signature(kernel, consts, dtype, descs)
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = res.stdout + res.stderr
    stack, stores, loads = (int(x) for x in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return {"regs": int(re.search(r"Used (\d+) registers", text).group(1)), "stack": stack,
            "spill_stores": stores, "spill_loads": loads, "smem": int(compiled.metadata.shared),
            # whether Triton split the kernel into producer / consumer warps (it may silently not)
            "warp_specialized": "ttg.warp_specialize(" in compiled.asm["ttgir"]}


def kernel_rows(head_dim: int, mask: str, group: int) -> list[dict]:
    """Stats of the forward, dk/dv and dq kernels with the tiles ``flash`` picks for this case."""
    flags = {"HAS_WINDOW": False, "HAS_DOCS": False, "HAS_PREFIX": False, "USE_GLOBAL": False, **MASKS[mask]}
    base = {**flags, "HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "FAST_PATH": True, "CHUNKED": False, "SPLIT_HEADS": False}
    base["GROUP"] = group  # a constexpr of the dk/dv kernel; Triton folds the dq kernel's GROUP == 1 too
    cfg_kv, cfg_q = flash._bwd_config(head_dim, flags)
    plain = {**flags, "USE_GLOBAL": False}
    rows = []
    # with the distance limit, only the sink kv blocks run the q_global dk/dv variant (their own launch)
    kernels = [("fwd", flash._fwd_kernel, flash._fwd_config(head_dim, flags), {}),
               ("bwd_dkdv", flash._bwd_dkdv_kernel, flash._bwd_config(head_dim, plain)[0], plain),
               ("bwd_dq", flash._bwd_dq_kernel, cfg_q, {})]
    if flags["USE_GLOBAL"]:
        kernels.insert(2, ("bwd_dkdv_sink", flash._bwd_dkdv_kernel, cfg_kv, {"CHUNKED": True}))
    if group > 1:
        # GQA at hd <= 64: one query head per dk/dv program by default (SPLIT_HEADS, fp32 partials)
        kernels.insert(2, ("bwd_dkdv_split", flash._bwd_dkdv_kernel, kernels[1][2],
                           {**plain, "GROUP": 1, "SPLIT_HEADS": True}))
    if head_dim in (16, 32, 64, 128):
        # the default dk/dv on Hopper (TMA loads); flash's pointer kernel above runs elsewhere
        kernels.insert(1, ("bwd_dkdv_tma", dkdv_tma._bwd_dkdv_tma_kernel, dkdv_tma.tma_dkdv_config(head_dim, plain),
                           plain))
    if head_dim in (16, 32, 64, 128):
        # the warp-specialised kernels (Hopper defaults at hd 128 where they apply; LONGKIT_ATTN_WS_FWD / _WS_DKDV)
        if not any(flags.values()):
            kernels.insert(1, ("fwd_ws", fwd_ws._fwd_ws_kernel, fwd_ws.ws_fwd_config(), {"WS": True}))
            kernels.insert(2, ("fwd_ws_paired", fwd_ws._fwd_ws_paired_kernel, fwd_ws.ws_fwd_config(), {"WS": True}))
        elif not (flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"]):  # Λ with sinks
            kernels.insert(1, ("fwd_ws", fwd_ws._fwd_ws_window_kernel, fwd_ws.ws_fwd_config(),
                               {"WS": True, "HAS_SINKS": True}))
        if not flags["HAS_PREFIX"]:
            tma_cfg = dkdv_tma.tma_dkdv_config(head_dim, plain)
            kernels.insert(-1, ("bwd_dkdv_ws", dkdv_tma._bwd_dkdv_ws_kernel,
                                dkdv_tma.ws_dkdv_config(head_dim, tma_cfg), plain))
    for name, kernel, cfg, override in kernels:
        tiles = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
        consts = {**base, **override, **tiles}
        if name in ("fwd", "bwd_dq"):  # one kv loop or three, as the launcher picks (LONGKIT_ATTN_MERGED_LOOPS)
            consts["MERGED"] = flash._merged_loops("fwd" if name == "fwd" else "dq", head_dim, flags)
        if name == "bwd_dq" and group != 1:
            del consts["GROUP"]  # a run-time argument there
        descs = _tma_descs(cfg, base["BLOCK_D"], "bf16", flags) if name == "bwd_dkdv_tma" else None
        stats = compile_stats(kernel, consts, cfg["num_warps"], cfg["num_stages"], descs=descs)
        rows.append({"D": head_dim, "mask": mask, "group": group, "kernel": name,
                     "cfg": f"{cfg['BLOCK_M']},{cfg['BLOCK_N']},{cfg['num_warps']},{cfg['num_stages']}", **stats})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hd", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--masks", nargs="+", default=list(MASKS), choices=list(MASKS))
    ap.add_argument("--group", type=int, nargs="+", default=[1, 4], help="query heads per kv head (GQA)")
    ap.add_argument("--kernels", nargs="+",
                    default=["fwd", "fwd_ws", "fwd_ws_paired", "bwd_dkdv_tma", "bwd_dkdv_ws", "bwd_dkdv",
                             "bwd_dkdv_split",
                             "bwd_dkdv_sink", "bwd_dq"])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    print(f"{'D':>4} {'mask':<15} {'group':>5} {'kernel':<14} {'cfg':<12} {'regs':>5} {'stack B':>8} {'smem KiB':>9}")
    for hd in args.hd:
        for mask in args.masks:
            for group in args.group:
                for r in kernel_rows(hd, mask, group):
                    if r["kernel"] not in args.kernels:
                        continue
                    rows.append(r)
                    print(f"{r['D']:>4} {r['mask']:<15} {r['group']:>5} {r['kernel']:<14} {r['cfg']:<12} "
                          f"{r['regs']:>5} {r['stack']:>8} {r['smem'] / 1024:>9.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
