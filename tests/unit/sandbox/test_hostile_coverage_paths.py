"""A hostile guest names host files it was never given in its coverage data.

The host merges a sandboxed test's coverage into pytest-cov's data
(``sandbox/coverage.py``), and coverage.py's HTML report renders the source
of every measured file that parses as Python. The guest chooses the paths.
Before the fix any regular file under the rootdir was accepted, so a guest
could name a file the project copy withholds from it -- a git-ignored
``.env`` (``API_TOKEN = "..."`` is valid Python), ``local_settings.py`` -- or
a symlink in the project pointing outside it, and the host's own HTML report
(a CI artifact) would carry that file's text. Now a path under the rootdir
counts only if the project copy gave that file to the guest, and any path
only if it is a Python source file reached without a symlink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_gondolin.sandbox.coverage import HostCoverage, reportable

coverage = pytest.importorskip("coverage")
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

SECRET = "tok-8c1f0d2e"


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / ".gitignore").write_text(".env\nlocal_settings.py\n")
    (project / "mylib.py").write_text("def f():\n    return 1\n")
    (project / ".env").write_text(f'API_TOKEN = "{SECRET}"\n')
    (project / "local_settings.py").write_text(f'PASSWORD = "{SECRET}"\n')
    (project / "notes.toml").write_text(f'token = "{SECRET}"\n')
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "secret.py").write_text(f'KEY = "{SECRET}"\n')
    (project / "link.py").symlink_to(outside / "secret.py")
    # A git work tree: the project copy leaves out what .gitignore ignores.
    subprocess.run(["git", "init", "-q", str(project)], check=True, capture_output=True)
    return project


def _html(tmp_path: Path, project: Path, files: list[str]) -> str:
    """coverage.py's HTML report for data claiming line 1 of each of ``files``."""
    data = coverage.CoverageData(basename=str(tmp_path / ".coverage"))
    data.add_lines({path: [1] for path in files})
    data.write()
    cov = coverage.Coverage(data_file=str(tmp_path / ".coverage"))
    cov.load()
    out = tmp_path / "htmlcov"
    cov.html_report(directory=str(out), ignore_errors=True)
    return "".join(p.read_text(errors="replace") for p in out.glob("*.html"))


def _accepted(project: Path) -> HostCoverage:
    host = HostCoverage.__new__(HostCoverage)  # the path gate only: no pytest-cov controller
    host.roots = (project.resolve(),)
    host._allowed = {}
    host._project_root = project.resolve()
    host._given = None
    return host


FORGED = [".env", "local_settings.py", "notes.toml", "link.py"]


def test_withheld_or_linked_files_never_reach_the_host_s_report(tmp_path: Path) -> None:
    project = _project(tmp_path)
    host = _accepted(project)
    claimed = [str(project / name) for name in [*FORGED, "mylib.py"]]
    kept = [path for path in claimed if host._accepts(path)]
    assert kept == [str(project / "mylib.py")]
    assert SECRET not in _html(tmp_path, project, kept)


def test_negative_control_unfiltered_paths_put_the_secret_in_the_report(tmp_path: Path) -> None:
    project = _project(tmp_path)
    claimed = [str(project / name) for name in FORGED]
    # What the old gate took: every one is a regular file under the rootdir.
    assert all(os.path.isfile(path) and Path(path).is_relative_to(project) for path in claimed)
    assert SECRET in _html(tmp_path, project, claimed)


def test_a_symlink_or_a_non_python_file_is_not_reportable_anywhere(tmp_path: Path) -> None:
    project = _project(tmp_path)
    assert reportable(str(project / "mylib.py"), [project])
    assert not reportable(str(project / "link.py"), [project])
    assert not reportable(str(project / "notes.toml"), [project])
    assert not reportable(str(project / ".env"), [project])
