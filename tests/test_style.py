"""The house rules, checked: ruff's lint and format (pyproject.toml), short functions, and a
library whose modules never import each other in a circle."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

MAX_FUNCTION_LINES = 60
CODE = ["lib/*.py", "sd_*.py", "benchmarks/*.py", "docs/*.py"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    """`ruff check .` and `ruff format --check .` at the pinned version (requirements-dev.txt)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"


def functions(path):
    """(name, first line, number of lines) of every function and method in a file, nested ones too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_functions_fit_on_a_screen():
    paths = sorted(p for pattern in CODE for p in ROOT.glob(pattern))
    assert len(paths) > 15  # the patterns found the code
    too_long = [
        f"{p.relative_to(ROOT)}:{line} {name}() has {n} lines"
        for p in paths
        for name, line, n in functions(p)
        if n > MAX_FUNCTION_LINES
    ]
    assert not too_long, f"longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def lib_imports(path):
    """The lib modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "lib":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lib."))
    return found


def import_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if cycle := visit(other):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_import_cycle_finder_finds_cycles():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]


def test_no_two_lib_modules_import_each_other():
    graph = {p.stem: lib_imports(p) for p in (ROOT / "lib").glob("*.py") if p.stem != "__init__"}
    assert graph["checkpoint"] and graph["data"]  # the walk sees imports at all
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
