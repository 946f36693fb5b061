"""Which kernel runs, and how its work is cut: the launchers' decisions, as functions of the inputs (no launches).

* :func:`mask_flags` gives the kernels' mask constexprs; :func:`window_covers_all` spots the Λ mask that is causal.
* :func:`merged_loops`: one kv loop or three in the pointer forward and dq.
* :func:`gqa_heads_per_program` and :func:`sink_chunk` split the pointer dk/dv over more programs (fp32 partials).
* :func:`ws_fwd_enabled`, :func:`ws_fwd_paired`, :func:`tma_dkdv_enabled`, :func:`ws_dkdv_enabled`: whether the
  Hopper kernels (``fwd_ws.py``, ``dkdv_tma.py``) run. By default only where an H200 sweep measured them faster;
  their ``LONGKIT_ATTN_*`` switches (``longkit/kernels/envs.py``) force them off, or on wherever they can run.

Which kernels run, by default, on Hopper: at head dim 128 the causal and Λ forwards are the warp-specialised ones
(causal persistent over query-block pairs up to 4k), and dk/dv at head dims 64 and 128 the TMA ones (warp-specialised
at 128, except with documents or a shared prefix). Everything else, and every other GPU, runs the pointer kernels.
"""

from __future__ import annotations

import torch
import triton

from longkit.kernels import envs

from .configs import ws_fwd_config

__all__ = [
    "mask_flags",
    "window_covers_all",
    "merged_loops",
    "GQA_SPLIT_BUDGET",
    "gqa_heads_per_program",
    "sink_chunk",
    "ws_fwd_enabled",
    "WINDOW_DEFAULT",
    "ws_fwd_paired",
    "PAIRED_MAX_TQ",
    "tma_dkdv_enabled",
    "ws_dkdv_enabled",
]


def mask_flags(n_local: int, cu_seqlens: torch.Tensor | None, segments: torch.Tensor | None,
               q_global: torch.Tensor | None) -> dict[str, bool]:
    """The kernels' mask constexprs: a window, documents, a shared prefix, the distance limit (q_global)."""
    return {"HAS_WINDOW": n_local > 0, "HAS_DOCS": cu_seqlens is not None,
            "HAS_PREFIX": segments is not None, "USE_GLOBAL": q_global is not None}


def window_covers_all(q_offset: int, Tq: int, n_local: int) -> bool:
    """Whether every query's window reaches back to key 0 (``q_offset + Tq <= n_local``). The Λ mask is then plain
    causal: the sinks lie inside every window, and the distance limit's global branch scores no pair. The
    launchers then run the causal kernels (their tiles and, on Hopper, the specialised forward): LM-Infinite on
    inputs shorter than its window pays no more than causal attention."""
    return 0 < n_local and q_offset + Tq <= n_local


def merged_loops(kernel: str, head_dim: int, flags: dict[str, bool]) -> bool:
    """Whether ``kernel`` ("fwd" / "dq") walks its kv blocks in one loop (masked blocks by a run-time branch)
    rather than three (masked head, unmasked middle, masked diagonal). Chosen per case from one H200 sweep at
    4k and 16k (``attention_sweep_h200_merged_*.json``): one loop wins where kv runs are short or registers
    tight (documents, shared prefix, most of hd 64: 1.01-1.19x) and loses on long causal runs at hd 128
    (0.93-0.99x). ``LONGKIT_ATTN_MERGED_LOOPS`` ("fwd,dq", "none", ...) overrides (tuning only)."""
    env = envs.attn_merged_loops()
    if env is not None:
        return kernel in env
    if flags["HAS_DOCS"] or flags["HAS_PREFIX"]:
        return True
    if kernel == "fwd":
        # hd 64 forward: every kind but q_global (0.87x); hd 128: only q_global (1.03x)
        return (head_dim <= 64) != flags["USE_GLOBAL"]
    return head_dim <= 64 and not (flags["HAS_WINDOW"] or flags["USE_GLOBAL"])


# GQA dk/dv partial sums: at most this many bytes of fp32 scratch (2 x B x Hq x Tk x D x 4 when fully split)
GQA_SPLIT_BUDGET = 2 << 30


def gqa_heads_per_program(group: int, full_split_bytes: int, head_dim: int) -> int:
    """Query heads per pointer dk/dv program under GQA. For head dims <= 64: 1 (each program one query head, fp32
    partials added up on the host) unless the scratch would exceed ``GQA_SPLIT_BUDGET``; then the smallest
    divisor of ``group`` that fits, up to ``group`` itself (no split, no scratch). Larger head dims: the whole
    group (an H200 run measured the split 1.04-1.11x faster at hd 64, within noise at hd 128, where its 2 GiB of
    scratch would be wasted). ``LONGKIT_ATTN_GQA_SPLIT`` overrides with a divisor of ``group`` (tests, tuning)."""
    env = envs.attn_gqa_split(group)
    if env is not None:
        return env
    if head_dim > 64:
        return group
    for d in range(1, group + 1):
        if group % d == 0 and (d == group or full_split_bytes <= d * GQA_SPLIT_BUDGET):
            return d
    return group


def sink_chunk(n_m: int, programs: int, device: torch.device) -> int:
    """Query blocks per program for the sink kv blocks: enough programs to fill the GPU about twice, at least
    16 query blocks each (a chunk's partial sums cost one [BLOCK_N, D] fp32 write per accumulator).
    ``LONGKIT_ATTN_SINK_CHUNK`` overrides (tests use it to force several chunks)."""
    env = envs.attn_sink_chunk()
    if env is not None:
        return env
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    n_chunks = max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(n_m, 16)))
    return triton.cdiv(n_m, n_chunks)


# ----------------------------------------------------------------------------- the Hopper kernels
def _ws_switch(env_name: str, forced: bool | None, mask_problem: str | None, tensors: tuple[torch.Tensor, ...],
               names: str, fallback: str, default_on: bool) -> bool:
    """The rule both warp-specialised kernels' switches follow. ``forced`` (``env_name``) False: off; True: on
    wherever the kernel can run (sm_90+ GPUs and the interpreter), else an error naming ``mask_problem`` or what is
    wrong with ``tensors`` (``names``); None (unset): ``default_on`` on a Hopper GPU, off under the interpreter
    (whose tests force it)."""
    if forced is False:
        return False
    q = tensors[0]
    why = mask_problem
    if why is None and q.shape[-1] not in (16, 32, 64, 128):
        why = f"head dim {q.shape[-1]} is not one of 16, 32, 64, 128"
    elif why is None and not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors):
        why = f"{names} are not contiguous [B, H, T, D] tensors with 16-byte aligned bases"
    elif why is None and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        why = "the GPU has no TMA (needs sm_90 or newer)"
    elif why is None and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # built and tested for 16-bit inputs; the fp32 forward at hd 128 does not compile (register/shared budget)
        why = f"the inputs are {q.dtype}, not fp16/bf16"
    if why is not None:
        if forced:
            raise ValueError(f"{env_name}=1 but {why}; unset it to use {fallback}")
        return False
    if forced:
        return True
    if envs.triton_interpreting():
        return False
    return default_on and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9


# Whether the Λ mask takes the specialised forward by default at hd 128 (from the H200 sweep in BENCHMARKS.md)
WINDOW_DEFAULT = True


def ws_fwd_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: dict[str, bool],
                   n_global: int = 0) -> bool:
    """Whether the warp-specialised forward runs: plain causal / GQA masks and the Λ mask (sinks and a window, no
    documents, shared prefix or distance limit, at most one kv block of sinks: 128), contiguous aligned inputs,
    head dims 16-128 (powers of two); by default on Hopper at head dim 128 only (at 64 it was 1.15-1.29x slower than
    the pointer kernel in the same H200 sweep), for Λ when ``WINDOW_DEFAULT``. ``LONGKIT_ATTN_WS_FWD``: ``0`` off,
    ``1`` on wherever it can run (else an error), unset the default."""
    problem = None
    if flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"]:
        problem = "the mask has documents, a shared prefix or the distance limit (q_global)"
    elif flags["HAS_WINDOW"] and n_global > ws_fwd_config()["BLOCK_N"]:
        # its sink pass reads kv block 0 only
        problem = f"the Λ mask has {n_global} sinks, more than the {ws_fwd_config()['BLOCK_N']} keys of a kv block"
    default = q.shape[-1] == 128 and (WINDOW_DEFAULT or not flags["HAS_WINDOW"])
    return _ws_switch("LONGKIT_ATTN_WS_FWD", envs.attn_ws_fwd(), problem, (q, k, v), "q/k/v", "the pointer kernel",
                      default)


# Longest query length at which the persistent pair schedule is the default. Same-run H200 sweep, hd 128, forward
# per tile / paired, mean of two rows each, causal and GQA 4:1 (attention_sweep_h200_paired_fwd_*.json): 2k 1.09-1.12x,
# 4k 1.01-1.03x, 8k 0.99-1.02x, 16k 0.96-1.00x. It pays where the per-tile prologue and epilogue weigh most.
PAIRED_MAX_TQ = 4096


def ws_fwd_paired(Tq: int, block_m: int) -> bool:
    """Whether the specialised forward runs persistent over query-block pairs (``_fwd_ws_paired_kernel``) instead of
    one program per tile. ``LONGKIT_ATTN_WS_FWD_PAIRED``: ``0`` never, ``1`` always (an odd number of query blocks
    then computes each head's middle block twice); unset: on a GPU when the number of query blocks is even and
    ``Tq <= PAIRED_MAX_TQ``, off under the interpreter. Either way the outputs are the same, bit for bit."""
    forced = envs.attn_ws_fwd_paired()
    if forced is not None:
        return forced
    return not envs.triton_interpreting() and triton.cdiv(Tq, block_m) % 2 == 0 and Tq <= PAIRED_MAX_TQ


def tma_aligned(t: torch.Tensor) -> bool:
    """TMA's constraints: 16-byte aligned base and strides, unit stride in the last dimension (and no stride-0
    broadcast dimension)."""
    e = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all((s * e) % 16 == 0 and (s > 0 or n == 1) for s, n in zip(t.stride()[:-1], t.shape[:-1])))


def tma_dkdv_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether the TMA dk/dv runs: by default on Hopper (sm_90) at head dims 64 and 128 (measured and GPU-tested)
    and under the interpreter (tests) at 16, 32, 64 and 128, when every input meets TMA's alignment; else the
    pointer kernel runs. Other head dims would need a zero-padded TMA box (not built). ``LONGKIT_ATTN_TMA_DKDV=0``
    turns it off; ``=1`` turns it on for 16/32/64/128 on any GPU and raises if the inputs cannot use it."""
    forced = envs.attn_tma_dkdv()
    if forced is False:
        return False
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        if forced:
            raise ValueError(f"LONGKIT_ATTN_TMA_DKDV=1 but head dim {D} is not one of 16, 32, 64, 128; unset it to "
                             "use the pointer kernel")
        return False
    if not all(tma_aligned(t) for t in (q, k, v, grad_out)):
        if forced:
            raise ValueError("LONGKIT_ATTN_TMA_DKDV=1 but q/k/v/grad_out are not TMA-aligned (16-byte base and "
                             "strides, contiguous last dim); unset it to use the pointer kernel")
        return False
    if forced or envs.triton_interpreting():
        return True
    # by default only where it was measured and GPU-tested: Hopper, head dims 64 and 128, 16-bit inputs
    return (D in (64, 128) and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def ws_dkdv_enabled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                    flags: dict[str, bool]) -> bool:
    """Whether the warp-specialised TMA dk/dv (``_bwd_dkdv_ws_kernel``) runs instead of the plain TMA one. It takes
    contiguous aligned q/k/v/dO, head dims 16-128, and every mask but shared prefix and documents with a window
    (Triton's warp-specialisation pass fails to compile those two). By default: Hopper, head dim 128, causal /
    GQA / Λ (with or without the distance limit), where an H200 sweep at 16k measured the backward 1.02-1.06x
    faster (documents 1.00x, hd 64 mostly slower; ``attention_sweep_h200_ws_dkdv_16k.json``).
    ``LONGKIT_ATTN_WS_DKDV``: as ``LONGKIT_ATTN_WS_FWD`` in :func:`ws_fwd_enabled`."""
    problem = None
    if flags["HAS_PREFIX"] or (flags["HAS_DOCS"] and flags["HAS_WINDOW"]):
        problem = ("the mask has a shared prefix, or documents with a window (Triton's warp-specialisation pass "
                   "fails there)")
    return _ws_switch("LONGKIT_ATTN_WS_DKDV", envs.attn_ws_dkdv(), problem, (q, k, v, grad_out), "q/k/v/grad_out",
                      "the plain TMA dk/dv", q.shape[-1] == 128 and not flags["HAS_DOCS"])
