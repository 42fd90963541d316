"""No function in sakd/ is longer than 80 lines (``train.distill.distill``, the loop itself: 120), counted
from its ``def`` line to its last line, docstring and comments included."""

import ast
from pathlib import Path

from tests.conftest import ROOT

PKG = ROOT / "sakd"
LIMIT, LIMITS = 80, {("sakd/train/distill.py", "distill"): 120}


def long_functions(root: Path = PKG) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LIMITS.get((rel, node.name), LIMIT):
                    found.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_over_the_limit():
    assert long_functions() == []


def test_the_check_sees_a_long_function(tmp_path):
    pkg = tmp_path / "sakd"
    pkg.mkdir()
    (pkg / "m.py").write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * 80)
    assert long_functions(pkg) == ["sakd/m.py:5 long (81 lines)"]
