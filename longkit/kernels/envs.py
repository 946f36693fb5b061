"""Every environment variable the kernels read, one small function each (the only ``os.environ`` reads here).

Each function reads its variable when called, not at import, so a test or a tuning sweep may set it between calls;
a bad value raises ``ValueError`` naming the variable. ``docs/ENVs.md`` lists them with their defaults, which live
with the code that uses them (the functions return ``None`` when a variable is unset). Kernel packages add their own
variables here. Importing this module imports neither Triton nor torch.
"""

from __future__ import annotations

import os

__all__ = [
    "KERNEL_IMPL",
    "triton_interpreting",
    "kernel_impl",
    "parse_tile_config",
    "attn_fwd_config",
    "attn_bwd_config",
    "attn_fast_path",
    "attn_merged_loops",
    "attn_gqa_split",
    "attn_sink_chunk",
    "attn_tma_dkdv",
    "attn_tma_dkdv_config",
    "attn_ws_fwd",
    "attn_ws_fwd_paired",
    "attn_ws_dkdv",
    "attn_ws_dkdv_config",
    "rope_config",
]

KERNEL_IMPL = "LONGKIT_KERNEL_IMPL"


def _switch(name: str) -> bool | None:
    """A ``0``/``1`` switch: ``None`` when unset or empty (the caller's default)."""
    env = os.environ.get(name)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {env!r}")
    return None if not env else env == "1"


def parse_tile_config(text: str) -> dict[str, int]:
    """``"BM,BN,warps,stages"``, the tile overrides' format, as launch options."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"bad kernel config {text!r}: expected 'BM,BN,warps,stages', e.g. '64,128,8,3'")
    bm, bn, w, st = (int(x) for x in parts)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


def _tile_config(name: str) -> dict[str, int] | None:
    env = os.environ.get(name)
    return parse_tile_config(env) if env else None


# ----------------------------------------------------------------------------- every kernel
def triton_interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors in Triton's interpreter (slowly: tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_impl() -> str:
    """``LONGKIT_KERNEL_IMPL``, ``"auto"`` when unset or empty; checked by ``_dispatch.select_impl``."""
    return os.environ.get(KERNEL_IMPL) or "auto"


# ----------------------------------------------------------------------------- masked attention
def attn_fwd_config() -> dict[str, int] | None:
    """``LONGKIT_ATTN_FWD_CONFIG="BM,BN,warps,stages"``: the pointer forward's tiles."""
    return _tile_config("LONGKIT_ATTN_FWD_CONFIG")


def attn_bwd_config() -> tuple[dict[str, int], dict[str, int]] | None:
    """``LONGKIT_ATTN_BWD_CONFIG="BM,BN,warps,stages;BM,BN,warps,stages"``: the pointer dk/dv and dq tiles."""
    env = os.environ.get("LONGKIT_ATTN_BWD_CONFIG")
    if not env:
        return None
    a, b = env.split(";")
    return parse_tile_config(a), parse_tile_config(b)


def attn_fast_path() -> bool:
    """``LONGKIT_ATTN_FAST_PATH``: ``0`` applies the elementwise mask on every block (debugging); default on."""
    return os.environ.get("LONGKIT_ATTN_FAST_PATH", "1") != "0"


def attn_merged_loops() -> list[str] | None:
    """``LONGKIT_ATTN_MERGED_LOOPS="fwd,dq"``: the kernels that walk their kv blocks in one loop (names not listed,
    e.g. ``none``, walk three). Set but empty: none."""
    env = os.environ.get("LONGKIT_ATTN_MERGED_LOOPS")
    return None if env is None else env.split(",")


def attn_gqa_split(group: int) -> int | None:
    """``LONGKIT_ATTN_GQA_SPLIT``: query heads per pointer dk/dv program under GQA, a divisor of ``group``."""
    env = os.environ.get("LONGKIT_ATTN_GQA_SPLIT")
    if not env:
        return None
    if not env.isdigit() or int(env) < 1 or group % int(env):
        raise ValueError(f"LONGKIT_ATTN_GQA_SPLIT must be a divisor of the GQA group size {group}, got {env!r}")
    return int(env)


def attn_sink_chunk() -> int | None:
    """``LONGKIT_ATTN_SINK_CHUNK``: query blocks per program of the sink kv blocks' dk/dv (distance limit)."""
    env = os.environ.get("LONGKIT_ATTN_SINK_CHUNK")
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"LONGKIT_ATTN_SINK_CHUNK must be a positive integer, got {env!r}")
    return int(env)


def attn_tma_dkdv() -> bool | None:
    """``LONGKIT_ATTN_TMA_DKDV``: ``0``/``1`` forces the TMA dk/dv off / on."""
    return _switch("LONGKIT_ATTN_TMA_DKDV")


def attn_tma_dkdv_config() -> dict[str, int] | None:
    """``LONGKIT_ATTN_TMA_DKDV_CONFIG="BM,BN,warps,stages"``: the TMA dk/dv's tiles."""
    return _tile_config("LONGKIT_ATTN_TMA_DKDV_CONFIG")


def attn_ws_fwd() -> bool | None:
    """``LONGKIT_ATTN_WS_FWD``: ``0``/``1`` forces the warp-specialised forward off / on."""
    return _switch("LONGKIT_ATTN_WS_FWD")


def attn_ws_fwd_paired() -> bool | None:
    """``LONGKIT_ATTN_WS_FWD_PAIRED``: ``0``/``1`` forces the specialised forward's persistent pair schedule."""
    return _switch("LONGKIT_ATTN_WS_FWD_PAIRED")


def attn_ws_dkdv() -> bool | None:
    """``LONGKIT_ATTN_WS_DKDV``: ``0``/``1`` forces the warp-specialised TMA dk/dv off / on."""
    return _switch("LONGKIT_ATTN_WS_DKDV")


def attn_ws_dkdv_config() -> dict[str, int] | None:
    """``LONGKIT_ATTN_WS_DKDV_CONFIG="BM,BN,warps,stages"``: the warp-specialised dk/dv's tiles."""
    return _tile_config("LONGKIT_ATTN_WS_DKDV_CONFIG")


# ----------------------------------------------------------------------------- RoPE re-rotation
def rope_config() -> dict[str, int] | None:
    """``LONGKIT_ROPE_CONFIG="BLOCK_T,heads,warps"``: the re-rotation kernel's tokens per program (a power of two),
    heads per program and warps, e.g. ``32,4,4``."""
    env = os.environ.get("LONGKIT_ROPE_CONFIG")
    if not env:
        return None
    parts = env.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"LONGKIT_ROPE_CONFIG must be 'BLOCK_T,heads,warps' (positive integers), got {env!r}")
    bt, heads, warps = (int(p) for p in parts)
    if bt & (bt - 1) or warps & (warps - 1):
        raise ValueError(f"LONGKIT_ROPE_CONFIG: BLOCK_T and warps must be powers of two, got {env!r}")
    return {"BLOCK_T": bt, "HEADS": heads, "num_warps": warps}
