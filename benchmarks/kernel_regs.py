"""Registers and local memory (spills) of the masked-attention kernels, compiled offline for a GPU target.

No GPU needed: Triton compiles to PTX for ``--arch`` (default sm_90a, the H100/H200) and its bundled ``ptxas -v``
reports registers and stack per kernel. The launch is specialised the way Triton specialises a real launch
(pointers and strides divisible by 16, ``GROUP == 1`` folded to a constant), so the numbers match what
``launch_stats()`` reports on the device (stack bytes = 4 × Triton's ``n_spills``). Use it to check a kernel
change for register pressure before spending device time; it says nothing about speed. Triton also reports the
shared memory each launch needs (``smem``), which must fit the H100/H200's 227 KiB per block. For the
warp-specialised kernels (``fwd_ws``, ``fwd_ws_paired``, ``bwd_dkdv_ws``) ptxas reports the launch's registers
per thread; their consumer warpgroups raise theirs at run time with ``setmaxnreg`` (232 in the TTGIR at hd 128).

``--ptx-dir DIR`` also writes each compiled variant's PTX to ``DIR/<kernel>__<mask>__hd<D>__g<group>__<dtype>.ptx``;
``--compare-ptx A B`` compares two such dumps (or folders of repeated dumps) with the debug line info stripped
(``strip_ptx_debug``), which changes whenever kernel code moves between files, so that a refactor can show it left
the generated code alone. Give each dump its own ``TRITON_CACHE_DIR``: Triton's cache key ignores the file a kernel
lives in, so a second dump would otherwise read the first one's PTX back.

    python benchmarks/kernel_regs.py --hd 128 64 --group 1 4
    python benchmarks/kernel_regs.py --masks all --dtype bf16 fp16 --ptx-dir /tmp/ptx/after
    python benchmarks/kernel_regs.py --compare-ptx /tmp/ptx/before /tmp/ptx/after
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import longkit
from longkit.kernels.masked_attn import bwd, configs, dkdv_tma, fwd, fwd_ws, plan

MASKS = {
    "causal": {},
    "lambda": {"HAS_WINDOW": True},
    "lambda_qglobal": {"HAS_WINDOW": True, "USE_GLOBAL": True},
    "documents": {"HAS_DOCS": True},
    "shared_prefix": {"HAS_PREFIX": True},
    "documents_lambda": {"HAS_DOCS": True, "HAS_WINDOW": True},
    "documents_prefix": {"HAS_DOCS": True, "HAS_PREFIX": True},
}
DEFAULT_MASKS = ["causal", "lambda", "lambda_qglobal", "documents", "shared_prefix"]
DTYPES = {"bf16", "fp16", "fp32"}
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
                  arch: int = 90, dtype: str = "bf16", descs: dict[str, str] | None = None,
                  ptx_path: Path | None = None) -> dict[str, int]:
    """Compile ``kernel`` offline; return ``{"regs", "stack", "spill_stores", "spill_loads"}`` from ptxas, the
    shared memory the launch needs (``"smem"`` bytes, Triton's figure) and whether it was warp-specialised. With
    ``ptx_path``, also write the PTX there."""
    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    sig, attrs = _signature(kernel, consts, dtype, descs)
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    if ptx_path is not None:
        ptx_path.write_text(compiled.asm["ptx"])
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


def kernel_variants(head_dim: int, mask: str, group: int,
                    elem_bytes: int = 2) -> list[tuple[str, triton.JITFunction, dict, dict]]:
    """``(name, kernel, tiles, constexpr overrides)`` of every kernel a launch of this case may run, with the tiles
    the launchers pick for inputs of ``elem_bytes`` bytes."""
    flags = {"HAS_WINDOW": False, "HAS_DOCS": False, "HAS_PREFIX": False, "USE_GLOBAL": False, **MASKS[mask]}
    cfg_kv, cfg_q = configs.bwd_config(head_dim, flags, elem_bytes)
    plain = {**flags, "USE_GLOBAL": False}
    # with the distance limit, only the sink kv blocks run the q_global dk/dv variant (their own launch)
    kernels = [("fwd", fwd._fwd_kernel, configs.fwd_config(head_dim, flags, elem_bytes), {}),
               ("bwd_dkdv", bwd._bwd_dkdv_kernel, configs.bwd_config(head_dim, plain, elem_bytes)[0], plain),
               ("bwd_dq", bwd._bwd_dq_kernel, cfg_q, {})]
    if flags["USE_GLOBAL"]:
        kernels.insert(2, ("bwd_dkdv_sink", bwd._bwd_dkdv_kernel, cfg_kv, {"CHUNKED": True}))
    if group > 1:
        # GQA at hd <= 64: one query head per dk/dv program by default (SPLIT_HEADS, fp32 partials)
        kernels.insert(2, ("bwd_dkdv_split", bwd._bwd_dkdv_kernel, kernels[1][2],
                           {**plain, "GROUP": 1, "SPLIT_HEADS": True}))
    if head_dim in (16, 32, 64, 128):
        # the default dk/dv on Hopper (TMA loads); the pointer kernel above runs elsewhere
        kernels.insert(1, ("bwd_dkdv_tma", dkdv_tma._bwd_dkdv_tma_kernel, configs.tma_dkdv_config(head_dim, plain),
                           plain))
    if head_dim in (16, 32, 64, 128):
        # the warp-specialised kernels (Hopper defaults at hd 128 where they apply; LONGKIT_ATTN_WS_FWD / _WS_DKDV)
        if not any(flags.values()):
            kernels.insert(1, ("fwd_ws", fwd_ws._fwd_ws_kernel, configs.ws_fwd_config(), {"WS": True}))
            kernels.insert(2, ("fwd_ws_paired", fwd_ws._fwd_ws_paired_kernel, configs.ws_fwd_config(), {"WS": True}))
        elif not (flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"]):  # Λ with sinks, and without
            kernels.insert(1, ("fwd_ws", fwd_ws._fwd_ws_window_kernel, configs.ws_fwd_config(),
                               {"WS": True, "HAS_SINKS": True}))
            kernels.insert(2, ("fwd_ws_nosinks", fwd_ws._fwd_ws_window_kernel, configs.ws_fwd_config(),
                               {"WS": True, "HAS_SINKS": False}))
        if not (flags["HAS_PREFIX"] or (flags["HAS_DOCS"] and flags["HAS_WINDOW"])):  # where its pass compiles
            tma_cfg = configs.tma_dkdv_config(head_dim, plain)
            kernels.insert(-1, ("bwd_dkdv_ws", dkdv_tma._bwd_dkdv_ws_kernel,
                                configs.ws_dkdv_config(head_dim, tma_cfg), plain))
    # delta = rowsum(dO * O) (- dlse when the loss uses lse); launched with Triton's default warps and stages
    pre = {"BLOCK_M": 64, "BLOCK_N": 0, "num_warps": 4, "num_stages": 3}
    kernels.append(("bwd_preprocess", bwd._bwd_preprocess_kernel, pre, {"HAS_DLSE": False}))
    kernels.append(("bwd_preprocess_dlse", bwd._bwd_preprocess_kernel, pre, {"HAS_DLSE": True}))
    return kernels


def kernel_rows(head_dim: int, mask: str, group: int, names: set[str] | None = None, dtype: str = "bf16",
                ptx_dir: Path | None = None) -> list[dict]:
    """Stats of the kernels (``names``, default all) with the tiles the launchers pick for this case; with
    ``ptx_dir``, their PTX too."""
    flags = {"HAS_WINDOW": False, "HAS_DOCS": False, "HAS_PREFIX": False, "USE_GLOBAL": False, **MASKS[mask]}
    base = {**flags, "HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "FAST_PATH": True, "CHUNKED": False, "SPLIT_HEADS": False}
    base["GROUP"] = group  # a constexpr of the dk/dv kernel; Triton folds the dq kernel's GROUP == 1 too
    rows = []
    for name, kernel, cfg, override in kernel_variants(head_dim, mask, group, 4 if dtype == "fp32" else 2):
        if names is not None and name not in names:
            continue
        tiles = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
        consts = {**base, **override, **tiles}
        if name in ("fwd", "bwd_dq"):  # one kv loop or three, as the launcher picks (LONGKIT_ATTN_MERGED_LOOPS)
            consts["MERGED"] = plan.merged_loops("fwd" if name == "fwd" else "dq", head_dim, flags)
        if name == "bwd_dq" and group != 1:
            del consts["GROUP"]  # a run-time argument there
        descs = _tma_descs(cfg, base["BLOCK_D"], dtype, flags) if name == "bwd_dkdv_tma" else None
        ptx_path = None if ptx_dir is None else ptx_dir / f"{name}__{mask}__hd{head_dim}__g{group}__{dtype}.ptx"
        stats = compile_stats(kernel, consts, cfg["num_warps"], cfg["num_stages"], dtype=dtype, descs=descs,
                              ptx_path=ptx_path)
        rows.append({"D": head_dim, "mask": mask, "group": group, "dtype": dtype, "kernel": name,
                     "cfg": f"{cfg['BLOCK_M']},{cfg['BLOCK_N']},{cfg['num_warps']},{cfg['num_stages']}", **stats})
    return rows


# Debug line info: the ``.loc`` / ``.file`` directives and the DWARF sections (``.section .debug_abbrev``,
# ``.debug_info``, ...: file, directory and function names, inlined-call lines). It names the source file and line of
# every instruction, so it changes when kernel code moves between files although the instructions do not.
PTX_DEBUG_LINES = re.compile(r"^\s*(\.loc|\.file)\b")
PTX_DEBUG_SECTION = re.compile(r"^\s*\.section\s+\.debug_")


def strip_ptx_debug(ptx: str) -> list[str]:
    """``ptx``'s lines without the debug line info: ``PTX_DEBUG_LINES`` and every ``.section .debug_*`` block (from
    its ``.section`` line to its closing brace, or that one line when it holds both braces)."""
    out: list[str] = []
    in_debug = False
    for line in ptx.splitlines():
        if PTX_DEBUG_SECTION.match(line):
            in_debug = "}" not in line
            continue
        if in_debug:
            in_debug = line.strip() != "}"
            continue
        if not PTX_DEBUG_LINES.match(line):
            out.append(line)
    return out


def ptx_entry(ptx: str) -> str | None:
    """The kernel name of a PTX module (its ``.entry``)."""
    m = re.search(r"\.entry\s+([\w$]+)", ptx)
    return m.group(1) if m else None


def _ptx_runs(dump: Path) -> list[Path]:
    """A ``--ptx-dir`` dump, or a folder of repeated dumps of one checkout (its subfolders)."""
    runs = sorted(p for p in dump.iterdir() if p.is_dir())
    return runs or [dump]


def compare_ptx(before: Path, after: Path) -> bool:
    """Compare two ``--ptx-dir`` dumps variant by variant (file name) with the debug info stripped; print the counts
    and every difference. Either side may be a folder of repeated dumps (see ``_ptx_runs``): Triton 3.6 does not
    compile every kernel deterministically (the warp-specialised dk/dv's shared-memory barriers come out in either
    order from one process to the next), so a variant matches when some compile before and some compile after
    produced the same code. True when every variant matches, with the same kernel name (``.entry``)."""
    outcomes: list[dict[str, set[tuple[str, ...]]]] = []
    entries: list[dict[str, set[str | None]]] = []
    raw: list[dict[str, set[str]]] = []
    for dump in (before, after):
        out: dict[str, set[tuple[str, ...]]] = {}
        ent: dict[str, set[str | None]] = {}
        txt: dict[str, set[str]] = {}
        for run in _ptx_runs(dump):
            for f in run.glob("*.ptx"):
                text = f.read_text()
                out.setdefault(f.name, set()).add(tuple(strip_ptx_debug(text)))
                ent.setdefault(f.name, set()).add(ptx_entry(text))
                txt.setdefault(f.name, set()).add(text)
        outcomes.append(out)
        entries.append(ent)
        raw.append(txt)
    a, b = set(outcomes[0]), set(outcomes[1])
    ok = a == b
    for name in sorted(a ^ b):
        print(f"only in {before if name in a else after}: {name}")
    same_raw = same = unstable = 0
    for name in sorted(a & b):
        oa, ob = outcomes[0][name], outcomes[1][name]
        same_raw += bool(raw[0][name] & raw[1][name])
        unstable += len(oa) > 1 or len(ob) > 1
        if oa & ob and entries[0][name] == entries[1][name] and len(entries[0][name]) == 1:
            same += 1
            continue
        ok = False
        la, lb = min(oa), min(ob)
        i = next(i for i, (x, y) in enumerate(zip([*la, ""], [*lb, ""])) if x != y)
        print(f"DIFFERENT {name}: entry {entries[0][name]} / {entries[1][name]}; first differing stripped line {i}: "
              f"{la[i] if i < len(la) else ''!r} / {lb[i] if i < len(lb) else ''!r}")
    print(f"{len(a)} kernel variants before, {len(b)} after; {same_raw} byte-identical, {same} identical with debug "
          f"line info stripped; {unstable} compiled to more than one code across the runs of one side")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hd", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--masks", nargs="+", default=DEFAULT_MASKS, choices=[*MASKS, "all"])
    ap.add_argument("--group", type=int, nargs="+", default=[1, 4], help="query heads per kv head (GQA)")
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES), help="q/k/v dtype")
    ap.add_argument("--kernels", nargs="+",
                    default=["fwd", "fwd_ws", "fwd_ws_paired", "bwd_dkdv_tma", "bwd_dkdv_ws", "bwd_dkdv",
                             "bwd_dkdv_split",
                             "bwd_dkdv_sink", "bwd_dq"])
    ap.add_argument("--all-kernels", action="store_true",
                    help="every kernel variant, also the Λ forward without sinks and the backward preprocess")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--ptx-dir", type=Path, default=None, help="write each compiled variant's PTX here")
    ap.add_argument("--compare-ptx", nargs=2, type=Path, metavar=("A", "B"),
                    help="compare two --ptx-dir dumps (debug line info stripped) instead of compiling")
    args = ap.parse_args()
    if args.compare_ptx:
        sys.exit(0 if compare_ptx(*args.compare_ptx) else 1)
    masks = list(MASKS) if "all" in args.masks else args.masks
    names = None if args.all_kernels else set(args.kernels)
    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
        print(f"kernels from {Path(longkit.__file__).parent}")  # which checkout a before/after dump compiled
    rows = []
    print(f"{'D':>4} {'mask':<16} {'group':>5} {'dtype':>5} {'kernel':<19} {'cfg':<12} {'regs':>5} {'stack B':>8} "
          f"{'smem KiB':>9}")
    for hd in args.hd:
        for mask in masks:
            for group in args.group:
                for dtype in args.dtype:
                    for r in kernel_rows(hd, mask, group, names, dtype, args.ptx_dir):
                        rows.append(r)
                        print(f"{r['D']:>4} {r['mask']:<16} {r['group']:>5} {r['dtype']:>5} {r['kernel']:<19} "
                              f"{r['cfg']:<12} {r['regs']:>5} {r['stack']:>8} {r['smem'] / 1024:>9.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
