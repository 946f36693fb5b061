"""Tile configurations (block sizes, warps, pipeline stages) of every masked-attention kernel.

Each function returns launch options ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``. The defaults come from
same-run H200 sweeps (``benchmarks/attention.py --sweep``, BENCHMARKS.md); a ``LONGKIT_ATTN_*_CONFIG`` variable
(``longkit/kernels/envs.py``) overrides them for tuning, and Triton's interpreter gets small tiles so that the
tests walk many blocks. Which kernel runs is decided in ``plan.py``.
"""

from __future__ import annotations

from longkit.kernels import envs
from longkit.kernels.envs import parse_tile_config

__all__ = ["fwd_config", "bwd_config", "ws_fwd_config", "tma_dkdv_config", "ws_dkdv_config"]

# the interpreter's tiles: many blocks per test case, and fast
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def fwd_config(head_dim: int, flags: dict[str, bool], elem_bytes: int = 2) -> dict[str, int]:
    """Pointer forward tiles for inputs of ``elem_bytes`` bytes. Chosen by ``benchmarks/attention.py --sweep`` on
    an H200 (T=16k, bf16); see BENCHMARKS.md. ``LONGKIT_ATTN_FWD_CONFIG="BM,BN,warps,stages"`` overrides (tuning
    only)."""
    env = envs.attn_fwd_config()
    if env:  # before the interpreter's default, as in bwd_config: tests use it to force narrow tiles
        return env
    if envs.triton_interpreting():
        return dict(_INTERPRETER)
    return _fit_dtype(_fwd_default(head_dim, flags), head_dim, elem_bytes)


def _fwd_default(head_dim: int, flags: dict[str, bool]) -> dict[str, int]:
    plain = not (flags["HAS_WINDOW"] or flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"])
    if head_dim <= 64:
        # masked kinds: one warpgroup per 128-row tile is 1.14-1.18x faster than two (masked edges, short kv
        # runs); plain causal keeps two (attention_sweep_h200_hd64_4warps.json)
        return parse_tile_config("128,64,8,4" if plain else "128,64,4,3")
    if head_dim <= 128:
        # wide kv tiles pay on long unmasked runs (causal); masked edges and the q_global tile prefer 64
        return parse_tile_config("128,128,8,3" if plain else "128,64,8,3")
    return parse_tile_config("64,32,4,2")


def bwd_config(head_dim: int, flags: dict[str, bool], elem_bytes: int = 2) -> tuple[dict[str, int], dict[str, int]]:
    """(pointer dk/dv tiles, dq tiles) for inputs of ``elem_bytes`` bytes;
    ``LONGKIT_ATTN_BWD_CONFIG="BM,BN,warps,stages;BM,BN,warps,stages"`` overrides (tuning only)."""
    env = envs.attn_bwd_config()
    if env:
        return env
    if envs.triton_interpreting():
        c = dict(_INTERPRETER)
        return c, c
    kv, dq = _bwd_default(head_dim, flags)
    return _fit_dtype(kv, head_dim, elem_bytes), _fit_dtype(dq, head_dim, elem_bytes)


def _bwd_default(head_dim: int, flags: dict[str, bool]) -> tuple[dict[str, int], dict[str, int]]:
    plain = not (flags["HAS_WINDOW"] or flags["HAS_DOCS"] or flags["HAS_PREFIX"] or flags["USE_GLOBAL"])
    if head_dim <= 64:
        # the q_global variant (sink kv blocks only) spills 832 B per thread at 4 warps, none at 8
        kv = "32,128,8,3" if flags["USE_GLOBAL"] else "32,128,4,3"
        # dq: one warpgroup; 64-row tiles on masked kinds (backward 2-6% faster than 128x128x8 warps, same sweep)
        return parse_tile_config(kv), parse_tile_config("128,64,4,3" if plain else "64,64,4,3")
    if head_dim <= 128:
        # dk/dv holds two 128x128 fp32 accumulators plus K and V: the q_global (sink kv blocks only) / prefix
        # variants need a narrower query tile or one pipeline stage fewer
        kv = "32,128,8,2" if flags["USE_GLOBAL"] else "64,128,8,2" if flags["HAS_PREFIX"] else "64,128,8,3"
        return parse_tile_config(kv), parse_tile_config("128,64,8,3")
    c = parse_tile_config("32,32,4,1")
    return c, c


def ws_fwd_config() -> dict[str, int]:
    """Warp-specialised forward tiles: 128×128 on 4 warps (two consumer warpgroups and the producer the pass adds),
    2 stages. Fixed on purpose: on the H200 (Triton 3.6) the 3-stage and 64-wide kv-tile variants compiled, ran, and
    returned NaN (``attention_sweep_h200_ws_{4096,16384}.json``), so no override is offered."""
    if envs.triton_interpreting():
        return dict(_INTERPRETER)
    return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}


def tma_dkdv_config(head_dim: int, flags: dict[str, bool]) -> dict[str, int]:
    """TMA dk/dv tiles, from a same-run H200 sweep at 16k (``attention_sweep_h200_tma_dkdv.json``): hd 128 takes 3
    pipeline stages except with a window (2 were 3% faster there); hd 64 a 32-row query tile on 4 warps.
    ``LONGKIT_ATTN_TMA_DKDV_CONFIG="BM,BN,warps,stages"`` overrides (tuning, tests)."""
    env = envs.attn_tma_dkdv_config()
    if env:
        return env
    if envs.triton_interpreting():
        return dict(_INTERPRETER)
    if head_dim <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2 if flags["HAS_WINDOW"] else 3}


def ws_dkdv_config(head_dim: int, tma_cfg: dict[str, int]) -> dict[str, int]:
    """Warp-specialised dk/dv tiles; the kv tile must be the plain TMA kernel's (``tma_cfg``: the distance limit's
    sink launch is sized by it). ``LONGKIT_ATTN_WS_DKDV_CONFIG="BM,BN,warps,stages"`` overrides (tuning)."""
    cfg = envs.attn_ws_dkdv_config()
    if cfg:
        if cfg["BLOCK_N"] != tma_cfg["BLOCK_N"]:
            raise ValueError(f"LONGKIT_ATTN_WS_DKDV_CONFIG kv tile {cfg['BLOCK_N']} must equal the TMA dk/dv's "
                             f"({tma_cfg['BLOCK_N']})")
        return cfg
    if envs.triton_interpreting():
        return dict(tma_cfg)
    # 4 warps (the pass adds the producer warp); at hd 128 two stages were fastest on every mask of the sweep
    if head_dim > 64:
        return {**tma_cfg, "num_warps": 4, "num_stages": 2}
    return {**tma_cfg, "num_warps": 4}


def _fit_dtype(cfg: dict[str, int], head_dim: int, elem_bytes: int) -> dict[str, int]:
    """The default tiles are sized for 16-bit inputs; 4-byte (fp32) inputs above head dim 64 would need twice the
    shared memory (the hd 128 forward asked 448 KiB of the H100's 227), so their tiles shrink to 64x64, 2 stages."""
    if elem_bytes < 4 or head_dim <= 64:
        return cfg
    return {**cfg, "BLOCK_M": min(cfg["BLOCK_M"], 64), "BLOCK_N": min(cfg["BLOCK_N"], 64),
            "num_stages": min(cfg["num_stages"], 2)}
