"""House rule: no function in qsmrim_app/ longer than ~80 lines (the declarative parser builders aside)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qsmrim_app"
MAX_LINES = 80
# Declarative argparse builders: one add_argument call after another, nothing to split.
EXEMPT = {("cli/parser.py", "build_parser"), ("review/cli.py", "build_parser")}


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[tuple[str, str, int]]:
    """(file, function, lines) of every function or method over ``limit`` lines (docstring included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit and (rel, node.name) not in EXEMPT:
                    found.append((rel, node.name, length))
    return found


def test_no_function_over_eighty_lines() -> None:
    assert long_functions() == []


def test_the_check_sees_a_long_function(tmp_path) -> None:
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 90 + "\ndef g():\n    return 1\n")
    assert long_functions(tmp_path) == [("m.py", "f", 91)]
