"""The guest half is exactly ``pytest_gondolin/guest/``, and the boot payload ships exactly that.

Read from the code, not from a list: every import of every guest module
(top-level or nested, absolute or relative, ``importlib.import_module``
included) must be the standard library, pytest, or the guest package
itself; the guest modules import each other without cycles; and the
payload's files are the guest package's files plus the package
``__init__``, which is what the guest can import (checked in a fresh
interpreter that sees only the unpacked payload).
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gondolin.image import cpio
from pytest_gondolin.vm import payload

PACKAGE = "pytest_gondolin"
GUEST = "pytest_gondolin.guest"
PACKAGE_DIR = Path(payload.__file__).resolve().parent.parent
GUEST_DIR = PACKAGE_DIR / "guest"
#: Outside the standard library the guest has pytest (shipped from the host's
#: environment) and what pytest itself is made of.
GUEST_THIRD_PARTY = frozenset({"pytest", "_pytest", "pluggy"})
#: Imports a guest module makes lazily, only when the host asked for what needs
#: them (and reports it when the guest lacks them): coverage, for pytest-cov.
GUEST_OPTIONAL = {f"{GUEST}.coverage": frozenset({"coverage"})}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


GUEST_FILES = sorted(
    p for p in GUEST_DIR.rglob("*.py") if "__pycache__" not in p.relative_to(GUEST_DIR).parts
)
GUEST_MODULES = {_module_name(p): p for p in GUEST_FILES}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` for every import anywhere in ``path``.

    ``from M import a, b`` yields ``M.a`` and ``M.b`` (either may be a
    submodule); relative imports are resolved against the module's package.
    """
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, module if alias.name == "*" else f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (
                    isinstance(node.func, ast.Name)
                    and node.func.id in ("__import__", "import_module")
                )
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _allowed_in_guest(module: str) -> bool:
    top = module.partition(".")[0]
    if top == PACKAGE:
        return module == GUEST or module.startswith(GUEST + ".")
    return top in sys.stdlib_module_names or top in GUEST_THIRD_PARTY


def test_the_guest_package_is_found() -> None:
    # Guards the tests below against passing on an empty set.
    assert {GUEST, f"{GUEST}.agent", f"{GUEST}.worker", f"{GUEST}.plugin"} <= set(GUEST_MODULES)


@pytest.mark.parametrize("module", sorted(GUEST_MODULES))
def test_guest_module_imports_only_stdlib_pytest_and_the_guest(module: str) -> None:
    path = GUEST_MODULES[module]
    bad = [
        f"{path.name}:{line}: {name}"
        for line, name in _imports(path)
        if not _allowed_in_guest(name) and name not in GUEST_OPTIONAL.get(module, ())
    ]
    assert not bad, f"{module} imports what the guest does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "allowed"),
    [
        ("import os.path", True),
        ("from pytest_gondolin.guest import protocol", True),
        ("from .protocol import Frame", True),
        ("from . import worker", True),
        ("import pytest, _pytest.fixtures", True),
        ("from pytest_gondolin import guest", True),
        ("from pytest_gondolin import config", False),
        ("from .. import errors", False),
        ("def f():\n    from pytest_gondolin.netpolicy.http import recorder", False),
        ("import typing\nif typing.TYPE_CHECKING:\n    import pytest_gondolin.vm", False),
        ("import importlib\nimportlib.import_module('pytest_gondolin.errors')", False),
        ("import requests", False),
    ],
)
def test_the_import_check_catches_what_it_should(
    tmp_path: Path, source: str, allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control for the check above: a module placed in the guest
    # package (on paper: it is parsed, never imported).
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", tmp_path / PACKAGE)
    probe = tmp_path / PACKAGE / "guest" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source + "\n")
    assert all(_allowed_in_guest(name) for _, name in _imports(probe)) == allowed


def _guest_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in GUEST_MODULES.items():
        edges = set()
        for _, name in _imports(path):
            # "from pytest_gondolin.guest import worker" names guest.worker;
            # "from pytest_gondolin.guest.worker import X" names guest.worker.X.
            while name and name not in GUEST_MODULES:
                name = name.rpartition(".")[0]
            if name:
                edges.add(name)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle in them (Tarjan), self-loops included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_guest_modules_import_each_other_without_cycles() -> None:
    graph = _guest_graph()
    assert f"{GUEST}.protocol" in graph[f"{GUEST}.agentio"]  # the graph has edges at all
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _payload_files(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The regular files ``build_payload`` puts in the archive, by guest path."""
    entries: list[cpio.Entry] = []

    def capture(members: list[cpio.Entry]) -> bytes:
        entries.extend(members)
        return b""

    monkeypatch.setattr(cpio, "archive", capture)
    payload.build_payload({"ca.pem": b"PEM"})
    return {e.path: e.data for e in entries if stat.S_ISREG(e.mode)}


def test_payload_ships_exactly_the_guest_package(monkeypatch: pytest.MonkeyPatch) -> None:
    files = _payload_files(monkeypatch)
    root = "/gondolin/py/pytest_gondolin/"
    shipped = {p[len(root) :] for p in files if p.startswith(root) and p.endswith(".py")}
    expected = {"__init__.py"} | {p.relative_to(PACKAGE_DIR).as_posix() for p in GUEST_FILES}
    assert shipped == expected
    for rel in shipped:
        assert files[root + rel] == (PACKAGE_DIR / rel).read_bytes()
    # Bytecode only for shipped sources; nothing else of the package.
    for path in files:
        if path.startswith(root) and not path.endswith(".py"):
            folder, _, name = path.rpartition("/__pycache__/")
            assert path.endswith(".pyc") and f"{folder}/{name.split('.')[0]}.py" in files
    others = {p for p in files if not p.startswith(root)}
    assert others == {"/gondolin/init.sh", "/gondolin/py/gondolin.py", "/gondolin/ca.pem"}
    assert files["/gondolin/py/gondolin.py"] == (GUEST_DIR / "plugin.py").read_bytes()


def test_the_unpacked_payload_imports_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every guest module imports from the payload alone; host modules are absent there.

    Every public name of the package imports there too (the guest's stand-ins
    for the host-only classes refuse to be used), and so does
    ``pytest_gondolin.errors``: the guest's error tree.
    """
    for path, data in _payload_files(monkeypatch).items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    py = tmp_path / "gondolin" / "py"
    script = f"""
import importlib, sys
import pytest_gondolin
assert pytest_gondolin.__file__.startswith({str(py)!r}), pytest_gondolin.__file__
for name in {sorted(GUEST_MODULES)!r} + ["gondolin"]:
    importlib.import_module(name)
for host_only in ("pytest_gondolin.config", "pytest_gondolin.vm.machine"):
    try:
        importlib.import_module(host_only)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(host_only + " is importable from the payload")
# Every public name imports there; the errors are the guest's, shared with the host.
from pytest_gondolin import *
from pytest_gondolin.errors import ExecError, GondolinError as Root
import pytest_gondolin.errors, pytest_gondolin.guest.errors as tree
assert pytest_gondolin.GUEST_HALF_ONLY and pytest_gondolin.errors is tree
assert Root is GondolinError is tree.GondolinError and issubclass(ExecError, Root)
assert Secret(value="v", hosts=["a.test"]).hosts == ("a.test",)
for use in (lambda: VM(), lambda: VM.launch(), lambda: Checkpoint.load("x"),
            lambda: ExecResult(0, b"", b""), lambda: Snapshot()):
    try:
        use()
    except tree.HostOnlyError as exc:
        assert "is host-side" in str(exc) and "not sandboxed" in str(exc), exc
    else:
        raise AssertionError("a host-only class was usable in the guest")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(py), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-s", "-c", script],
        cwd=py,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_on_the_host_the_public_names_are_the_host_classes_sharing_the_guest_values() -> None:
    import pytest_gondolin
    from pytest_gondolin import errors
    from pytest_gondolin.guest import errors as guest_errors
    from pytest_gondolin.guest.secret import Secret
    from pytest_gondolin.netpolicy.http import secrets
    from pytest_gondolin.vm import machine

    assert not pytest_gondolin.GUEST_HALF_ONLY
    assert pytest_gondolin.VM is machine.VM and pytest_gondolin.Checkpoint is machine.Checkpoint
    assert pytest_gondolin.Secret is secrets.Secret is Secret
    assert pytest_gondolin.GondolinError is errors.GondolinError is guest_errors.GondolinError
    assert errors is not guest_errors  # the host's module, re-exporting every public name
    defined = {
        name
        for name, value in vars(guest_errors).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == guest_errors.__name__
    }
    assert "HostOnlyError" in defined and "guest_file_error" in defined
    assert defined - {"tail_lines"} <= set(errors.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pytest_gondolin.Nope  # noqa: B018
