"""Does the TMA dk/dv kernel (``dkdv_tma.py``) run under Triton's Hopper warp specialisation (``WARP_SPEC=True``)?

On an H200 with Triton 3.6 the specialised kernel compiled but never finished (2026-12-01), while the same kernel
unspecialised matched the pointer kernel. This runs the kernel and source variants of it (2-D instead of 4-D
descriptors, flat lse, the probe's loop form) each in its own process with a timeout and prints which finish.

    PYTHONPATH=. python benchmarks/ws_probe/hang.py
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SRC = (ROOT / "longkit/kernels/masked_attn/dkdv_tma.py").read_text()


def _desc2d(s):
    s = s.replace(
        "q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)", "q_desc.load([(b * Hq + h) * Tq + start_m, 0])"
    )
    s = s.replace(
        "do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)", "do_desc.load([(b * Hq + h) * Tq + start_m, 0])"
    )
    s = s.replace(
        "k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)", "k_desc.load([(b * Hkv + hk) * Tk + start_n, 0])"
    )
    s = s.replace(
        "v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)", "v_desc.load([(b * Hkv + hk) * Tk + start_n, 0])"
    )
    for n in ("q", "grad_out", "k", "v"):
        blk = "bn" if n in ("k", "v") else "bm"
        s = s.replace(
            f"TensorDescriptor({n}, list({n}.shape), list({n}.stride()), [1, 1, {blk}, block_d])",
            f"TensorDescriptor({n}.reshape(-1, D), [{n}.numel() // D, D], [D, 1], [{blk}, block_d])",
        )
    return s


def _lse1d(s):
    s = s.replace("lse_desc.load([row, start_m]).reshape(BLOCK_M)", "lse_desc.load([row * Tq + start_m])")
    s = s.replace("delta_desc.load([row, start_m]).reshape(BLOCK_M)", "delta_desc.load([row * Tq + start_m])")
    s = s.replace(
        "lse_d = _desc_2d(_rows_2d(lse2, B * Hq, Tq), bm)",
        "lse_d = TensorDescriptor(lse2.reshape(-1), [lse2.numel()], [1], [bm])",
    )
    s = s.replace(
        "delta_d = _desc_2d(_rows_2d(delta, B * Hq, Tq), bm)",
        "delta_d = TensorDescriptor(delta.reshape(-1), [delta.numel()], [1], [bm])",
    )
    return s


def _probe_loop(s):
    old = """    for it in tl.range(0, GROUP * n_m, warp_specialize=WARP_SPEC):
        if GROUP == 1:
            g = 0
            mb = m_start + it
        else:
            g = it // n_div
            mb = m_start + it - g * n_div
        h = hk * GROUP + g
        start_m = mb * BLOCK_M
"""
    assert old in s
    return s.replace(
        old,
        """    for start_m in tl.range(m_start * BLOCK_M, m_end * BLOCK_M, BLOCK_M, warp_specialize=WARP_SPEC):
        h = hk
""",
    )


VARIANTS = {
    "as_is": lambda s: s,
    "desc2d": _desc2d,
    "lse1d": _lse1d,
    "both": lambda s: _lse1d(_desc2d(s)),
    "both_probe_loop": lambda s: _probe_loop(_lse1d(_desc2d(s))),
}
RUN = textwrap.dedent("""
    import sys, torch, importlib.util
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
    import os
    os.environ["LONGKIT_ATTN_TMA_DKDV"] = "0"
    ref = flash.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, None, None, 0, 0, 0, D ** -0.5)
    os.environ["LONGKIT_ATTN_TMA_DKDV"] = "1"
    # 4 warps: the specialised kernel runs 12 (one producer, two consumer warpgroups)
    os.environ["LONGKIT_ATTN_TMA_DKDV_CONFIG"] = "64,128,4,3" if "{ws}" == "1" else "64,128,8,3"
    got = flash.flash_masked_attention_bwd(do, None, q, k, v, out, lse, None, None, None, None, 0, 0, 0, D ** -0.5)
    torch.cuda.synchronize()
    print("RESULT", [round((a.float() - b.float()).abs().max().item(), 4) for a, b in zip(got[:3], ref[:3])])
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
    outs = []
    for kernel in ("device", "host"):
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if kernel == "device":
            ws_dkdv[(T // BN, B * H)](q, k, v, do, lse, delta, dk, dv, T, 0.1, 0.1, D=D, BLOCK_M=BM, BLOCK_N=BN,
                                      WS={ws}, num_warps=4, num_stages=3)
        else:
            pairs = ((q, BM), (k, BN), (v, BN), (do, BM))
            d = [TensorDescriptor(t, [B * H * T, D], [D, 1], [bm, D]) for t, bm in pairs]
            l1 = [TensorDescriptor(t, [B * H * T], [1], [BM]) for t in (lse, delta)]
            ws_dkdv_host[(T // BN, B * H)](*d, *l1, dk, dv, T, 0.1, 0.1, D=D, BLOCK_M=BM, BLOCK_N=BN, WS={ws},
                                           num_warps=4, num_stages=3)
        torch.cuda.synchronize()
        outs.append((dk.float(), dv.float()))
        print("RESULT", kernel, "finished", flush=True)
    print("RESULT max |device - host|", max((a - b).abs().max().item() for a, b in zip(outs[0], outs[1])))
""")


def probe_kernels() -> None:
    """The probe's dk/dv (which ran specialised) with device-side vs host-side descriptors."""
    for ws in ("True", "False"):
        code = PROBE_RUN.format(here=Path(__file__).resolve().parent, ws=ws)
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            res = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")] or [r.stderr[-300:]]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            res = [ln for ln in out.splitlines() if ln.startswith("RESULT")] + ["TIMEOUT (hang)"]
        print("probe", "warp-specialised" if ws == "True" else "plain", " | ".join(res), flush=True)


def main() -> None:
    probe_kernels()
    for name, f in VARIANTS.items():
        for ws in ("1", "0"):
            src = f(SRC)
            if ws == "1":
                assert "WARP_SPEC=False" in src, "the launcher no longer passes WARP_SPEC=False"
                src = src.replace("WARP_SPEC=False", "WARP_SPEC=True")
            path = Path(f"/tmp/dkdv_tma_{name}_{ws}.py")
            path.write_text(src)
            code = RUN.format(root=ROOT, path=path, T=128, ws=ws)
            try:
                r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
                res = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")] or [r.stderr[-300:]]
            except subprocess.TimeoutExpired:
                res = ["TIMEOUT (hang)"]
            print(name, "warp-specialised" if ws == "1" else "plain", res[0], flush=True)


if __name__ == "__main__":
    main()
