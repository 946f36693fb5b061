"""longkit's packed KV cache for vLLM, without an engine: options, page sizes, record addressing, and the backend's
attention against longkit's reference and vLLM's own CPU kernel (chunked prefill + decode, several sequences,
GQA). The engine tests are in ``test_vllm_kv_cache_engine.py``.
"""

from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch

from longkit.errors import ConfigError, UnsupportedModelError
from longkit.kernels.kv_quant import KVQuantSpec, KVQuantState, PackedKV, bytes_per_token, dequantize_kv, quantize_kv
from longkit.vllm_plugins.kv_cache import OPTION_NAMES, page_layout, spec_from_additional_config
from longkit.vllm_plugins.kv_cache.cpu_dequant import dequantize_stored
from longkit.vllm_plugins.kv_cache.paging import batch_index, block_plan, gather_records, scatter_records

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (CPU: pip install -e '.[vllm]')")


def _opts(**kw):
    return {"longkit_kv_cache": kw}


# ----------------------------------------------------------------------------------------------------- options
def test_off_without_the_section():
    assert spec_from_additional_config(None) is None
    assert spec_from_additional_config({}) is None
    assert spec_from_additional_config({"longkit_spec": {"adaptive": False}}) is None


def test_options_are_the_shared_kvcacheconfig():
    """The section is longkit.config.KVCacheConfig (the transformers cache's options), residual_length 0."""
    import dataclasses

    from longkit.config import KVCacheConfig

    assert spec_from_additional_config(_opts()) == KVQuantSpec() == KVCacheConfig().spec()
    spec = spec_from_additional_config(_opts(key_bits=3, value_bits=2, group_size=64, rotate=False, qjl=True,
                                             qjl_dim=32, seed=5, residual_length=0))
    assert spec == KVQuantSpec(key_bits=3, value_bits=2, group_size=64, rotate=False, qjl=True, qjl_dim=32, seed=5)
    assert set(OPTION_NAMES) == {f.name for f in dataclasses.fields(KVCacheConfig)}
    assert set(OPTION_NAMES) == {*KVQuantSpec.__dataclass_fields__, "residual_length"}
    cfg = KVCacheConfig(key_bits=3, value_bits=3, residual_length=0)
    assert spec_from_additional_config({"longkit_kv_cache": dataclasses.asdict(cfg)}) == cfg.spec()


@pytest.mark.parametrize(("section", "message"), [
    ([4], "must be a JSON object of KV-cache options"),
    ({"key_bit": 4}, "did you mean 'key_bits'?"),
    ({"key_bits": 5}, "KVCacheConfig.key_bits must be"),
    ({"key_bits": "4"}, "KVCacheConfig.key_bits must be"),
    ({"rotate": 1}, "KVCacheConfig.rotate must be"),
    ({"qjl": True, "key_bits": 16}, "qjl=True sketches the key quantization residual"),
    ({"qjl_dim": 24, "qjl": True}, "qjl_dim must be a multiple of 16"),
    ({"residual_length": -1}, "KVCacheConfig.residual_length must be an int >= 0"),
])
def test_bad_options_raise_config_error(section, message):
    with pytest.raises(ConfigError, match="additional_config\\['longkit_kv_cache'\\]") as e:
        spec_from_additional_config({"longkit_kv_cache": section})
    assert message in str(e.value)


@pytest.mark.parametrize(("section", "message"), [
    ({"key_axis": "channel"}, "KIVI per-channel key scales"),
    ({"keep_channels": 0.5}, "key-channel pruning"),
    ({"residual_length": 64}, "full-precision window"),
])
def test_unbuilt_options_raise_not_implemented(section, message):
    with pytest.raises(NotImplementedError, match=message):
        spec_from_additional_config({"longkit_kv_cache": section})


# ----------------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("spec", [KVQuantSpec.identity(), KVQuantSpec(), KVQuantSpec(key_bits=3, value_bits=3),
                                  KVQuantSpec(key_bits=2, value_bits=2, group_size=64),
                                  KVQuantSpec(key_bits=3, value_bits=4, qjl=True),
                                  KVQuantSpec(key_bits=3, value_bits=3, group_size=64, codebook=True)], ids=str)
@pytest.mark.parametrize("dtype_size", [2, 4])
def test_page_layout_is_bytes_per_token_plus_padding(spec, dtype_size):
    lay = page_layout(spec, 64, 3, dtype_size)
    exact = bytes_per_token(spec, 64, 3)
    assert lay["bytes_per_token"] == exact + 3 * lay["pad_bytes"]
    assert lay["slot_bytes"] % dtype_size == 0 and 0 <= lay["pad_bytes"] < dtype_size
    assert lay["dense_bytes_per_token"] == 2 * 64 * dtype_size * 3
    if dtype_size == 2:
        assert lay["pad_bytes"] == 0  # records are whole fp16 words


# ----------------------------------------------------------------------------------------------------- paging
def _random_tables(lengths, block_size, num_blocks, gen):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, o = [], 0
    for L in lengths:
        nb = -(-L // block_size)
        tables.append(perm[o:o + nb])
        o += nb
    width = max(map(len, tables)) + 1  # vLLM's tables are wider than needed
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def test_batch_index_matches_a_loop():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    bs = 16
    seq_lens = [37, 1, 16, 60, 17]
    q_lens = [5, 1, 16, 1, 17]
    bt = _random_tables(seq_lens, bs, 40, gen)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    idx = batch_index(qsl, torch.tensor(seq_lens, dtype=torch.int32), bt, bs)
    ctx_block, ctx_off, ctx_slot, new_slot = [], [], [], []
    start = 0
    for r, (L, q) in enumerate(zip(seq_lens, q_lens)):
        for t in range(L):
            s = (start + t // bs) * bs + t % bs
            if t < L - q:
                ctx_block.append(int(bt[r, t // bs]))
                ctx_off.append(t % bs)
                ctx_slot.append(s)
            else:
                new_slot.append(s)
        assert idx.scratch_block_table[r, :-(-L // bs)].tolist() == list(range(start, start - (-L // bs)))
        start += -(-L // bs)
    assert idx.ctx_block.tolist() == ctx_block and idx.ctx_offset.tolist() == ctx_off
    assert idx.ctx_scratch_slot.tolist() == ctx_slot and idx.new_scratch_slot.tolist() == new_slot
    assert idx.num_scratch_blocks == start
    assert idx.ctx_lens.tolist() == [L - q for L, q in zip(seq_lens, q_lens)]


def test_block_plan_reads_each_block_once_and_remaps_the_table():
    bs = 16
    seq_lens = [37, 1, 40, 16]
    q_lens = [5, 1, 40, 1]
    bt = _random_tables(seq_lens, bs, 40, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    bt[2, :2] = bt[0, :2]  # sequence 2 shares its first two blocks with sequence 0 (a cached prefix)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    plan = block_plan(qsl, torch.tensor(seq_lens, dtype=torch.int32), bt, bs)
    used = sorted({int(bt[r, j]) for r, L in enumerate(seq_lens) for j in range(-(-L // bs))})
    assert plan.blocks.tolist() == used  # shared blocks once
    for r, L in enumerate(seq_lens):
        for j in range(-(-L // bs)):
            assert used[int(plan.scratch_block_table[r, j])] == int(bt[r, j])
    slots = [used.index(int(bt[r, t // bs])) * bs + t % bs for r, (L, q) in enumerate(zip(seq_lens, q_lens))
             for t in range(L - q, L)]
    assert plan.new_scratch_slot.tolist() == slots


@pytest.mark.parametrize(("kb", "vb", "g"), [(16, 16, 32), (4, 4, 32), (3, 3, 32), (2, 2, 64), (3, 4, 16), (4, 2, 16),
                                             (2, 3, 32)])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("codebook", [False, True])
def test_fast_dequantize_equals_the_reference(kb, vb, g, rotate, codebook):
    if codebook and kb == vb == 16:
        pytest.skip("the codebook needs a quantized field")
    spec = KVQuantSpec(key_bits=kb, value_bits=vb, group_size=g, rotate=rotate, codebook=codebook)
    state = KVQuantState.create(spec, 64, 3, layer_idx=2)
    k, v = torch.randn(2, 3, 37, 64).bfloat16() * 4, torch.randn(2, 3, 37, 64).bfloat16()
    packed = quantize_kv(k, v, spec, state)
    ref_k, ref_v = dequantize_kv(packed, spec, state, rotated=True)
    out_k, out_v = dequantize_stored(packed, spec, torch.float32)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    bk, _ = dequantize_stored(packed, spec, torch.bfloat16)
    assert bk.dtype == torch.bfloat16 and torch.equal(bk, ref_k.bfloat16())


def test_scatter_then_gather_round_trips_and_skips_padding():
    pages = torch.zeros(6, 2, 8, 10, dtype=torch.uint8)
    slots = torch.tensor([3, 17, -1, 40, 8])
    recs = torch.randint(1, 255, (5, 2, 10), dtype=torch.uint8)
    assert scatter_records(pages, slots, recs) == 4
    keep = slots >= 0
    got = gather_records(pages, slots[keep] // 8, slots[keep] % 8)
    assert torch.equal(got, recs[keep])
    assert int((pages != 0).any(-1).sum()) == 8  # 4 slots x 2 heads, nothing else touched


def test_records_in_pages_decode_like_the_kernel_cache():
    """Writing through slot_mapping and reading back by block table gives the records quantize_kv makes."""
    spec = KVQuantSpec(key_bits=3, value_bits=4)
    H, D, bs = 2, 64, 16
    state = KVQuantState.create(spec, D, H, layer_idx=3)
    k, v = torch.randn(1, H, 23, D), torch.randn(1, H, 23, D)
    want = quantize_kv(k, v, spec, state)
    rec = want.layout.record_bytes
    pages = torch.zeros(5, H, bs, rec + 4, dtype=torch.uint8)[..., :rec]  # padded cells, as vLLM's
    table = torch.tensor([[4, 1]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, t // bs]) * bs + t % bs for t in range(23)])
    scatter_records(pages, slots, want.buffer[0].transpose(0, 1))
    idx = batch_index(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([24], dtype=torch.int32), table, bs)
    got = gather_records(pages, idx.ctx_block, idx.ctx_offset)
    packed = PackedKV.from_buffer(spec, got.transpose(0, 1).unsqueeze(0), D)
    for a, b in zip(dequantize_kv(packed, spec, state), dequantize_kv(want, spec, state)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------- backend
SPECS = {
    "identity": dict(key_bits=16, value_bits=16, rotate=False),
    "16bit-rotated": dict(key_bits=16, value_bits=16, rotate=True),
    "4bit": dict(key_bits=4, value_bits=4),
    "3bit-norotate": dict(key_bits=3, value_bits=3, rotate=False),
    "2bit-g64": dict(key_bits=2, value_bits=2, group_size=64),
    "3bit-qjl": dict(key_bits=3, value_bits=3, qjl=True),
    "3bit-codebook": dict(key_bits=3, value_bits=3, group_size=64, codebook=True),
}


@pytest.fixture(scope="module")
def vllm_cpu():
    pytest.importorskip("vllm")
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, _get_attn_isa

    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # vLLM's worker asks the kernel for AMX state; a bare process must too
    return types.SimpleNamespace(ops=ops, Meta=CPUAttentionMetadata, isa=_get_attn_isa)


def _impls(spec_kw, Hq, Hkv, D, dtype):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from longkit.vllm_plugins.kv_cache import runtime
    from longkit.vllm_plugins.kv_cache.backend import PackedKVImpl

    spec = spec_from_additional_config(_opts(**spec_kw))
    fake = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=dtype),
                                 parallel_config=types.SimpleNamespace(decode_context_parallel_size=1))
    runtime.activate(spec)
    try:
        with set_current_vllm_config(fake):
            ours = PackedKVImpl(Hq, D, 1 / math.sqrt(D), Hkv, None, None, "auto")
            stock = CPUAttentionBackendImpl(Hq, D, 1 / math.sqrt(D), Hkv, None, None, "auto")
    finally:
        runtime.deactivate()
    return spec, ours, stock


def _exact_attention(q, k, v, q_lens, seq_lens, scale):
    """fp32 causal attention of each sequence's new queries over all its keys (``k, v`` per sequence)."""
    outs, o = [], 0
    for r, (n, L) in enumerate(zip(q_lens, seq_lens)):
        qq = q[o:o + n].float().transpose(0, 1)  # [Hq, n, D]
        kk = k[r][:L].float().transpose(0, 1).repeat_interleave(qq.shape[0] // k[r].shape[1], 0)
        vv = v[r][:L].float().transpose(0, 1).repeat_interleave(qq.shape[0] // k[r].shape[1], 0)
        s = qq @ kk.transpose(-1, -2) * scale
        mask = torch.ones(n, L, dtype=torch.bool).tril(L - n)
        outs.append((s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv).transpose(0, 1))
        o += n
    return torch.cat(outs)


def _run_steps(vllm_cpu, spec_kw, *, corrupt=False):
    """Three engine-like steps over three sequences (chunked prefill, mixed prefill + decode, decode) through the
    packed backend and through vLLM's stock backend; returns per step (ours, stock, ref32 over the records,
    exact fp32 over the unquantized keys)."""
    from longkit.vllm_plugins.kv_cache.backend import packed_attention_reference

    dt, Hq, Hkv, D, bs = torch.bfloat16, 8, 2, 64, 32
    spec, ours, stock = _impls(spec_kw, Hq, Hkv, D, dt)
    isa = vllm_cpu.isa(dt, bs, D, "auto")
    layer = types.SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0,
                                  layer_name="model.layers.3.self_attn.attn")
    lay = page_layout(spec, D, Hkv, 2)
    packed_cache = torch.zeros(40, Hkv, bs, lay["slot_bytes"] // 2, dtype=dt)
    dense_cache = torch.zeros(40, Hkv, bs, 2 * D, dtype=dt)
    lengths = [75, 6, 41]
    bt = _random_tables(lengths, bs, 40, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    K = [torch.randn(L, Hkv, D).to(dt) for L in lengths]
    V = [torch.randn(L, Hkv, D).to(dt) for L in lengths]
    Q = [torch.randn(L, Hq, D).to(dt) for L in lengths]
    done = [0, 0, 0]
    results = []
    for step in ([(0, 50), (1, 4), (2, 41)], [(0, 24), (1, 1)], [(0, 1), (1, 1)]):
        rows = [r for r, _ in step]
        q = torch.cat([Q[r][done[r]:done[r] + n] for r, n in step])
        k = torch.cat([K[r][done[r]:done[r] + n] for r, n in step])
        v = torch.cat([V[r][done[r]:done[r] + n] for r, n in step])
        sm = torch.tensor([int(bt[r, t // bs]) * bs + t % bs for r, n in step for t in range(done[r], done[r] + n)])
        q_lens = [n for _, n in step]
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        seq = torch.tensor([done[r] + n for r, n in step], dtype=torch.int32)
        sched = vllm_cpu.ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(rows), num_heads=Hq, num_kv_heads=Hkv, head_dim=D, seq_lens=seq, dtype=dt,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True,
            kv_cache_dtype="auto")
        meta = vllm_cpu.Meta(num_actual_tokens=q.shape[0], max_query_len=max(q_lens), query_start_loc=qsl,
                             max_seq_len=int(seq.max()), seq_lens=seq, block_table=bt[rows], slot_mapping=sm,
                             scheduler_metadata=sched, causal=True)
        ours.do_kv_cache_update(layer, k, v, packed_cache, sm)
        stock.do_kv_cache_update(layer, k, v, dense_cache, sm)
        out, ref = torch.empty_like(q), torch.empty_like(q)
        if corrupt:  # read another sequence's pages: the comparison below must notice
            meta_bad = type(meta)(**{**meta.__dict__, "block_table": bt[rows].roll(1, 0)})
            ours.forward(layer, q, k, v, packed_cache, meta_bad, out)
        else:
            ours.forward(layer, q, k, v, packed_cache, meta, out)
        stock.forward(layer, q, k, v, dense_cache, meta, ref)
        idx = batch_index(qsl, seq, bt[rows], bs)
        ctx = gather_records(ours._pages(packed_cache), idx.ctx_block, idx.ctx_offset)
        ref32 = packed_attention_reference(q.float(), k.float(), v.float(), ctx, idx, spec, ours._state,
                                           ours.scale, raw_dtype=dt)
        exact = _exact_attention(q, [K[r] for r in rows], [V[r] for r in rows], q_lens, seq.tolist(), ours.scale)
        results.append((step, out, ref, ref32, exact))
        for r, n in step:
            done[r] += n
    assert ours.stats["records_written"] == sum(lengths)  # every token written once
    return results


@needs_vllm
@pytest.mark.parametrize("name", list(SPECS))
def test_backend_matches_reference(vllm_cpu, name):
    """Ours vs longkit's fp32 reference over the same records, measured against vLLM's own kernel error (its bf16
    output vs fp32 attention over the same bf16 keys): at most 4x elementwise and 3x in RMS. Ours rounds to bf16
    what vLLM's stock path gets already rounded (the rotated query, the dequantized keys and values) and, with
    rotation, rounds the output twice (kernel, then after rotating back); measured over 12 random runs per setting:
    at most 3.1x (max) and 2.5x (RMS), at 2 bits. At the identity setting: bit-equal to vLLM's stock backend."""
    for step, out, stock, ref32, exact in _run_steps(vllm_cpu, SPECS[name]):
        if name == "identity":
            assert torch.equal(out, stock), f"step {step}: identity setting differs from vLLM's dense cache"
        _check(f"{name} step {step}", out, stock, ref32, exact)


def _check(name, out, stock, ref32, exact):
    from longkit.kernels.testing import assert_close, assert_rms_close

    vllm_error = ref32 + (stock.float() - exact)  # a tensor as far from ref32 as vLLM's kernel is from fp32
    assert_close(name, ref32, out.float(), lowprec_ref=vllm_error, ratio=4.0, atol_floor=1e-3)
    assert_rms_close(name, ref32, out.float(), lowprec_ref=vllm_error, lowprec_ratio=3.0, ratio=1e-4)


@needs_vllm
def test_backend_check_can_fail(vllm_cpu):
    """The comparison above is not vacuous: reading the wrong sequence's pages is caught."""
    with pytest.raises(AssertionError):
        for step, out, stock, ref32, exact in _run_steps(vllm_cpu, SPECS["4bit"], corrupt=True):
            _check(f"step {step}", out, stock, ref32, exact)


@needs_vllm
def test_customize_spec_sizes_pages_from_the_record(vllm_cpu):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from longkit.vllm_plugins.kv_cache import runtime
    from longkit.vllm_plugins.kv_cache.backend import PackedKVBackend

    for dtype in (torch.bfloat16, torch.float32):
        dense = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=dtype)
        for spec in (KVQuantSpec.identity(), KVQuantSpec(key_bits=3, value_bits=3), KVQuantSpec(qjl=True)):
            runtime.activate(spec)
            try:
                packed = PackedKVBackend.customize_spec(dense)
            finally:
                runtime.deactivate()
            lay = page_layout(spec, 64, 3, dtype.itemsize)
            assert packed.page_size_bytes == 128 * lay["bytes_per_token"]
            assert packed.page_size_bytes == 128 * (bytes_per_token(spec, 64, 3) + 3 * lay["pad_bytes"])
            assert dense.page_size_bytes == 128 * lay["dense_bytes_per_token"]
    runtime.activate(KVQuantSpec())
    try:
        with pytest.raises(UnsupportedModelError, match="full-attention layers only"):
            PackedKVBackend.customize_spec(SlidingWindowSpec(block_size=128, num_kv_heads=3, head_size=64,
                                                             dtype=torch.bfloat16, sliding_window=256))
    finally:
        runtime.deactivate()
    with pytest.raises(RuntimeError, match="no options were activated"):
        PackedKVBackend.customize_spec(dense)


# ----------------------------------------------------------------------------------------------------- install
def _fake_vllm_config(**over):
    model = types.SimpleNamespace(model="m", use_mla=False, is_hybrid=False, is_attention_free=False,
                                  is_encoder_decoder=False, get_sliding_window=lambda: None,
                                  hf_text_config=types.SimpleNamespace(), get_head_size=lambda: 64)
    cache = types.SimpleNamespace(cache_dtype="auto", kv_cache_dtype_skip_layers=[])
    cfg = types.SimpleNamespace(additional_config=_opts(key_bits=4), model_config=model, cache_config=cache)
    for k, v in over.items():
        obj, attr = k.split("__")
        setattr({"model": model, "cache": cache, "cfg": cfg}[obj], attr, v)
    return cfg


@needs_vllm
@pytest.mark.parametrize(("over", "error", "message"), [
    ({"cache__cache_dtype": "fp8"}, ConfigError, "needs kv_cache_dtype='auto'"),
    ({"cache__kv_cache_dtype_skip_layers": ["0"]}, ConfigError, "kv_cache_dtype_skip_layers"),
    ({"model__use_mla": True}, UnsupportedModelError, "multi-head latent attention"),
    ({"model__is_hybrid": True}, UnsupportedModelError, "hybrid model"),
    ({"model__get_sliding_window": lambda: 4096}, UnsupportedModelError, "sliding-window"),
    ({"model__hf_text_config": types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"])},
     UnsupportedModelError, "sliding-window"),
    ({"model__is_encoder_decoder": True}, UnsupportedModelError, "encoder-decoder"),
    ({"model__get_head_size": lambda: 24}, ConfigError, "head_dim must be a multiple of 16"),
    ({"model__get_head_size": lambda: 80}, ConfigError, "group_size=32 must divide the head dim 80"),
    ({"model__get_head_size": lambda: 80, "cfg__additional_config": _opts(group_size=16)}, ConfigError,
     "power-of-two head dim"),
])
def test_engine_config_checks(over, error, message):
    from longkit.vllm_plugins.kv_cache import check_engine_config

    assert check_engine_config(_fake_vllm_config()) == KVQuantSpec(key_bits=4)
    assert check_engine_config(_fake_vllm_config(cfg__additional_config={})) is None
    with pytest.raises(error, match=message):
        check_engine_config(_fake_vllm_config(**over))


@needs_vllm
def test_cuda_platform_is_refused(monkeypatch):
    from vllm.platforms import current_platform

    from longkit.vllm_plugins.kv_cache import CUDA_MESSAGE, check_engine_config

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    with pytest.raises(NotImplementedError, match="CUDA attention backend on longkit's Triton kernels is not built"):
        check_engine_config(_fake_vllm_config())
    assert "not built yet" in CUDA_MESSAGE and "transformers KV cache" in CUDA_MESSAGE
    assert check_engine_config(_fake_vllm_config(cfg__additional_config={})) is None  # off: nothing refused


@needs_vllm
def test_install_is_idempotent_and_undone():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from longkit.vllm_plugins import INSTALLERS
    from longkit.vllm_plugins.kv_cache import install_kv_cache, uninstall_kv_cache
    from longkit.vllm_plugins.kv_cache.install import TAG_CONFIG, TAG_RUNNER
    from longkit.vllm_plugins.patching import is_wrapped

    assert "longkit.vllm_plugins.kv_cache.install:install_kv_cache" in [i.target for i in INSTALLERS]
    was = is_wrapped(CPUModelRunner, "load_model", TAG_RUNNER)
    originals = EngineArgs.__dict__["create_engine_config"], CPUModelRunner.__dict__["load_model"]
    uninstall_kv_cache()
    try:
        assert install_kv_cache() is True
        assert install_kv_cache() is False
        assert is_wrapped(EngineArgs, "create_engine_config", TAG_CONFIG)
        assert is_wrapped(CPUModelRunner, "load_model", TAG_RUNNER)
        assert uninstall_kv_cache() is True and uninstall_kv_cache() is False
        if not was:
            assert (EngineArgs.__dict__["create_engine_config"], CPUModelRunner.__dict__["load_model"]) == originals
    finally:
        if was:
            install_kv_cache()


@needs_vllm
def test_backend_override_is_set_and_removed():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from longkit.errors import LongkitError
    from longkit.vllm_plugins.kv_cache import BACKEND_PATH, backend
    from longkit.vllm_plugins.kv_cache.install import _select_backend

    assert backend.BACKEND_PATH == BACKEND_PATH  # install.py names it without importing vLLM's backends
    cpu = AttentionBackendEnum.CPU_ATTN
    assert not cpu.is_overridden()
    try:
        _select_backend(True)
        assert cpu.get_path() == BACKEND_PATH and cpu.get_class().longkit_packed_kv
        _select_backend(False)
        assert not cpu.is_overridden()
        register_backend(cpu, "some.other.Backend")
        with pytest.raises(LongkitError, match="already overridden with 'some.other.Backend'"):
            _select_backend(True)
        _select_backend(False)  # not ours: left alone
        assert cpu.get_path() == "some.other.Backend"
    finally:
        cpu.clear_override()
