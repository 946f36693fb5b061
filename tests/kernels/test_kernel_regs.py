"""Offline sm_90a compile of the dk/dv kernel (Triton's bundled ptxas; no GPU): register spills under GQA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gqa_dkdv_kernel_does_not_spill_more_than_mha(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    # a subprocess: the kernel tests run Triton's interpreter, which replaces the kernels this needs to compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "regs.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_regs.py"), "--hd", "128", "--masks", "causal",
                    "--group", "1", "4", "--kernels", "bwd_dkdv", "--out", str(out)], env=env,
                   check=True, capture_output=True, timeout=600)
    mha, gqa = sorted(json.loads(out.read_text())["rows"], key=lambda r: r["group"])
    # the whole GQA group in one program (the default above hd 64): a head loop nested around the pipelined
    # query-block loop spilled 896 B per thread (vs 128 B without GQA)
    assert gqa["stack"] <= mha["stack"] + 64, (mha, gqa)


SMEM_LIMIT = 227 * 1024  # H100/H200: the most shared memory one block may use


def test_every_default_tile_fits_shared_memory(tmp_path: Path) -> None:
    """Head dims the GPU tests do not run (96 pads to 128; 256 takes the generic tiles; 64 and 128 run on the
    device), every mask kind, GQA: each kernel's default tiles must fit an sm_90 block's shared memory."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "smem.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_regs.py"), "--hd", "96", "256",
                    "--group", "4", "--out", str(out)], env=env, check=True, capture_output=True, timeout=1200)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 2 * 5 * 4, len(rows)  # head dims x masks x kernels
    too_big = [r for r in rows if r["smem"] > SMEM_LIMIT]
    assert not too_big, too_big


def test_ws_kernels_are_warp_specialized(tmp_path: Path) -> None:
    """Triton compiles a kernel whose specialisation it cannot do without it, silently (an unmasked loop plus a
    masked tail did that): the Hopper defaults ``fwd_ws`` (causal per tile and paired, and Λ) / ``bwd_dkdv_ws`` must
    come out specialised."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "ws.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_regs.py"), "--hd", "128", "--masks", "causal",
                    "lambda", "--group", "1", "--kernels", "fwd_ws", "fwd_ws_paired", "bwd_dkdv_ws", "bwd_dkdv_tma",
                    "--out", str(out)],
                   env=env, check=True, capture_output=True, timeout=900)
    rows = {(r["mask"], r["kernel"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("causal", "fwd_ws"), ("causal", "fwd_ws_paired"), ("causal", "bwd_dkdv_ws"),
                         ("causal", "bwd_dkdv_tma"), ("lambda", "fwd_ws"), ("lambda", "bwd_dkdv_ws"),
                         ("lambda", "bwd_dkdv_tma")}, sorted(rows)
    for (_mask, kernel), r in rows.items():
        assert r["warp_specialized"] == ("_ws" in kernel), r
        assert r["smem"] <= SMEM_LIMIT, r


def test_fp32_pointer_kernels_fit_shared_memory(tmp_path: Path) -> None:
    """fp32 inputs on a GPU run the pointer kernels with tiles shrunk for 4-byte elements (the 16-bit defaults at
    hd 128 asked 448 KiB of shared memory on the H100): each must fit an sm_90 block."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "fp32.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_regs.py"), "--hd", "128", "--dtype", "fp32",
                    "--masks", "causal", "lambda", "--group", "1", "--kernels", "fwd", "bwd_dkdv", "bwd_dq",
                    "--out", str(out)], env=env, check=True, capture_output=True, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 3, rows
    too_big = [r for r in rows if r["smem"] > SMEM_LIMIT]
    assert not too_big, too_big
