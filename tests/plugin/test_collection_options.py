"""Command-line options that change collection reach the guest worker (issue 13).

The guest worker collects the files holding sandboxed items with the host's
collection options (``sandbox/arguments.py``), so its node ids match the
host's and no item is "not collected in the worker". Each run is one inner
session with a VM restore, the project copy and the guest's collection
(~25 s under TCG); ``tests/unit/sandbox/test_arguments.py`` covers the
argument mapping option by option.
"""

from __future__ import annotations

import pytest

from tests.plugin.test_sandboxed import run_gondolin, verbose_statuses

pytestmark = pytest.mark.integration


def _assert_clean(result: pytest.RunResult) -> None:
    output = result.stdout.str() + result.stderr.str()
    assert "not collected in the worker" not in output
    assert "in the guest:" not in output


def test_doctest_modules_collect_the_same_in_the_guest(inner: pytest.Pytester) -> None:
    """A sandboxed module's doctests are sandboxed too (its ``pytestmark``); others stay on the host."""
    inner.makepyfile(
        test_guest_mod='''
        import os
        import pytest

        pytestmark = pytest.mark.sandboxed

        def where():
            """
            >>> import os
            >>> os.uname().nodename
            'gondolin'
            """

        def test_in_guest():
            assert os.uname().nodename == "gondolin"
        ''',
        host_helpers='''
        def where():
            """
            >>> import os
            >>> os.uname().nodename != "gondolin"
            True
            """
        ''',
    )
    result = run_gondolin(inner, "-v", "--doctest-modules")
    _assert_clean(result)
    result.assert_outcomes(passed=3)
    statuses = verbose_statuses(result)
    assert statuses["test_guest_mod.py::test_guest_mod.where"] == ["PASSED"]
    assert statuses["test_guest_mod.py::test_in_guest"] == ["PASSED"]
    assert statuses["host_helpers.py::host_helpers.where"] == ["PASSED"]


BROKEN = "raise ImportError('this folder must be ignored')\n"
SANDBOXED_OK = """
import os
import pytest

@pytest.mark.sandboxed
def test_in_guest():
    assert os.uname().nodename == "gondolin"
"""


def test_ignore_reaches_the_guest(inner: pytest.Pytester) -> None:
    (inner.path / "broken").mkdir()
    (inner.path / "broken" / "test_broken.py").write_text(BROKEN)
    (inner.path / "also_broken_here.py").write_text(BROKEN)
    inner.makepyfile(test_ok=SANDBOXED_OK)
    # Negative control: without --ignore the broken module fails collection.
    control = inner.runpytest_subprocess("-p", "gondolin", "--collect-only")
    control.stdout.fnmatch_lines(["*this folder must be ignored*"])
    assert control.ret == pytest.ExitCode.INTERRUPTED

    result = run_gondolin(
        inner, "-v", "--ignore=broken", "--ignore-glob=*_broken_here.py", "--doctest-modules"
    )
    _assert_clean(result)
    result.assert_outcomes(passed=1)
    assert verbose_statuses(result)["test_ok.py::test_in_guest"] == ["PASSED"]


def test_override_ini_and_plugins_reach_the_guest(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-o python_functions`` names the guest's tests too; ``-p`` loads what the guest has."""
    # A plugin in a virtualenv inside the project: the copy leaves it out, so the
    # guest cannot import it.
    venv_plugin = inner.path / ".venv" / "venv_plugin.py"
    venv_plugin.parent.mkdir()
    venv_plugin.write_text("")
    monkeypatch.setenv("PYTHONPATH", str(venv_plugin.parent))
    inner.makepyfile(
        project_plugin="""
        import os
        import pytest

        @pytest.fixture
        def loaded_where():
            return os.uname().nodename
        """,
        test_checks="""
        import os
        import pytest

        @pytest.mark.sandboxed
        def check_in_guest(loaded_where):
            assert os.uname().nodename == "gondolin"
            assert loaded_where == "gondolin"

        def check_on_host(loaded_where):
            assert loaded_where != "gondolin"
        """,
    )
    result = run_gondolin(
        inner,
        "-v",
        "-o",
        "python_functions=check_*",
        "-p",
        "project_plugin",
        "-p",
        "venv_plugin",  # on the host only: dropped in the guest, and said so once
        "-p",
        "xdist",  # applied on the host only (never distributes in the guest): not said
        "-o",
        "log_cli=true",
        "--log-cli-level=WARNING",
    )
    _assert_clean(result)
    result.assert_outcomes(passed=2)
    statuses = verbose_statuses(result)
    assert statuses["test_checks.py::check_in_guest"] == ["PASSED"]
    assert statuses["test_checks.py::check_on_host"] == ["PASSED"]
    output = result.stdout.str()
    notes = [line for line in output.splitlines() if "not importable in the guest" in line]
    assert len(notes) == 1, output
    assert "-p venv_plugin" in notes[0] and "xdist" not in notes[0]
    assert "project_plugin" not in output.split("not loaded there:")[1].splitlines()[0]


def test_import_mode_importlib_reaches_the_guest(inner: pytest.Pytester) -> None:
    """Two same-named test modules (no ``__init__.py``) collect only with importlib."""
    for folder in ("a", "b"):
        (inner.path / folder).mkdir()
        (inner.path / folder / "test_same.py").write_text(SANDBOXED_OK)
    result = run_gondolin(inner, "-v", "--import-mode=importlib")
    _assert_clean(result)
    result.assert_outcomes(passed=2)
    statuses = verbose_statuses(result)
    assert statuses["a/test_same.py::test_in_guest"] == ["PASSED"]
    assert statuses["b/test_same.py::test_in_guest"] == ["PASSED"]
