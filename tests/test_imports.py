"""No import cycle anywhere in sakd/ (module-level imports; imports inside functions are deferred)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sakd"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only: what runs at import time
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def test_no_import_cycle_in_sakd():
    graph = _graph()
    assert "sakd.train.distill" in graph and "sakd.train.objective" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_objective_does_not_import_the_loop():
    """The objective (and the schedules) stand below the loop: nothing imports sakd.train.distill but the CLI/demo."""
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "sakd.train.distill" in deps)
    assert set(users) <= {"sakd.cli", "sakd.demo.run"}, users


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
