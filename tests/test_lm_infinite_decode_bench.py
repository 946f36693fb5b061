"""benchmarks/lm_infinite_decode.py on CPU (tiny Llama): every method decodes, the stacked techniques (memory blocks,
4-bit ring) report their speed against LM-Infinite alone, and LM-Infinite's cache stays bounded by its window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_tiny_plan_all_eager_methods(tmp_path: Path) -> None:
    bench = pytest.importorskip("lm_infinite_decode")
    methods = ["vanilla_eager", "lminf_eager", "lminf_static", "lminf_memory_eager", "lminf_kv4_eager", "kv4_eager"]
    rows = bench.main(["--shape", "tiny", "--device", "cpu", "--plan", "1x1024", "--new-tokens", "2",
                       "--skip-steps", "1", "--methods", *methods, "--out-dir", str(tmp_path)])
    (row,) = rows
    errors = {m: row[f"{m}_error"] for m in methods if f"{m}_error" in row}
    assert not errors, errors
    for m in methods:
        assert row[f"{m}_tok_s"] > 0 and row[f"{m}_cache_gib"] > 0
    assert row["fastest_lminf"] in bench.LMINF  # the headline compares plain LM-Infinite only
    assert row["lminf_memory_eager_vs_lminf_eager"] > 0 and row["lminf_kv4_eager_vs_lminf_eager"] > 0
    # vanilla keeps all 1024+ tokens; LM-Infinite keeps its 512-token window + sinks; the 4-bit ring packs it
    assert row["lminf_eager_cache_gib"] < 0.6 * row["vanilla_eager_cache_gib"]
    assert row["lminf_kv4_eager_cache_gib"] < 0.5 * row["lminf_eager_cache_gib"]
    assert row["kv4_eager_vs_vanilla_eager"] > 0 and row["kv4_eager_cache_gib"] < row["vanilla_eager_cache_gib"]
    assert (tmp_path / "lm_infinite_decode_tiny.json").is_file()


def test_count_ops_reports_the_host_work_of_a_step(tmp_path: Path) -> None:
    """``--count-ops``: a short second run per method counts the ATen ops of one decode step; LM-Infinite's static
    ring dispatches the same ops every step, and memory blocks add their selection, gather and bookkeeping."""
    bench = pytest.importorskip("lm_infinite_decode")
    methods = ["lminf_eager", "lminf_memory_eager"]
    (row,) = bench.main(["--shape", "tiny", "--device", "cpu", "--plan", "1x1024", "--new-tokens", "2",
                         "--skip-steps", "1", "--count-ops", "--methods", *methods, "--out-dir", str(tmp_path)])
    lminf, memory = row["lminf_eager_ops_per_step"], row["lminf_memory_eager_ops_per_step"]
    assert lminf == int(lminf) > 0  # a whole number of ops per step: every timed step did the same work
    assert memory > lminf
