"""The package's structure rules: imports run one way (no circle, counting imports inside functions too) and
only ``longkit/kernels/envs.py`` reads the kernels' tuning variables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "longkit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longkit module ``name`` refers to (a submodule, else the closest package), or None if external."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """longkit modules imported anywhere in ``path`` (module level and inside functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import sub` names the submodule when it is one, else a name inside pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n, mods) if n.startswith("longkit") else None
            if target and target != mod:
                out.add(target)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_no_import_circle_in_longkit():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve_to_modules():
    graph = _graph()
    assert "longkit.hf_patches.attention" in graph["longkit.hf_patches.lm_infinite.patch"]
    assert "longkit.kernels.masks" in graph["longkit.kernels.masked_attn.interface"]


@pytest.mark.parametrize("prefix", ["LONGKIT_ATTN_", "LONGKIT_KERNEL_IMPL", "TRITON_INTERPRET"])
def test_tuning_variables_are_read_in_one_module(prefix):
    readers = []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if prefix in text and ("os.environ" in text or "getenv" in text):
            for line in text.splitlines():
                if prefix in line and ("environ" in line or "getenv" in line):
                    readers.append(f"{path.relative_to(ROOT.parent)}: {line.strip()}")
    allowed = "longkit/kernels/envs.py"
    assert all(r.startswith(allowed) for r in readers), readers
