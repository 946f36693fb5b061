"""Single-process pieces of the DeepSpeed extension: config validation, head split, layout, batch shard."""

from __future__ import annotations

import json

import pytest
import torch

from longkit.deepspeed_ext import LongkitDSConfig, SequenceParallel, SequenceParallelConfig, parse_ds_config
from longkit.deepspeed_ext.all_to_all import HeadPlan
from longkit.deepspeed_ext.layout import build_layout
from longkit.errors import ConfigError, UnsupportedModelError


# ------------------------------------------------------------------------------------------- config
def test_config_defaults_and_values(tmp_path):
    assert parse_ds_config({"train_micro_batch_size_per_gpu": 1}) == LongkitDSConfig()
    cfg = {"zero_optimization": {"stage": 2}, "longkit": {"sequence_parallel": {"mode": "ulysses", "size": 4}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    assert parse_ds_config(path).sequence_parallel == SequenceParallelConfig("ulysses", 4, "auto")


@pytest.mark.parametrize("section, exc, words", [
    ({"sequence_parallell": {}}, ConfigError, "unknown key(s) ['sequence_parallell']"),
    ({"sequence_parallel": {"size": 0}}, ConfigError, "positive integer"),
    ({"sequence_parallel": {"size": "2"}}, ConfigError, "positive integer"),
    ({"sequence_parallel": {"size": True}}, ConfigError, "positive integer"),
    ({"sequence_parallel": {"mode": "ring"}}, ConfigError, "must be one of ['ulysses', 'lasp2', 'auto']"),
    ({"sequence_parallel": {"attention": "flash"}}, ConfigError, "must be one of ['auto', 'kernel', 'sdpa']"),
    ({"sequence_parallel": {"mode": "ulysses", "sise": 2}}, ConfigError, "unknown key(s) ['sise']"),
    ({"activation_offload": {"enabled": True, "min_tensor_bytes": -1}}, ConfigError, "min_tensor_bytes must be"),
    ({"activation_offload": {"enabled": "yes"}}, ConfigError, "true or false"),
    ([1, 2], ConfigError, "must be an object"),
])
def test_config_errors(section, exc, words):
    with pytest.raises(exc) as e:
        parse_ds_config({"longkit": section})
    assert words in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_ds_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_ds_config(bad)


# ------------------------------------------------------------------------------------------- head split
@pytest.mark.parametrize("hq, hkv, world", [(8, 8, 2), (8, 2, 4), (8, 1, 2), (9, 3, 2), (6, 3, 4), (5, 5, 2),
                                            (32, 8, 8), (12, 4, 8)])
def test_head_plan_covers_every_head_once(hq, hkv, world):
    plan = HeadPlan.build(hq, hkv, world)
    group = hq // hkv
    owned = [h for a, b in plan.q_ranges for h in range(a, b)]
    assert owned == list(range(hq))
    sizes = [b - a for a, b in plan.q_ranges]
    assert max(sizes) - min(sizes) <= 1
    for r, ((qa, qb), (ka, kb)) in enumerate(zip(plan.q_ranges, plan.kv_ranges)):
        needed = {h // group for h in range(qa, qb)}
        assert needed == set(range(ka, kb))  # exactly the KV heads its queries read, nothing more
        idx = plan.local_kv_index(r)
        if idx is None:  # regular GQA locally: query i reads kv i // (nq / nkv)
            c = (qb - qa) // (kb - ka)
            assert [(h // group) - ka for h in range(qa, qb)] == [i // c for i in range(qb - qa)]
        else:
            assert idx.tolist() == [(h // group) - ka for h in range(qa, qb)]


def test_head_plan_errors():
    with pytest.raises(ConfigError, match="at least one query head per rank"):
        HeadPlan.build(4, 2, 8)
    with pytest.raises(ConfigError, match="multiple of KV heads"):
        HeadPlan.build(6, 4, 2)


# ------------------------------------------------------------------------------------------- layout
def test_layout_plain_row_is_causal():
    lay = build_layout(torch.arange(10).unsqueeze(0))
    assert lay.mask.kind == "causal" and not lay.flatten


def test_layout_documents_rows_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    lay = build_layout(pos, pad)
    assert lay.flatten
    assert lay.mask.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12]
    # The dense form: a token sees exactly the earlier tokens of its own segment.
    dense = lay.mask.dense(1, 12, 12).reshape(12, 12)
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 4])
    i, j = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
    assert torch.equal(dense, (seg.view(-1, 1) == seg.view(1, -1)) & (j <= i))


# ------------------------------------------------------------------------------------------- batches
def test_shard_batch_size_one_shifts_labels_and_counts_tokens():
    sp = SequenceParallel(SequenceParallelConfig(size=1))
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels[mask == 0] = -100
    shard = sp.shard_batch({"input_ids": ids, "labels": labels, "attention_mask": mask})
    want = torch.full_like(labels, -100)
    want[:, :-1] = labels[:, 1:]
    want[mask == 0] = -100
    assert torch.equal(shard["shift_labels"], want) and shard["labels"] is shard["shift_labels"]
    assert int(shard["num_items_in_batch"]) == int((want != -100).sum())
    assert torch.equal(shard["position_ids"], torch.arange(7).expand(2, 7))
    assert shard["use_cache"] is False


def test_shard_batch_size_one_equals_plain_loss():
    from tests.utils import tiny_model

    model = tiny_model("qwen3").train()
    ids = torch.randint(0, 96, (2, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    ref = model(input_ids=ids, labels=labels).loss
    shard = SequenceParallel(SequenceParallelConfig(size=1)).shard_batch({"input_ids": ids, "labels": labels})
    torch.testing.assert_close(model(**shard).loss, ref, rtol=1e-6, atol=1e-6)


def test_shard_batch_errors():
    sp = SequenceParallel(SequenceParallelConfig(size=1))
    with pytest.raises(ConfigError, match="input_ids"):
        sp.shard_batch({"labels": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match="labels must have"):
        sp.shard_batch({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                        "labels": torch.zeros(2, 4, dtype=torch.long)})


def test_unsupported_model_type_is_refused():
    import transformers

    from longkit.deepspeed_ext import ulysses

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    with pytest.raises(UnsupportedModelError, match="model types"):
        ulysses.install(transformers.GPT2LMHeadModel(cfg), group=None, rank=0, world=2,
                        config=SequenceParallelConfig(size=2))
