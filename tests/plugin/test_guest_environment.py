"""The guest sees the host's Python environment (issue 12, item 2), in a real guest.

The inner session runs under a fresh venv (``python -m venv --without-pip``)
laid out as pip leaves one after ``pip install -e`` of two projects, the way
setuptools writes editable installs (no index here, so the files are written
by hand, as the installer would):

* ``theproject``: src layout inside the rootdir, a path ``.pth`` naming
  ``src``, entry points, PEP 610 ``direct_url.json``;
* ``mypkg``: a package in ``lib/mypkg`` of a project *outside* the rootdir,
  found through an import-finder module that a ``.pth`` ``import`` line
  installs (setuptools' and hatchling's way for such layouts);
* the outer venv's site-packages through a ``.pth`` path line, which brings
  h11 (pure), PyYAML (binary), hypothesis and xdist (pytest plugins).

Each inner session is one VM preparation (~25 s under TCG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

import pytest_gondolin
from pytest_gondolin import paths
from tests.plugin.test_sandboxed import INNER_TIMEOUT, _inner_env_changes

pytestmark = pytest.mark.integration

_FINDER = '''\
"""Finds mypkg in its project folder (an editable install's import finder)."""
import importlib.machinery
import importlib.util
import sys

MAPPING = {mapping!r}


class _Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in MAPPING:
            return None
        init = MAPPING[name] + "/__init__.py"
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[MAPPING[name]]
        )


def install():
    if _Finder not in sys.meta_path:
        sys.meta_path.append(_Finder)
'''

_FACTS = """
import importlib.metadata as md, json, sys
import theproject, mypkg
print(json.dumps({
    "theproject": theproject.__file__,
    "mypkg": mypkg.__file__,
    "version": md.version("theproject"),
    "h11": md.version("h11"),
    "files": sorted(str(f) for f in md.files("theproject")),
    "sys_path": sys.path,
}))
"""


def _dist_info(site: Path, name: str, version: str, project: Path, extra: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        "INSTALLER": "pip\n",
        "direct_url.json": json.dumps({"dir_info": {"editable": True}, "url": project.as_uri()}),
        **extra,
    }
    for fname, text in files.items():
        (info / fname).write_text(text)
    owned = [f for f in (site.iterdir()) if f.is_file() and name in f.name]
    record = [f"{info.name}/{fname},," for fname in [*files, "RECORD"]]
    record += [f"{f.name},," for f in owned]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def _make_venv(base: Path, rootdir: Path) -> tuple[Path, Path]:
    """A venv with the two editable installs and the outer environment; (python, mypkg folder)."""
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # theproject: src layout in the rootdir, a path .pth (setuptools' src-layout editable)
    (rootdir / "src" / "theproject").mkdir(parents=True)
    (rootdir / "src" / "theproject" / "__init__.py").write_text("def hook():\n    return 42\n")
    (site / "__editable__.theproject-1.2.3.pth").write_text(f"{rootdir / 'src'}\n")
    _dist_info(
        site,
        "theproject",
        "1.2.3",
        rootdir,
        {"entry_points.txt": "[theproject.plugins]\ndemo = theproject:hook\n"},
    )
    # mypkg: lib/mypkg outside the rootdir, an import finder installed by a .pth
    other = base / "other"
    (other / "lib" / "mypkg").mkdir(parents=True)
    (other / "lib" / "mypkg" / "__init__.py").write_text("VALUE = 'mypkg'\n")
    finder = "__editable___mypkg_0_4_0_finder"
    (site / f"{finder}.py").write_text(
        _FINDER.format(mapping={"mypkg": str(other / "lib" / "mypkg")})
    )
    (site / "__editable__.mypkg-0.4.0.pth").write_text(f"import {finder}; {finder}.install()\n")
    _dist_info(site, "mypkg", "0.4.0", other, {})
    return venv / "bin" / "python", other


_TEST = """
import importlib.metadata as md
import os
import sys

import pytest
from hypothesis import given, strategies as st

HOST = {facts!r}


@pytest.mark.sandboxed
def test_host_environment():
    assert os.uname().nodename == "gondolin"
    import h11, mypkg, theproject, yaml
    from yaml import _yaml  # the C extension of PyYAML's binary wheel

    assert md.version("theproject") == HOST["version"] == "1.2.3"
    assert [ep.load()() for ep in md.entry_points(group="theproject.plugins")] == [42]
    assert sorted(str(f) for f in md.files("theproject")) == HOST["files"]
    assert theproject.__file__ == HOST["theproject"]
    assert mypkg.__file__ == HOST["mypkg"] and mypkg.VALUE == "mypkg"
    assert md.version("h11") == HOST["h11"] == h11.__version__
    assert yaml.load("a: [1, 2]", Loader=yaml.CSafeLoader) == {{"a": [1, 2]}}
    plugins = {{ep.name for ep in md.entry_points(group="pytest11")}}
    assert {{"xdist", "hypothesispytest"}} <= plugins
    assert "gondolin" not in plugins  # the host's pytest-gondolin is not carried
    # The host's folders appear in the host's order.
    common = [p for p in sys.path if p in HOST["sys_path"]]
    assert common == [p for p in HOST["sys_path"] if p in common]
    assert HOST["sys_path"][-3:] == common[-3:]


@pytest.mark.sandboxed
@given(st.integers())
def test_hypothesis_runs_in_the_guest(n):
    assert isinstance(n, int)
"""


@pytest.fixture
def project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pytest.Pytester, Path]:
    """The inner project and the python of its venv, with the real image cache."""
    for name, value in _inner_env_changes(paths.cache_dir()).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    # pytest-gondolin itself, found as in a checkout (PYTHONPATH), not carried.
    monkeypatch.setenv("PYTHONPATH", str(Path(pytest_gondolin.__file__).parent.parent))
    python, _ = _make_venv(tmp_path_factory.mktemp("hostenv"), pytester.path)
    res = subprocess.run(
        [str(python), "-c", _FACTS], capture_output=True, text=True, check=True, cwd=pytester.path
    )
    facts = json.loads(res.stdout)
    facts["sys_path"] = [p for p in facts["sys_path"] if p]
    pytester.makepyfile(test_env=textwrap.dedent(_TEST).format(facts=facts))
    return pytester, python


def _run(pytester: pytest.Pytester, python: Path, *args: str) -> pytest.RunResult:
    return pytester.run(
        str(python),
        "-m",
        "pytest",
        "-p",
        "gondolin",
        "-p",
        "no:cacheprovider",
        *args,
        timeout=INNER_TIMEOUT,
    )


def test_the_guest_imports_what_the_host_imports(project: tuple[pytest.Pytester, Path]) -> None:
    pytester, python = project
    result = _run(pytester, python, "-v", "-o", "gondolin_host_environment=on")
    result.assert_outcomes(passed=2)


def test_without_the_host_environment_the_guest_lacks_it(
    project: tuple[pytest.Pytester, Path],
) -> None:
    """Negative control: with the carry-over off, the same tests cannot import the environment."""
    pytester, python = project
    result = _run(pytester, python, "-v", "-o", "gondolin_host_environment=off")
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) >= 1 and "passed" not in outcomes, outcomes
    result.stdout.fnmatch_lines(["*ModuleNotFoundError: No module named 'hypothesis'*"])


_LATE = """
import importlib.metadata as md

import pytest


@pytest.mark.sandboxed
def test_latecomer():
    import latecomer

    assert latecomer.VALUE == 7 and md.version("latecomer") == "1.0"
"""


def test_a_distribution_installed_between_sessions_is_in_the_guest(
    project: tuple[pytest.Pytester, Path],
) -> None:
    """The environment scan is cached across sessions, never stale: an install between two is seen."""
    pytester, python = project
    venv = python.parent.parent
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    past = time.time() - 60  # older than the scan cache's racy window: the first answer is saved
    # The venv and, beside it, the folder its editable finder names (a witness too).
    for path in [venv.parent, *venv.parent.rglob("*")]:
        os.utime(path, (past, past), follow_symlinks=False)
    pytester.makepyfile(test_late=textwrap.dedent(_LATE))
    started = time.time()
    _run(pytester, python, "test_late.py").assert_outcomes(failed=1)
    saved = [
        entry
        for entry in (paths.cache_dir() / "host-environment").glob("scan-*.json")
        if entry.stat().st_mtime >= started - 1 and str(site) in entry.read_text()
    ]
    assert saved, "the first session's scan was not cached: this test would prove nothing"
    # What pip leaves for a pure wheel, written by hand (no index here).
    (site / "latecomer.py").write_text("VALUE = 7\n")
    info = site / "latecomer-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: latecomer\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"latecomer.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    _run(pytester, python, "test_late.py").assert_outcomes(passed=1)
