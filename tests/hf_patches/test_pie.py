"""PIE (editable KV cache) on tiny random models: exactness where the math says so, PIE's approximation checked
directly, and errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from longkit.config import LMInfiniteConfig
from longkit.errors import ConfigError, UnsupportedModelError
from longkit.hf_patches.pie import (
    EditableBatch,
    EditableContext,
    PIEConfig,
    PIEEditError,
    TextEdit,
    TokenEdit,
    UnsupportedCacheError,
)
from longkit.kernels.rope import naive_rope_rotate
from tests.utils import tiny_model as _tiny_model

ATOL = 1e-5
MODELS = ["llama", "qwen2", "qwen3", "mistral"]


def tiny_model(*args, **kwargs):
    """A tiny random model that never stops early (an EOS drawn by random weights ends a generation: seed-dependent)."""
    model = _tiny_model(*args, **kwargs)
    model.generation_config.eos_token_id = None
    return model


def _ids(n: int, vocab: int = 96) -> list[int]:
    return torch.randint(1, vocab, (n,)).tolist()


def _kv(ctx: EditableContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in ctx.cache.layers]


def _fresh(model, ids: list[int]) -> EditableContext:
    return EditableContext(model, ids=ids)


def _assert_cache_equal(a: EditableContext, b: EditableContext, sl: slice = slice(None), atol: float = ATOL) -> None:
    for (ka, va), (kb, vb) in zip(_kv(a), _kv(b)):
        torch.testing.assert_close(ka[..., sl, :], kb[..., sl, :], atol=atol, rtol=0)
        torch.testing.assert_close(va[..., sl, :], vb[..., sl, :], atol=atol, rtol=0)


@pytest.mark.parametrize("mtype", MODELS)
def test_pie_cache_matches_reencode_prefix_and_rerotated_suffix(mtype: str) -> None:
    model = tiny_model(mtype)
    ids = _ids(30)
    ctx = _fresh(model, ids)
    old = [(k.clone(), v.clone()) for k, v in _kv(ctx)]
    s, e, new = 10, 13, _ids(5)  # replace 3 tokens by 5: delta +2
    ctx.edit(tokens=TokenEdit(s, e, tuple(new)))
    ref = _fresh(model, ids[:s] + new + ids[e:])
    assert ctx.ids == ref.ids
    n = s + len(new)
    _assert_cache_equal(ctx, ref, slice(0, n))  # prefix and new tokens: exactly a re-encode
    inv_freq = model.model.rotary_emb.inv_freq
    delta = torch.full((30 - e,), len(new) - (e - s))
    for (k, v), (ko, vo) in zip(_kv(ctx), old):
        torch.testing.assert_close(k[..., n:, :], naive_rope_rotate(ko[..., e:, :], delta, inv_freq), atol=ATOL, rtol=0)
        torch.testing.assert_close(v[..., n:, :], vo[..., e:, :], atol=0, rtol=0)  # values are not recomputed
    # the naive splice keeps the stale keys, which differ from PIE's
    spl = _fresh(model, ids)
    spl.edit(tokens=TokenEdit(s, e, tuple(new)), method="splice")
    assert not torch.allclose(spl.cache.layers[0].keys[..., n:, :], ctx.cache.layers[0].keys[..., n:, :], atol=1e-3)
    torch.testing.assert_close(spl.cache.layers[0].keys[..., n:, :], old[0][0][..., e:, :], atol=0, rtol=0)


def test_no_change_is_identity() -> None:
    model = tiny_model()
    ids = _ids(20)
    ctx = _fresh(model, ids)
    before = _kv(ctx)
    stats = ctx.edit(tokens=TokenEdit(5, 7, tuple(ids[5:7])))
    assert stats.edits == 0 and ctx.ids == ids
    assert all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(_kv(ctx), before))
    assert ctx.edit().edits == 0


def test_insert_then_delete_round_trip() -> None:
    model = tiny_model()
    ids = _ids(25)
    ctx = _fresh(model, ids)
    old = [(k.clone(), v.clone()) for k, v in _kv(ctx)]
    ctx.edit(tokens=TokenEdit(8, 8, tuple(_ids(4))))
    assert len(ctx) == 29
    ctx.edit(tokens=TokenEdit(8, 12))
    assert ctx.ids == ids
    for (k, v), (ko, vo) in zip(_kv(ctx), old):
        torch.testing.assert_close(k, ko, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, vo, atol=0, rtol=0)


@pytest.mark.parametrize("mtype", ["llama", "qwen3"])
def test_multi_edit_equals_sequential_edits(mtype: str) -> None:
    model = tiny_model(mtype)
    ids = _ids(40)
    a, b = _fresh(model, ids), _fresh(model, ids)
    e1, e2, e3 = TokenEdit(3, 5, (7, 8, 9)), TokenEdit(15, 15, (11,)), TokenEdit(25, 30)
    stats = a.edit(tokens=[e3, e1, e2])  # any order: applied left to right
    assert stats.edits == 3 and stats.removed == 7 and stats.encoded == 4
    b.edit(tokens=e3)  # right to left, one at a time: earlier coordinates stay valid
    b.edit(tokens=e2)
    b.edit(tokens=e1)
    assert a.ids == b.ids == ids[:3] + [7, 8, 9] + ids[5:15] + [11] + ids[15:25] + ids[30:]
    # new tokens of edit 2 attend to rotated (not recomputed) tokens in both orders, but the order of encoding
    # differs; the prefix up to the end of edit 1 is exact in both
    _assert_cache_equal(a, b, slice(0, 6))
    ref = _fresh(model, a.ids)
    _assert_cache_equal(a, ref, slice(0, 6))


def test_gqa_shapes_and_generate_at_end_matches_reencode() -> None:
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=1)
    ids = _ids(20)
    ctx = _fresh(model, ids)
    ctx.edit(tokens=TokenEdit(18, 20, (5, 6, 7)))  # at the end: nothing after it, so PIE is exact
    assert ctx.cache.layers[0].keys.shape == (1, 1, 21, 16)
    ref = _fresh(model, ids[:18] + [5, 6, 7])
    _assert_cache_equal(ctx, ref)
    out = ctx.generate(6)
    assert out.shape == (1, 6)
    full = model.generate(torch.tensor([ref.ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 21:]
    assert torch.equal(out, full)
    assert len(ctx) == 21 and ctx.cache.get_seq_length() == 21  # generate() leaves the context as it was
    assert torch.equal(ctx.generate(6), out)


def test_reencode_method_is_exact() -> None:
    model = tiny_model("qwen2")
    ids = _ids(24)
    ctx = _fresh(model, ids)
    ctx.edit(tokens=[TokenEdit(4, 6, (1, 2, 3)), TokenEdit(12, 14)], method="reencode")
    _assert_cache_equal(ctx, _fresh(model, ctx.ids))


def test_batch_of_rows() -> None:
    model = tiny_model()
    rows = [_ids(12), _ids(20), _ids(7)]
    batch = EditableBatch.from_ids(model, rows)
    stats = batch.edit({0: {"tokens": [TokenEdit(2, 3, (4, 5))]}, 2: {"tokens": TokenEdit(7, 7, (9,))}})
    assert stats[0].length == 13 and stats[2].length == 8 and len(batch[1]) == 20
    outs = batch.generate(3)
    assert [o.shape for o in outs] == [(1, 3)] * 3
    ref = _fresh(model, rows[2] + [9])  # edit at the end: exact
    assert torch.equal(outs[2], ref.generate(3))
    with pytest.raises(PIEEditError, match="out of range"):
        batch.edit({3: {"tokens": TokenEdit(0, 0, (1,))}})


def test_text_edits_with_a_char_tokenizer() -> None:
    tok = _CharTokenizer()
    model = tiny_model(vocab_size=128)
    text = "def f(x):\n    return x\n\ny = f(2)\n"
    ctx = EditableContext(model, text=text, tokenizer=tok)
    i = text.index("return x") + len("return x")
    ctx.edit([TextEdit(i, i, " + 1"), TextEdit(0, 3, "async def")])
    want = text.replace("return x", "return x + 1").replace("def f", "async def f")
    assert ctx.text == want and ctx.ids == tok(want)["input_ids"]
    ctx.edit(tokens=TokenEdit(0, 6))  # token edits keep the text in step
    assert ctx.text == want[6:]
    with pytest.raises(PIEEditError, match="out of range"):
        ctx.edit(TextEdit(0, len(ctx.text) + 1, ""))
    with pytest.raises(PIEEditError, match="overlap"):
        ctx.edit([TextEdit(0, 5, "a"), TextEdit(3, 6, "b")])


def test_text_edit_on_real_tokenizer_boundaries() -> None:
    pytest.importorskip("tokenizers")
    from longkit.models import default_model_status

    if not default_model_status()["converted"]:
        pytest.skip("default model not converted")
    from transformers import AutoTokenizer

    from longkit.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    model = tiny_model(vocab_size=len(tok))
    text = "def f(x):\n    return x  # héllo 日本\n\n\n    y = 1\n"
    ctx = EditableContext(model, text=text, tokenizer=tok)
    i = text.index("日")
    ctx.edit(TextEdit(i, i + 1, "月"))  # inside a multi-byte token group: the window widens to clean boundaries
    assert ctx.text == text.replace("日", "月")
    assert tok.decode(ctx.ids) == ctx.text


def test_composes_with_lm_infinite_attention() -> None:
    import longkit

    model = tiny_model()
    ids = _ids(30)
    with longkit.patched(model, lm_infinite=LMInfiniteConfig(n_global=2, n_local=8, bounded_cache=False)):
        ctx = _fresh(model, ids)
        ctx.edit(tokens=TokenEdit(28, 30, (3, 4)))
        ref = _fresh(model, ids[:28] + [3, 4])
        _assert_cache_equal(ctx, ref)
        assert torch.equal(ctx.generate(4), ref.generate(4))


# -------------------------------------------------------------------------------------------------- errors
def test_errors_spans_and_inputs() -> None:
    model = tiny_model()
    ctx = _fresh(model, _ids(10))
    with pytest.raises(PIEEditError, match="out of range"):
        ctx.edit(tokens=TokenEdit(8, 11))
    with pytest.raises(PIEEditError, match="out of range"):
        ctx.edit(tokens=TokenEdit(-1, 2))
    with pytest.raises(PIEEditError, match="overlap"):
        ctx.edit(tokens=[TokenEdit(1, 4), TokenEdit(3, 5)])
    with pytest.raises(PIEEditError, match="vocab|\\[0, 96\\)"):
        ctx.edit(tokens=TokenEdit(1, 1, (500,)))
    with pytest.raises(PIEEditError, match="text edits need"):
        ctx.edit(TextEdit(0, 1, "x"))
    with pytest.raises(PIEEditError, match="method"):
        ctx.edit(tokens=TokenEdit(1, 1, (2,)), method="exact")
    with pytest.raises(PIEEditError, match="whole context"):
        ctx.edit(tokens=TokenEdit(0, 10))
    with pytest.raises(ConfigError, match="window"):
        PIEConfig(window="file")
    with pytest.raises(ConfigError, match="chunk_size"):
        PIEConfig(chunk_size=True)


def test_error_non_rope_model() -> None:
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        EditableContext(transformers.GPT2LMHeadModel(cfg).eval(), ids=[1, 2, 3])


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "longrope",
                                                                              "short_factor": [1.0] * 8,
                                                                              "long_factor": [1.0] * 8,
                                                                              "original_max_position_embeddings": 16}])
def test_error_rope_type_changes_with_length(rope: dict) -> None:
    model = tiny_model()
    model.config.rope_parameters = {**model.config.rope_parameters, **rope}  # the check reads the config
    with pytest.raises(UnsupportedModelError, match=rope["rope_type"]):
        EditableContext(model, ids=[1, 2, 3])


def test_error_sliding_window_model_and_partial_rotary() -> None:
    model = tiny_model("mistral", sliding_window=16)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        EditableContext(model, ids=[1, 2, 3])
    model = tiny_model()
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq[:4]
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        EditableContext(model, ids=[1, 2, 3])


def test_error_unsupported_caches() -> None:
    from longkit.hf_patches.lm_infinite import LMInfiniteCache

    model = tiny_model()
    with pytest.raises(UnsupportedCacheError, match="LMInfiniteCache"):
        EditableContext(model, ids=[1, 2], cache=LMInfiniteCache(2, 1, 4, None))
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    with pytest.raises(UnsupportedCacheError, match="sliding-window DynamicSlidingWindowLayer"):
        EditableContext(model, ids=[1, 2], cache=sliding)
    with pytest.raises(UnsupportedCacheError, match="StaticCache"):
        EditableContext(model, ids=[1, 2], cache=transformers.StaticCache(config=model.config, max_cache_len=8))
    ctx = _fresh(model, [1, 2, 3])
    ctx.cache.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    with pytest.raises(UnsupportedCacheError, match="layer 0"):
        ctx.edit(tokens=TokenEdit(0, 1, (5,)))


class _CharTokenizer:
    """One token per character (ids = code points < 128): exact offsets, trivial decode."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        out: dict = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(i) for i in ids)


def test_refresh_tail_reencodes_the_last_tokens_only() -> None:
    model = tiny_model("llama")
    ids = _ids(30)
    s, e, new = 10, 13, _ids(5)
    plain = _fresh(model, ids)
    plain.edit(tokens=TokenEdit(s, e, tuple(new)))
    ctx = EditableContext(model, ids=ids, config=PIEConfig(refresh_tail=6))
    stats = ctx.edit(tokens=TokenEdit(s, e, tuple(new)))
    assert stats.encoded == len(new) + 6
    n = len(ctx.ids)
    _assert_cache_equal(ctx, plain, slice(0, n - 6))  # PIE's entries up to the refreshed tail
    # the tail equals encoding those 6 tokens after PIE's cache (not a full re-encode: the middle stays stale)
    tail = plain.prefix(n - 6)
    tail._encode(ctx.ids[n - 6:], n - 6)
    _assert_cache_equal(ctx, tail, slice(n - 6, n))
    assert not torch.allclose(ctx.cache.layers[1].keys[..., n - 6:, :], plain.cache.layers[1].keys[..., n - 6:, :],
                              atol=1e-4)
    # an edit within the last tokens refreshes only what follows it
    ctx2 = EditableContext(model, ids=ids, config=PIEConfig(refresh_tail=10))
    other = 5 if ids[27] != 5 else 6  # a real change (replacing a token by itself is no edit: nothing encoded)
    assert ctx2.edit(tokens=TokenEdit(27, 28, (other,))).encoded == 1 + 2
    with pytest.raises(ConfigError, match="refresh_tail"):
        PIEConfig(refresh_tail=-1)
