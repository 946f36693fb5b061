"""Memory blocks on LM-Infinite: reference math against per-pair oracles, the model-level rule against an independent
implementation, chunked/one-shot/decode/left-padding equivalences, offload, and errors."""

from __future__ import annotations

import math

import pytest
import torch

import longkit
from longkit import ConfigError, LMInfiniteConfig, UnsupportedModelError
from longkit.config import MemoryConfig
from longkit.hf_patches import get_patches
from longkit.hf_patches.inf_memory import MemoryCache
from longkit.kernels.block_memory import (
    block_representatives,
    gather_blocks,
    naive_memory_attention,
    received_attention,
    score_blocks,
    select_blocks,
)
from longkit.kernels.rope import naive_rope_rotate
from tests.utils import left_padded, tiny_model

MODEL_TYPES = ["llama", "qwen2", "qwen3", "mistral"]
LM = LMInfiniteConfig(n_global=3, n_local=16)
MEM = MemoryConfig(block_size=4, repr_keys=2, topk=3, chunk_size=8)


def _inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _rot(x: torch.Tensor, pos: int, f: torch.Tensor) -> torch.Tensor:
    """One vector ``[D]`` rotated to position ``pos``."""
    return naive_rope_rotate(x[None, None, None], torch.tensor([pos]), f)[0, 0, 0]


# --------------------------------------------------------------------------- reference math vs per-pair oracles
def _oracle_attention(q_pre, q_pos, win, sink, mem, n_global, n_local, limit, distance, f):
    """Per (row, head, query): explicit rotations of pre-RoPE vectors at the distance each branch prescribes."""
    b, hq, tq, d = q_pre.shape
    g = hq // win[0].shape[1]
    out = torch.zeros(b, hq, tq, d)
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                p = int(q_pos[bi, i])
                scores, vals = [], []
                k_pre, v, pos = win
                for j in range(k_pre.shape[2]):
                    s = int(pos[bi, j])
                    if n_global <= s <= p and p - s < n_local:
                        scores.append(_rot(q_pre[bi, h, i], p, f) @ _rot(k_pre[bi, h // g, j], s, f))
                        vals.append(v[bi, h // g, j])
                k_pre, v, pos = sink
                for j in range(k_pre.shape[2]):
                    s = int(pos[bi, j])
                    if 0 <= s <= p:
                        qp, ks = (p, s) if p - s < n_local else (limit, 0)
                        scores.append(_rot(q_pre[bi, h, i], qp, f) @ _rot(k_pre[bi, h // g, j], ks, f))
                        vals.append(v[bi, h // g, j])
                k_raw, v, valid = mem
                for j in range(k_raw.shape[2]):
                    if valid[bi, h // g, j]:
                        scores.append(_rot(q_pre[bi, h, i], distance, f) @ k_raw[bi, h // g, j])
                        vals.append(v[bi, h // g, j])
                if scores:
                    w = torch.softmax(torch.stack(scores) / math.sqrt(d), 0)
                    out[bi, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("distance", [16, 5], ids=lambda x: f"dist{x}")
def test_memory_attention_matches_per_pair_oracle(distance):
    b, hq, hkv, d, s_, n_local, limit, m = 2, 4, 2, 8, 3, 6, 6, 7
    f = _inv_freq(d)
    q_pos = torch.tensor([[20, 21, 22, 23], [-1, 2, 3, 4]])  # row 1: a padding query, then sinks inside the window
    win_pos = torch.tensor([[-1, 15, 16, 17, 18, 19, 20, 21, 22, 23], [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]])
    sink_pos = torch.tensor([[0, 1, 2], [0, 1, 2]])
    q_pre = torch.randn(b, hq, 4, d)
    k_pre, v_win = torch.randn(b, hkv, 10, d), torch.randn(b, hkv, 10, d)
    ks_pre, v_sink = torch.randn(b, hkv, s_, d), torch.randn(b, hkv, s_, d)
    k_mem, v_mem = torch.randn(b, hkv, m, d), torch.randn(b, hkv, m, d)
    valid = torch.rand(b, hkv, m) > 0.3
    q = naive_rope_rotate(q_pre, q_pos.clamp(min=0), f)
    k_win = naive_rope_rotate(k_pre, win_pos.clamp(min=0), f)
    k_sink = naive_rope_rotate(ks_pre, sink_pos, f)
    got = naive_memory_attention(q, q_pos, k_win=k_win, v_win=v_win, win_pos=win_pos, k_sink=k_sink, v_sink=v_sink,
                                 sink_pos=sink_pos, k_mem=k_mem, v_mem=v_mem, mem_valid=valid, n_global=s_,
                                 n_local=n_local, limit=limit, distance=distance, inv_freq=f)
    expect = _oracle_attention(q_pre, q_pos, (k_pre, v_win, win_pos), (ks_pre, v_sink, sink_pos),
                               (k_mem, v_mem, valid), s_, n_local, limit, distance, f)
    real = (q_pos >= 0)[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], expect[real], atol=1e-5, rtol=1e-4)
    assert got[~real].abs().max() == 0  # a padding query sees nothing


def test_received_attention_and_representatives_match_loops():
    b, hq, hkv, d, band, s_ = 2, 4, 2, 8, 4, 2
    tk = 14
    k = torch.randn(b, hkv, tk, d)
    k_pos = torch.arange(tk).repeat(b, 1)
    k_pos[1, :3] = -1
    q = torch.randn(b, hq, 5, d)
    q_pos = torch.tensor([[9, 10, 11, 12, 13], [9, 10, 11, 12, 13]])
    sinks = torch.randn(b, 2, hq // 2, 5, s_)  # unscaled sink logits, -inf = not seen
    sinks[0, :, :, 0, 1] = float("-inf")
    for with_sinks in (False, True):
        got = received_attention(q, k, q_pos, k_pos, band=band, n_global=s_, scale=0.3,
                                 sink_logits=sinks if with_sinks else None)
        expect = torch.zeros(b, hkv, tk)
        for bi in range(b):
            for h in range(hq):
                for i in range(5):
                    p = int(q_pos[bi, i])
                    js = [j for j in range(tk) if s_ <= k_pos[bi, j] <= p and p - k_pos[bi, j] < band]
                    logits = [q[bi, h, i] @ k[bi, h // 2, j] * 0.3 for j in js]
                    if with_sinks:
                        logits += [sinks[bi, h // 2, h % 2, i, j] * 0.3 for j in range(s_)]
                    w = torch.softmax(torch.stack(logits), 0)
                    for j, wj in zip(js, w):
                        expect[bi, h // 2, j] += wj
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)
    recv = torch.rand(3, 2, 6)
    keys = torch.randn(3, 2, 6, d)
    reps = block_representatives(keys, recv, 2)
    for i in range(3):
        for h in range(2):
            top = sorted(sorted(range(6), key=lambda j: -float(recv[i, h, j]))[:2])
            torch.testing.assert_close(reps[i, h], keys[i, h, top])


def test_block_scores_selection_and_gather_match_loops():
    b, hq, hkv, n, r, d, k = 2, 4, 2, 9, 3, 8, 4
    q = torch.randn(b, hq, d)
    reps = torch.randn(b, hkv, n, r, d)
    n_valid = torch.tensor([9, 2])
    scores = score_blocks(q, reps, n_valid, scale=0.5)
    for bi in range(b):
        for h in range(hkv):
            for m in range(n):
                want = sum(torch.logsumexp(torch.stack([q[bi, hh] @ reps[bi, h, m, j] * 0.5 for j in range(r)]), 0)
                           for hh in (2 * h, 2 * h + 1)) if m < n_valid[bi] else float("-inf")
                torch.testing.assert_close(scores[bi, h, m], torch.as_tensor(want, dtype=torch.float32),
                                           atol=1e-5, rtol=1e-5)
    idx, valid = select_blocks(scores, k)
    for bi in range(b):
        for h in range(hkv):
            best = sorted(sorted(range(int(n_valid[bi])), key=lambda m: -float(scores[bi, h, m]))[:k])
            assert idx[bi, h, :len(best)].tolist() == best and valid[bi, h].tolist() == [True] * len(best) + [
                False] * (k - len(best))
    store = torch.randn(b, hkv, n, 5, d)
    got = gather_blocks(store, idx)
    for bi in range(b):
        for h in range(hkv):
            torch.testing.assert_close(got[bi, h], torch.cat([store[bi, h, m] for m in idx[bi, h].tolist()]))



def test_select_blocks_breaks_ties_by_block_index_in_any_batch():
    """Blocks of identical tokens have identical keys, so equal scores happen (tiny vocabularies, repeated text):
    the lower block index wins, and a row selects the same blocks alone and inside a batch of other rows."""
    row = torch.tensor([[[1.0, 2.0, 0.5, 2.0, 2.0, -float("inf")]]])  # [1, 1, 6]: blocks 1, 3, 4 tie
    idx, valid = select_blocks(row, 2)
    assert idx.tolist() == [[[1, 3]]] and valid.all()
    for pos in range(3):
        others = torch.randn(2, 1, 6)
        batch = torch.cat([others[:pos], row, others[pos:]])
        assert torch.equal(select_blocks(batch, 2)[0][pos], idx[0])
        assert torch.equal(select_blocks(batch.expand(3, 4, 6).contiguous(), 2)[0][pos, 3], idx[0, 0])

# --------------------------------------------------------------------------- the whole rule vs an independent version
def _independent_memory_layer(q, k, v, n_global, n_local, limit, distance, bs, r, topk, chunk, f):
    """The positional rule of one layer over a whole unpadded sequence, from the docs, with loops: chunks cut back
    from the end; per chunk, blocks out of the window of its first query, scored by the chunk's mean memory query
    against representatives (tokens most attended by the softmax of the ``bs`` queries after them over their last
    ``bs`` keys and the sinks), top-k per KV head; attention per pair with explicit rotations (a retrieved block's
    token ``o`` at distance ``distance - o``)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = 1 / math.sqrt(d)
    raw = naive_rope_rotate(k, -torch.arange(t), f)
    q_raw = naive_rope_rotate(q, -torch.arange(t), f)
    # representatives from the band softmax of every query over its last bs keys and the sinks (LM-Infinite's rule)
    recv = torch.zeros(b, hkv, t)
    for i in range(n_global, t):
        js = list(range(max(n_global, i - bs + 1), i + 1))
        for h in range(hq):
            band = [(q[:, h, i] * k[:, h // g, j]).sum(-1) for j in js]
            sinks = [(q[:, h, i] * k[:, h // g, j]).sum(-1) if i - j < n_local else
                     (naive_rope_rotate(q_raw[:, h, i][:, None, None], torch.tensor([limit]), f)[:, 0, 0]
                      * raw[:, h // g, j]).sum(-1) for j in range(n_global)]
            w = torch.softmax(torch.stack(band + sinks) * scale, 0)  # [J + S, B]
            for j, wj in zip(js, w):
                recv[:, h // g, j] += wj
    n_blocks = (t - n_global) // bs
    # memory keys: each block as if it started at position 0 (its token o at position o)
    start = n_global + (torch.arange(t) - n_global).clamp(min=0) // bs * bs
    stored = naive_rope_rotate(k, -start, f)
    reps = torch.zeros(b, hkv, max(n_blocks, 1), r, d)
    for m in range(n_blocks):
        lo = n_global + m * bs
        top = recv[:, :, lo:lo + bs].topk(r, -1).indices.sort(-1).values + lo
        reps[:, :, m] = stored.gather(2, top[..., None].expand(b, hkv, r, d))
    out = torch.zeros_like(q)
    bounds, u1 = [], t
    while u1 > 0:
        bounds.append((max(0, u1 - chunk), u1))
        u1 -= chunk
    for u0, u1 in bounds:
        n_elig = max(0, (u0 - n_local + 1 - n_global) // bs)
        kk = min(topk, n_elig)
        chosen = [[[] for _ in range(hkv)] for _ in range(b)]
        if kk:
            qm = naive_rope_rotate(q[:, :, u0:u1], torch.full((u1 - u0,), distance) - torch.arange(u0, u1), f)
            qbar = qm.mean(2)  # [B, Hq, D]
            for bi in range(b):
                for h in range(hkv):
                    heads = range(h * g, h * g + g)
                    sc = [sum(torch.logsumexp(reps[bi, h, m] @ qbar[bi, hh] * scale, 0) for hh in heads)
                          for m in range(n_elig)]
                    chosen[bi][h] = sorted(sorted(range(n_elig), key=lambda m: -float(sc[m]))[:kk])
        for i in range(u0, u1):
            for bi in range(b):
                for h in range(hq):
                    scores, vals = [], []
                    for j in range(i + 1):
                        if i - j < n_local:
                            scores.append(q[bi, h, i] @ k[bi, h // g, j])
                        elif j < n_global:
                            scores.append(_rot(naive_rope_rotate(q[bi, h, i][None, None, None], torch.tensor([-i]), f)[
                                0, 0, 0], limit, f) @ raw[bi, h // g, j])
                        else:
                            continue
                        vals.append(v[bi, h // g, j])
                    for m in chosen[bi][h // g]:
                        for o in range(bs):  # token o of a retrieved block at distance `distance - o`
                            j = n_global + m * bs + o
                            scores.append(_rot(q_raw[bi, h, i], distance, f) @ _rot(raw[bi, h // g, j], o, f))
                            vals.append(v[bi, h // g, j])
                    w = torch.softmax(torch.stack(scores) * scale, 0)
                    out[bi, h, i] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("distance", [None, 9], ids=["dist_default", "dist9"])
def test_attention_with_retrieved_blocks_equals_independent_reference(distance):
    """The registered attention function on one layer (no cache: a plain forward) against the rule written out."""
    from longkit.hf_patches.inf_memory.attention import MemoryState, memory_attention

    b, hq, hkv, d, t = 2, 4, 2, 8, 61
    f = _inv_freq(d)
    lm = LMInfiniteConfig(n_global=2, n_local=12).resolved(64)
    cfg = MemoryConfig(block_size=3, repr_keys=2, topk=2, chunk_size=7, distance=distance)
    dist = distance or lm.limit_distance
    rotary = torch.nn.Module()
    rotary.inv_freq = f
    module = torch.nn.Module()
    module._longkit_inf_memory = MemoryState(cfg, lm, dist, rotary)
    pos = torch.arange(t)
    q = naive_rope_rotate(torch.randn(b, hq, t, d), pos, f)
    k = naive_rope_rotate(torch.randn(b, hkv, t, d), pos, f)
    v = torch.randn(b, hkv, t, d)
    got, _ = memory_attention(module, q, k, v, None, position_ids=pos[None])
    expect = _independent_memory_layer(q, k, v, 2, 12, lm.limit_distance, dist, 3, 2, 2, 7, f)
    torch.testing.assert_close(got.transpose(1, 2), expect, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- model level
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_topk0_equals_lm_infinite_logits_and_generate(model_type):
    model = tiny_model(model_type, max_position_embeddings=64)
    ids = torch.randint(1, 96, (2, 90))
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        longkit.apply_patches(model, lm_infinite=LM)
        ref, ref_gen = model(ids).logits, model.generate(ids, **gen)
        longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, topk=0, chunk_size=8))
        assert model.config._attn_implementation == "longkit_inf_memory"
        out, out_gen = model(ids).logits, model.generate(ids, **gen)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_gen, ref_gen)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_memory_changes_the_output_beyond_the_window(model_type):
    model = tiny_model(model_type, max_position_embeddings=64)
    ids = torch.randint(1, 96, (1, 80))
    with torch.no_grad():
        longkit.apply_patches(model, lm_infinite=LM)
        ref = model(ids).logits
        longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
        out = model(ids).logits
    # identical until the first chunk that can retrieve a block (its first query >= n_local + n_global + bs - 1)
    torch.testing.assert_close(out[:, :22], ref[:, :22], atol=1e-5, rtol=1e-5)
    assert (out[:, 40:] - ref[:, 40:]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("distance", [None, 40], ids=["dist_limit", "dist40"])
def test_kernel_layout_equals_reference_path_fp32(model_type, distance):
    """The CUDA path's layout (sinks and retrieved blocks turned into one masked-attention call), run on CPU through
    the masked-attention reference in fp32, equals the reference path; the same layout with the memory one position
    off does not."""
    model = tiny_model(model_type, max_position_embeddings=128)
    lm = LMInfiniteConfig(n_global=4, n_local=64, limit_distance=56)
    longkit.apply_patches(model, lm_infinite=lm, memory=MemoryConfig(block_size=16, repr_keys=4, topk=3,
                                                                     chunk_size=32, distance=distance))
    states = [m._longkit_inf_memory for m in model.modules() if hasattr(m, "_longkit_inf_memory")]
    ids = torch.randint(1, 96, (2, 300))

    def logits(kernel: bool) -> torch.Tensor:
        for st in states:
            st.use_kernel = st.kernel_layout_on_cpu = kernel
        with torch.no_grad():
            return model(ids).logits

    ref = logits(False)
    torch.testing.assert_close(logits(True), ref, atol=2e-5, rtol=1e-4)
    for st in states:
        st.distance += 1
    assert (logits(True) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_prefill_in_pieces_and_decode_equal_one_shot(model_type):
    """Forward pieces whose lengths are multiples of chunk_size (after the first) give the one-shot logits; with
    chunk_size=1, token-by-token decoding (the SDPA step over the cache's buffers) does too."""
    # float64: the pieces round differently from the one-shot forward, and in float32 that can flip a near-tied
    # top-k block choice (a different, equally valid selection) once in a while
    model = tiny_model(model_type, dtype=torch.float64, max_position_embeddings=64)
    ids = torch.randint(1, 96, (2, 130))
    for cfg, pieces in ((MEM, [18, 32, 80]), (MemoryConfig(block_size=4, repr_keys=2, topk=3, chunk_size=1),
                                              [18, 32] + [1] * 80)):
        longkit.apply_patches(model, lm_infinite=LM, memory=cfg)
        with torch.no_grad():
            one = model(ids).logits
            cache = MemoryCache(model.config.num_hidden_layers, LM.n_global, LM.n_local, None, cfg)
            outs, t = [], 0
            for n in pieces:
                outs.append(model(ids[:, t:t + n], past_key_values=cache).logits)
                t += n
        torch.testing.assert_close(torch.cat(outs, 1), one, atol=2e-5, rtol=1e-5)
        assert cache.get_seq_length() == 130 and cache.stored_tokens() <= LM.n_global + LM.n_local


def test_reselect_every_keeps_blocks_between_selections():
    """reselect_every=N: the blocks chosen at one decode step serve the next N-1 steps (differs from N=1)."""
    model = tiny_model("llama", max_position_embeddings=64)
    ids = torch.randint(1, 96, (1, 100))
    gen = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    model.generation_config.eos_token_id = None
    scores = {}
    for n in (1, 4):
        longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, topk=2, reselect_every=n))
        scores[n] = torch.stack(model.generate(ids, **gen).scores)
    torch.testing.assert_close(scores[4][:1], scores[1][:1])  # the first decode step selects in both
    assert (scores[4] - scores[1]).abs().max() > 1e-6


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_left_padded_batch_equals_rows_alone(model_type):
    model = tiny_model(model_type, max_position_embeddings=64)
    model.generation_config.eos_token_id = None
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    lengths = [70, 43, 61]
    ids, mask = left_padded(96, lengths)
    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    batch = model.generate(ids, attention_mask=mask, **gen)
    t = ids.shape[1]
    for row, n in enumerate(lengths):
        alone = model.generate(ids[row:row + 1, t - n:], **gen)
        assert torch.equal(batch.sequences[row, t:], alone.sequences[0, n:])
        torch.testing.assert_close(torch.stack(batch.scores)[:, row], torch.stack(alone.scores)[:, 0],
                                   atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # a plain padded forward too
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos).logits
        for row, n in enumerate(lengths):
            torch.testing.assert_close(logits[row, t - n:], model(ids[row:row + 1, t - n:]).logits[0],
                                       atol=1e-4, rtol=1e-4)


def test_generate_builds_the_memory_cache_and_reports_bytes():
    model = tiny_model("llama", max_position_embeddings=64)
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    ids = torch.randint(1, 96, (2, 90))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    assert isinstance(cache, MemoryCache) and cache.get_seq_length() == 93
    used = cache.nbytes()
    blocks = cache.layers[0].store.k
    assert used["host"] == 0 and used["device"] >= 2 * blocks.nbytes * model.config.num_hidden_layers


def test_offload_store_gives_the_same_tokens_and_evicts():
    """offload=True (host store + LRU device cache; on CPU both are host memory): same outputs, even with a cache
    just large enough for one selection (forcing evictions)."""
    model = tiny_model("llama", max_position_embeddings=64)
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 96, (1, 120))
    gen = dict(max_new_tokens=20, do_sample=False, output_scores=True, return_dict_in_generate=True)
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    ref = model.generate(ids, **gen)
    hkv = model.config.num_key_value_heads
    longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, repr_keys=2, topk=3, chunk_size=8,
                                                                     offload=True, gpu_blocks=hkv * 3))
    out = model.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)
    store = out.past_key_values.layers[0].store
    assert store.loads > store.slots  # blocks came and went
    nb = out.past_key_values.nbytes()
    assert nb["host"] > 0 and store.pool_k.shape[0] == hkv * 3
    longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, topk=3, offload=True,
                                                                     gpu_blocks=3))
    with pytest.raises(ConfigError, match="gpu_blocks"):
        model.generate(ids, max_new_tokens=2)


# --------------------------------------------------------------------------- API behaviour and errors
def test_install_uninstall_in_either_order():
    model = tiny_model("llama", max_position_embeddings=64)
    impl = model.config._attn_implementation
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    handle = get_patches(model)
    assert handle.configs.keys() == {"lm_infinite", "memory"}
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)  # idempotent
    assert get_patches(model) is handle
    longkit.remove_patches(model)  # memory first (reverse order)
    assert model.config._attn_implementation == impl and "_prepare_cache_for_generation" not in vars(model)
    assert not any(hasattr(m, "_longkit_inf_memory") or hasattr(m, "_longkit_lm_infinite") for m in model.modules())
    with longkit.patched(model, lm_infinite=LM, memory=MEM):  # removes memory first
        assert model.config._attn_implementation == "longkit_inf_memory"
    assert model.config._attn_implementation == impl and "_prepare_cache_for_generation" not in vars(model)
    longkit.apply_patches(model, lm_infinite=LM)
    with longkit.patched(model, memory=MEM):  # memory on an already patched model, then back to LM-Infinite
        assert model.config._attn_implementation == "longkit_inf_memory"
    assert model.config._attn_implementation == "longkit_lm_infinite"
    assert "_prepare_cache_for_generation" in vars(model)  # LM-Infinite's own wrapper is back
    longkit.apply_patches(model, memory=MEM)
    longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=20))  # memory is put back on top
    assert list(get_patches(model).configs) == ["lm_infinite", "memory"]
    assert model.config._attn_implementation == "longkit_inf_memory"
    assert all(m._longkit_inf_memory.lm.n_local == 20 for m in model.modules() if hasattr(m, "_longkit_inf_memory"))
    longkit.remove_patches(model)
    assert model.config._attn_implementation == impl and "_prepare_cache_for_generation" not in vars(model)


def test_config_errors():
    for bad, match in [({"block_size": 0}, "block_size"), ({"repr_keys": 5, "block_size": 4}, "repr_keys"),
                       ({"topk": -1}, "topk"), ({"chunk_size": 0}, "chunk_size"), ({"distance": 0}, "distance"),
                       ({"reselect_every": 0}, "reselect_every"), ({"offload": 1}, "offload"),
                       ({"gpu_blocks": 4}, "only applies with offload"), ({"topk": True}, "bool"),
                       ({"offload": True, "gpu_blocks": 2, "topk": 3}, "below topk"), ({"block_size": 2.0}, "int")]:
        with pytest.raises(ConfigError, match=match):
            MemoryConfig(**bad)


def test_combination_and_model_errors():
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(ConfigError, match="on top of LM-Infinite"):
        longkit.apply_patches(model, memory=MEM)
    with pytest.raises(ConfigError, match="on top of LM-Infinite"):
        longkit.apply_patches(model, memory=MEM, lm_infinite=LM)  # memory must come after lm_infinite
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="n_local >= 2 \\* block_size"):
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_local=16), memory=MemoryConfig(block_size=9))
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="exceeds the model's pretraining length 64"):
        longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, distance=65))
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="below block_size=4"):
        longkit.apply_patches(model, lm_infinite=LM, memory=MemoryConfig(block_size=4, distance=3))
    longkit.remove_patches(model)
    with pytest.raises(NotImplementedError, match="cuda_graph"):
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_local=16, decode="cuda_graph"), memory=MEM)
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="bounded_cache=True"):
        longkit.apply_patches(model, lm_infinite=LMInfiniteConfig(n_local=16, bounded_cache=False), memory=MEM)
    longkit.remove_patches(model)
    with pytest.raises(ConfigError, match="Valid options"):
        longkit.apply_patches(model, lm_infinite=LM, memory={"blocks": 3})
    longkit.remove_patches(model)
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="not 'gpt2'"):
        longkit.apply_patches(gpt2, lm_infinite=True, memory=MEM)


def test_runtime_errors():
    model = tiny_model("llama", max_position_embeddings=64)
    longkit.apply_patches(model, lm_infinite=LM, memory=MEM)
    ids = torch.randint(1, 96, (1, 30))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)
    with torch.no_grad():
        out = model(ids, use_cache=True)  # a plain forward builds a DynamicCache: fine for the first forward
        with pytest.raises(NotImplementedError, match="its own MemoryCache"):
            model(ids[:, :1], past_key_values=out.past_key_values)
    ids2, mask = left_padded(96, [20, 12])
    mask[1, -1] = 0  # right padding
    with pytest.raises(ValueError, match="left padding only"):
        MemoryCache(2, 3, 16, mask, MEM)
    with pytest.raises(ConfigError, match="n_local >= 2"):
        MemoryCache(2, 3, 6, None, MEM)
    other = tiny_model("llama")
    other.set_attn_implementation("longkit_inf_memory")
    with pytest.raises(UnsupportedModelError, match="without longkit.apply_patches"):
        other(torch.randint(0, 96, (1, 5)))
