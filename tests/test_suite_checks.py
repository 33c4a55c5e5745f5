"""Checks on the test suite itself: every test function checks something (an ``assert``, ``pytest.raises`` /
``pytest.warns``, an ``assert_*`` call, or a call of a helper of its file that does one of those)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _called_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def _checks_directly(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if name in ("raises", "warns", "fail") or name.lstrip("_").startswith("assert"):
                return True
    return False


def unchecked_tests(source: str) -> list[str]:
    """Names of the test functions in ``source`` that check nothing (helpers of the same file count)."""
    tree = ast.parse(source)
    helpers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("test")
               and _checks_directly(n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            calls = {_called_name(c) for c in ast.walk(node) if isinstance(c, ast.Call)}
            if not _checks_directly(node) and not calls & helpers:
                found.append(node.name)
    return found


def test_the_scan_flags_a_test_without_a_check():
    source = "def _ok(x):\n    assert x\n\ndef test_a():\n    _ok(1)\n\ndef test_b():\n    print(1)\n"
    assert unchecked_tests(source) == ["test_b"]


def test_every_test_function_checks_something():
    empty = {p.name: names for p in sorted(TESTS.glob("test_*.py"))
             if (names := unchecked_tests(p.read_text()))}
    assert empty == {}
