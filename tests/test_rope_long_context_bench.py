"""benchmarks/rope_long_context.py's dry run (CPU, tiny random Llama): every configuration runs, its perplexities are
finite, the fine-tune changes the model, and each RoPE type is the one installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_dry_run_writes_every_config(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = pytest.importorskip("rope_long_context")
    path = bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert path == tmp_path / "rope_long_context_cpu_dry_run.json"
    result = json.loads(path.read_text())
    assert result["args"]["dry_run"] is True
    lens = result["args"]["eval_lens"]
    assert lens == [64, 128, 256] and result["pretrain_len"] == 64
    data = result["data"]
    assert data["held_out_files"] and data["train_files"]
    assert not set(data["held_out_files"]) & set(data["train_files"])

    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == list(bench.CONFIGS)
    for name, row in rows.items():
        for L in lens:
            assert math.isfinite(row[f"ppl@{L}"]) and row[f"ppl@{L}"] > 1, (name, L, row)
        if name == "base":
            assert row["train_losses"] == [] and row["loss_first"] is None
        else:
            assert len(row["train_losses"]) == 3 and all(map(math.isfinite, row["train_losses"])), (name, row)
        want = "default" if name in ("base", "finetune_default") else name
        assert row["rope_parameters"]["rope_type"] == want
    assert rows["linear"]["rope_parameters"]["factor"] == 2.0  # train-len 128 / pretraining 64

    base, tuned = rows["base"], rows["finetune_default"]
    for L in lens:  # the fine-tune changed the model (a random model learns byte statistics in 3 steps)
        assert tuned[f"ppl@{L}"] < 0.9 * base[f"ppl@{L}"], (L, base, tuned)
    assert tuned["loss_last"] < tuned["loss_first"]


def test_subset_and_bad_options(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = pytest.importorskip("rope_long_context")
    path = bench.main(["--dry-run", "--types", "giraffe_truncated", "base", "--eval-lens", "96", "--steps", "1",
                       "--out-dir", str(tmp_path)])
    rows = json.loads(path.read_text())["rows"]
    assert [r["config"] for r in rows] == ["base", "giraffe_truncated"]  # always in CONFIGS order
    assert all(math.isfinite(r["ppl@96"]) for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--steps", "0", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--types", "rope9000", "--out-dir", str(tmp_path)])
