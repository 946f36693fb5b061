"""benchmarks/long_recall.py's dry run (CPU, tiny random Llama, byte tokenizer): every method answers every prompt
without error, the JSON holds the rows, the summary and finite perplexities, and the diagnosis reports ranks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_dry_run_writes_rows_summary_and_perplexity(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = pytest.importorskip("long_recall")
    path = bench.main(["--dry-run", "--diagnose", "--out-dir", str(tmp_path)])
    assert path == tmp_path / "long_recall_cpu_dry_run.json"
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert {r["method"] for r in rows} == set(bench.METHODS)
    assert {r["task"] for r in rows} == {"passkey", "qa"}
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    passkeys = [r for r in rows if r["task"] == "passkey"]
    assert len(passkeys) == 3 * 2 and len({r["key_pos"] for r in passkeys}) == 2  # two depths, two key positions
    for r in passkeys:
        assert abs(r["key_pos"] / r["prompt_tokens"] - r["depth"]) < 0.25 and r["expected"].isdigit()
    mem = [r for r in rows if r["method"] == "memory" and r["task"] == "passkey"]
    assert all(r["diagnosis"] and "key_block" in r["diagnosis"] for r in mem)
    assert any("last_prefill_chunk" in r["diagnosis"] for r in mem)
    assert len(result["summary"]) == 3  # 2 passkey depths + 1 QA depth
    assert set(result["ppl"]) == set(bench.METHODS) and all(result["ppl_finite"].values())
    assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in result["ppl"].values())
    assert result["env"]["device"].startswith("cpu")


def test_bad_options_exit(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bench = pytest.importorskip("long_recall")
    for bad in (["--depths", "1.5"], ["--seeds", "0"], ["--lengths", "8"], ["--repr-keys", "0"],
                ["--methods", "oracle"]):
        with pytest.raises(SystemExit):
            bench.main(["--dry-run", "--out-dir", str(tmp_path), *bad])
