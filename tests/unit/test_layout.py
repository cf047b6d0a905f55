"""``netpolicy/`` keeps its shape: the packet stack never imports the HTTP layer.

Read from the code, every import anywhere in a module counting -- top
level, inside a function, under ``if TYPE_CHECKING`` -- as in
``test_import_cycles.py``, whose graph and cycle finder these tests reuse.
``pytest_gondolin`` and ``pytest_gondolin.netpolicy`` themselves count as
the HTTP layer here: their ``__init__`` re-exports it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import pytest_gondolin.netpolicy

from .test_import_cycles import cycles, import_graph

NETPOLICY_DIR = Path(pytest_gondolin.netpolicy.__file__).resolve().parent
PACKAGE_DIR = NETPOLICY_DIR.parent
STACK = "pytest_gondolin.netpolicy.stack"
#: What a stack module may import of ours besides the stack itself.
STACK_MAY_IMPORT = frozenset({"pytest_gondolin.errors"})
#: The hard limit on a module's length (issue 15).
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _python_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``path`` imports, wherever the import is.

    Relative imports are resolved against ``module``; ``from a import b``
    gives ``a.b`` (``b`` may be a module); ``importlib.import_module`` and
    ``__import__`` with a literal name count too.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _stack_may_import(name: str) -> bool:
    if not name.startswith("pytest_gondolin"):
        return True  # the standard library (the stack needs nothing else)
    return (
        name == STACK
        or name.startswith(STACK + ".")
        or any(name == ok or name.startswith(ok + ".") for ok in STACK_MAY_IMPORT)
    )


def stack_violations(stack_dir: Path) -> list[str]:
    """Every import of a stack module that reaches outside the stack (and ``errors``)."""
    bad = []
    for path in _python_files(stack_dir):
        module = _module_name(path)
        for line, name in imported_names(path, module):
            if not _stack_may_import(name):
                bad.append(f"{path.relative_to(PACKAGE_DIR)}:{line}: {name}")
    return bad


def test_the_stack_imports_nothing_of_the_http_layer() -> None:
    assert (NETPOLICY_DIR / "stack" / "network.py").is_file()  # the check sees the stack
    bad = stack_violations(NETPOLICY_DIR / "stack")
    assert not bad, "the packet stack imports outside itself:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        pytest.param("from pytest_gondolin.netpolicy.stack.packets import X\n", False, id="stack"),
        pytest.param("from .tcp import TcpConnection\n", False, id="stack-relative"),
        pytest.param("from pytest_gondolin.errors import ConfigError\n", False, id="errors"),
        pytest.param("import struct\n", False, id="stdlib"),
        pytest.param("from pytest_gondolin.netpolicy.http.policy import P\n", True, id="http"),
        pytest.param("import pytest_gondolin.netpolicy.driver\n", True, id="driver"),
        pytest.param("from pytest_gondolin.netpolicy import relay\n", True, id="relay"),
        pytest.param("def f():\n    from ..http import rules\n", True, id="function-relative"),
        pytest.param(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pytest_gondolin.netpolicy.http.mitm import F\n",
            True,
            id="type-checking",
        ),
        pytest.param("from pytest_gondolin import Secret\n", True, id="package-root"),
        pytest.param(
            "import importlib\nimportlib.import_module('pytest_gondolin.netpolicy.http.ca')\n",
            True,
            id="import-module",
        ),
    ],
)
def test_the_stack_check_catches_what_it_should(
    tmp_path: Path, source: str, caught: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: a probe module placed in a copy of the stack's path."""
    stack_dir = tmp_path / "pytest_gondolin" / "netpolicy" / "stack"
    stack_dir.mkdir(parents=True)
    (stack_dir / "probe.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", tmp_path / "pytest_gondolin")
    assert bool(stack_violations(stack_dir)) is caught


def test_no_import_cycle_touches_netpolicy() -> None:
    modules = {_module_name(p): p for p in _python_files(PACKAGE_DIR)}
    graph = import_graph(modules)
    bad = [c for c in cycles(graph) if any(m.startswith("pytest_gondolin.netpolicy") for m in c)]
    assert not bad, bad
    # Host patterns have their own module, so policy and secrets meet only there.
    secrets, policy = (
        "pytest_gondolin.netpolicy.http.secrets",
        "pytest_gondolin.netpolicy.http.policy",
    )
    assert policy not in graph[secrets]
    assert "pytest_gondolin.netpolicy.http.rules" in graph[secrets]
    assert "pytest_gondolin.netpolicy.http.rules" in graph[policy]


@pytest.mark.parametrize(
    "path", _python_files(PACKAGE_DIR), ids=lambda p: str(p.relative_to(PACKAGE_DIR))
)
def test_no_module_is_over_the_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines; split it along a seam"


@pytest.mark.parametrize(
    "package",
    ["pytest_gondolin.netpolicy", "pytest_gondolin.netpolicy.http", STACK],
)
def test_each_package_names_what_it_exports(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        getattr(module, name)
    lazy = getattr(module, "_LAZY", None)
    if lazy is not None:  # a lazy package maps exactly its public names
        assert sorted(lazy) == sorted(module.__all__)
