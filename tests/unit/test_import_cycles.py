"""No import cycle anywhere in ``pytest_gondolin``.

Read from the code: every import anywhere in a module counts -- top level,
inside a function, under ``if TYPE_CHECKING`` -- because a cycle hidden in
a function is still a cycle (``image/build`` and ``image/store`` had one;
so did ``plugin -> sandboxes -> plugin`` through ``diagnostics``).
``from package import name`` counts as importing ``package.name`` when that
is a module of ours, and as importing ``package`` otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pytest_gondolin

PACKAGE_DIR = Path(pytest_gondolin.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for p in PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in p.relative_to(PACKAGE_DIR).parts
    }


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports, from every import statement in it."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                subs = [f"{module}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in modules] or [module]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere_in_the_package() -> None:
    graph = import_graph(_modules())
    assert "pytest_gondolin.sandbox.session" in graph  # the check sees the whole package
    assert not cycles(graph), cycles(graph)


def test_the_sandbox_feature_is_reached_only_through_its_plugin_object() -> None:
    """Nothing outside ``sandbox/`` but the hooks imports it; it never imports the hooks."""
    graph = import_graph(_modules())
    outside = {
        module
        for module, deps in graph.items()
        if not module.startswith("pytest_gondolin.sandbox")
        and any(d.startswith("pytest_gondolin.sandbox") for d in deps)
    }
    # diagnostics reads the replayed-report marker; nothing else reaches in.
    assert outside <= {"pytest_gondolin.plugin", "pytest_gondolin.diagnostics"}, outside
    for module, deps in graph.items():
        if module.startswith("pytest_gondolin.sandbox"):
            assert not deps & {"pytest_gondolin.plugin", "pytest_gondolin.diagnostics"}, module


def test_build_and_store_meet_only_in_the_manifest() -> None:
    graph = import_graph(_modules())
    assert "pytest_gondolin.image.store" not in graph["pytest_gondolin.image.build"]
    assert "pytest_gondolin.image.manifest" in graph["pytest_gondolin.image.build"]
    assert "pytest_gondolin.image.manifest" in graph["pytest_gondolin.image.store"]
    assert graph["pytest_gondolin.image.manifest"] <= {"pytest_gondolin.errors"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import a.b\n", [], id="no-cycle"),
        pytest.param("def f():\n    from a import c\n", [["a.b", "a.c"]], id="function-level"),
        pytest.param(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
            [["a.b", "a.c"]],
            id="type-checking-relative",
        ),
    ],
)
def test_the_cycle_finder_sees_hidden_imports(
    tmp_path: Path, source: str, expected: list[list[str]]
) -> None:
    """Negative control: a cycle through a function-level or TYPE_CHECKING import is found."""
    pkg = tmp_path / "a"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text(source)
    (pkg / "c.py").write_text("from a.b import x\n")
    modules = {"a": pkg / "__init__.py", "a.b": pkg / "b.py", "a.c": pkg / "c.py"}
    assert cycles(import_graph(modules)) == expected
