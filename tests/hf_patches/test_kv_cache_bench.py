"""benchmarks/kv_quality.py's dry run (CPU, tiny random Llama with head dim 64, byte tokenizer): every configuration
runs, perplexities are finite, the 16-bit cache matches the full-precision baseline, bytes are the format's."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_dry_run_runs_every_config(tmp_path: Path) -> None:
    bench = pytest.importorskip("kv_quality")
    from longkit.config import KVCacheConfig
    from longkit.kernels.kv_quant import bytes_per_token

    path = bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert path == tmp_path / "kv_quality_cpu_dry_run.json"
    result = json.loads(path.read_text())
    args = result["args"]
    assert args["ctx"] == [32, 64] and args["dry_run"] is True
    assert [d["kind"] for d in result["documents"]] == ["code", "prose"]
    assert not set(result["documents"][0]["files"]) & set(result["documents"][1]["files"])
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == list(bench.configs())
    for name, row in rows.items():
        for L in args["ctx"]:
            assert math.isfinite(row[f"ppl@{L}"]) and row[f"ppl@{L}"] > 1, (name, row)
        if name == bench.BASELINE:
            assert row["B/tok/layer"] == 4 * 64 * 2 and "agree" not in row
            continue
        spec = KVCacheConfig(**row["options"], residual_length=args["residual"]).spec()
        assert row["B/tok/layer"] == bytes_per_token(spec, 64, 2)
        assert 0 <= row["agree"] <= 1 and 0 <= row["first_diff"] <= args["gen_tokens"]
    for L in args["ctx"]:  # 16-bit storage: only fp16 rounding of an fp32 model
        assert abs(rows["k16v16"][f"dppl@{L}"]) < 0.05, rows["k16v16"]
        assert rows["rot2"][f"ppl@{L}"] != rows["fp"][f"ppl@{L}"]  # the quantized cache was really read
    assert rows["rot4"]["x_bf16"] == pytest.approx(512 / 160) and rows["rot3"]["B/tok/layer"] == 128
    assert any(line.startswith("rot4: worst ppl increase") for line in result["goals"])


def test_bad_options_exit(tmp_path: Path) -> None:
    bench = pytest.importorskip("kv_quality")
    for bad in (["--chunk", "0"], ["--residual", "-1"], ["--ctx", "0"]):
        with pytest.raises(SystemExit):
            bench.main(["--dry-run", "--out-dir", str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--configs", "nope"])


def test_seeds_run_each_rotated_config_per_seed(tmp_path: Path) -> None:
    """``--seeds``: a rotated configuration runs once per seed with that seed (different rotations, different
    perplexities), an unrotated one once; the means and spreads are those of the seed rows."""
    bench = pytest.importorskip("kv_quality")
    path = bench.main(["--dry-run", "--out-dir", str(tmp_path), "--configs", "rot2", "kivi2", "--seeds", "3", "5",
                       "--gen-tokens", "0"])
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [(r["base_config"], r["seed"]) for r in rows] == [("fp", None), ("rot2", 3), ("rot2", 5), ("kivi2", None)]
    assert [r["options"]["seed"] for r in rows[1:3]] == [3, 5]
    assert rows[1]["ppl@64"] != rows[2]["ppl@64"]  # another rotation quantizes differently
    means = {m["config"]: m for m in result["seed_means"]}
    for L in (32, 64):
        d = [rows[1][f"dppl@{L}"], rows[2][f"dppl@{L}"]]
        assert means["rot2"][f"dppl@{L}"] == pytest.approx(sum(d) / 2)
        assert (means["rot2"][f"dppl@{L}_min"], means["rot2"][f"dppl@{L}_max"]) == (min(d), max(d))
    assert means["kivi2"]["seeds"] == [None]
