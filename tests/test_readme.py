"""The README's test command is exactly what CI runs, and the public API is what the README shows."""

from pathlib import Path

import longkit

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    command = ci_lines[-1]
    assert "python -m pytest" in command
    assert command in (ROOT / "README.md").read_text()


def test_public_api_is_small_and_pinned():
    assert sorted(longkit.__all__) == sorted([
        "apply_patches", "remove_patches", "patched", "LMInfiniteConfig", "RopeConfig", "PrefixSharingConfig",
        "TiledLossConfig", "TiledMLPConfig", "ActivationOffloadConfig", "MemoryConfig", "KVCacheConfig",
        "register_rope_types",
        "LongkitError",
        "UnsupportedModelError", "HostVersionError", "ConfigError", "__version__",
    ])


def test_import_longkit_imports_no_optional_host():
    import subprocess
    import sys

    code = ("import sys, longkit, longkit.kernels, longkit.deepspeed_ext; "
            "bad=[m for m in ('transformers','triton','deepspeed','vllm','trl') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def _ruff(*args: str, env: dict[str, str] | None = None):
    """``ruff`` from this interpreter's environment (``python -m ruff``): found whether or not it is on PATH."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed in this environment (pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_code_is_ruff_clean():
    res = _ruff("check", "longkit", "tests", "benchmarks", "recipes")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_check_fails_on_unclean_code(tmp_path):
    """The check above can fail: it flags an unused import, with a PATH that holds no ``ruff`` executable."""
    import os

    bad = tmp_path / "unclean.py"
    bad.write_text("import os\n")
    res = _ruff("check", "--no-cache", str(bad), env={**os.environ, "PATH": os.defpath})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "F401" in res.stdout, res.stdout
