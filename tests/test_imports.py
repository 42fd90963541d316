"""The package's layers (docs/architecture.md): every import in sakd/ — at module level and inside
functions — goes to the same subsystem or to a lower layer, and no modules import each other in a cycle."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PKG = ROOT / "sakd"

# Lowest first. A module may import its own subsystem and any subsystem of a LOWER layer; subsystems of one
# layer know nothing of each other.
LAYERS = [
    {"sakd", "sakd.errors", "sakd.files"},
    {"sakd.config"},
    {"sakd.align"},
    {"sakd.losses", "sakd.models"},
    {"sakd.data"},
    {"sakd.evaluate"},
    {"sakd.report"},
    {"sakd.teacher_cache"},
    {"sakd.train"},
    {"sakd.plan", "sakd.demo"},
    {"sakd.cli"},
]


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules) -> set[str]:
    """Every sakd module ``path`` imports, anywhere in the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        deps |= {t for t in targets if t in modules and t != name}
    return deps


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def subsystem(module: str) -> str:
    """sakd.train.objective -> sakd.train; sakd.cli -> sakd.cli; sakd -> sakd."""
    return ".".join(module.split(".")[:2])


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if subsystem(module) in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its subsystem to LAYERS (and to docs/architecture.md)")


def upward(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a subsystem of the same or a higher layer (other than one's own)."""
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                  if subsystem(a) != subsystem(b) and layer(b) >= layer(a))


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_every_import_goes_down_the_layers():
    graph = _graph()
    assert "sakd.train.distill" in graph and "sakd.train.objective" in graph
    assert upward(graph) == []


def test_no_import_cycle_in_sakd_counting_imports_inside_functions():
    graph = _graph()
    found = cycle(graph)
    assert found is None, " -> ".join(found)


def test_the_checks_find_a_cycle_an_upward_import_and_an_in_function_import(tmp_path):
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert upward({"sakd.data.text": {"sakd.train.distill"}}) == ["sakd.data.text -> sakd.train.distill"]
    assert upward({"sakd.data.text": {"sakd.models.load"}, "sakd.models.load": {"sakd.align.tokens"}}) == []
    assert upward({"sakd.losses.x": {"sakd.models.load"}}) == ["sakd.losses.x -> sakd.models.load"]  # peers
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from sakd.train import distill\n    from .tokens import align\n")
    mods = {"sakd.train", "sakd.train.distill", "sakd.align.tokens"}
    assert _imports(f, "sakd.align.vocab", mods) == {"sakd.train", "sakd.train.distill", "sakd.align.tokens"}
    with pytest.raises(AssertionError, match="in no layer"):
        layer("sakd.nowhere")
