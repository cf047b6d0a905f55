"""A team marks its whole suite ``sandboxed`` from a root conftest, as the docs suggest.

Found trying a real project as a new user: a plain ``pytest_collection_modifyitems``
in the root conftest (no ``tryfirst``) ran after the plugin had read the markers, so
every test errored with a bare "options missing". One inner session (~20 s under TCG).
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugin.test_sandboxed import INNER_TIMEOUT, run_gondolin

pytestmark = pytest.mark.integration


def test_a_root_conftest_marks_every_test_sandboxed(inner: pytest.Pytester) -> None:
    inner.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if "host_only" not in item.name:
                    item.add_marker(pytest.mark.sandboxed)
        """
    )
    inner.makepyfile(
        test_suite="""
        import os

        def test_one():
            assert os.uname().nodename == "gondolin"

        def test_two():
            assert os.environ.get("GONDOLIN_GUEST") == "1"

        def test_host_only():  # control: an unmarked test stays on the host
            assert os.uname().nodename != "gondolin"
        """
    )
    result = run_gondolin(inner, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*test_one PASSED (in guest)*", "*test_two PASSED (in guest)*", "*test_host_only PASSED*"]
    )
    result.stdout.no_fnmatch_line("*options missing*")


def _venv_with_the_project_editable(where: Path, src: Path) -> Path:
    """A venv whose site folder names ``src`` first (as ``pip install -e .`` does), then ours.

    The outer venv's site folder (and this checkout, installed editable
    there) come after it, so pytest and its plugins import as in our own
    runs while pluggy comes from ``src``, as on a maintainer's machine.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120
    )
    (site_dir,) = where.glob("lib/python3.*/site-packages")
    (site_dir / "__editable__.a_project.pth").write_text(f"{src}\n", encoding="utf-8")
    # An import line: the outer site folder's own .pth files run (this checkout's editable install).
    lines = [f"import site; site.addsitedir({folder!r})" for folder in site.getsitepackages()]
    (site_dir / "b_outer_venv.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return where / "bin" / "python"


def test_a_dependency_of_pytest_installed_editable_from_the_project(
    inner: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The project under test is pluggy itself, installed editable from its ``src`` folder.

    Found marking pluggy 1.7.0's suite: the guest worker imports pytest, and
    so pluggy, before the project tree is copied in, so every test errored
    with ``No module named 'pluggy'``. Here a copy of the installed pluggy
    with one extra attribute sits in the project's ``src``, named by the
    venv's ``.pth`` file: the guest must start, and import that one, from the
    same file as the host. ~1 inner session (~30-60 s under TCG).
    """
    import pluggy

    src = inner.path / "src"
    shutil.copytree(
        Path(pluggy.__file__).parent, src / "pluggy", ignore=shutil.ignore_patterns("__pycache__")
    )
    with (src / "pluggy" / "__init__.py").open("a", encoding="utf-8") as fh:
        fh.write("\nFROM_THE_PROJECT = True\n")
    python = _venv_with_the_project_editable(tmp_path_factory.mktemp("venv"), src)
    inner.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.sandboxed)
        """
    )
    inner.makepyfile(
        test_pluggy_suite="""
        import os
        import pluggy

        def test_the_projects_pluggy():
            assert os.environ.get("GONDOLIN_GUEST") == "1"
            assert pluggy.FROM_THE_PROJECT, pluggy.__file__
            assert pluggy.__file__ == os.path.join(os.getcwd(), "src", "pluggy", "__init__.py")
        """
    )
    host = inner.run(str(python), "-c", "import pluggy; print(pluggy.__file__)", timeout=60)
    assert host.outlines[-1] == str(src / "pluggy" / "__init__.py")  # control: the host's view
    result = inner.run(str(python), "-m", "pytest", "-p", "gondolin", "-v", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_the_projects_pluggy PASSED (in guest)*"])


def test_markers_of_plugins_the_guest_does_not_load(inner: pytest.Pytester) -> None:
    """A suite that errors on unknown marks uses the markers of host-only plugins.

    Found marking python-dateutil's suite (``filterwarnings = error``, a
    conftest adding pytest-cov's ``no_cover`` mark): the guest worker does not
    load pytest-cov or xdist, so their marks were unknown there and the
    worker's collection stopped on ``PytestUnknownMarkWarning`` -- every test
    errored, where the plain run passes. One inner session (~20-60 s under TCG).
    """
    inner.makeini(
        """
        [pytest]
        filterwarnings = error::pytest.PytestUnknownMarkWarning
        markers = project_mark: a marker the project's ini file registers
        """
    )
    inner.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(config, items):
            for item in items:
                item.add_marker(pytest.mark.no_cover)  # pytest-cov's, as dateutil's conftest does
                if config.pluginmanager.hasplugin("gondolin"):
                    item.add_marker(pytest.mark.sandboxed)
        """
    )
    inner.makepyfile(
        test_marks="""
        import pytest

        @pytest.mark.xdist_group("one")
        def test_xdist_group_mark():
            pass

        @pytest.mark.project_mark
        def test_project_mark():
            pass
        """
    )
    # Control: plain, the host's pytest-cov and xdist register these marks (--strict-markers holds).
    plain = inner.runpytest_subprocess("-p", "no:gondolin", "--strict-markers", timeout=60)
    plain.assert_outcomes(passed=2)
    result = run_gondolin(inner, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_xdist_group_mark PASSED (in guest)*", "*test_project_mark PASSED (in guest)*"]
    )
    result.stdout.no_fnmatch_line("*Unknown pytest.mark*")


def test_a_test_that_exhausts_the_guests_memory_says_so(inner: pytest.Pytester) -> None:
    """A test that needs more memory than the guest has fails naming memory and the option.

    Found marking more-itertools' suite: its 100-thread ``concurrent_tee``
    test passes on the host and, on a loaded run, was OOM-killed in the
    256 MiB guest, reported only as "worker crashed (killed by SIGKILL)".
    The next test (a fresh restore) is unaffected. One inner session (~20-60 s under TCG).
    """
    inner.makepyfile(
        test_memory="""
        import pytest

        @pytest.mark.sandboxed
        def test_hog():
            chunks = []
            for _ in range(512):  # 4 GiB at most, touched (bytearray zero-fills)
                chunks.append(bytearray(8 * 2**20))

        @pytest.mark.sandboxed
        def test_after():
            pass
        """
    )
    result = run_gondolin(inner, "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_hog FAILED*",
            "*test_after PASSED (in guest)*",
            "*worker crashed (killed by SIGKILL): out of memory*",
            "the guest ran out of memory (256 MiB; its kernel's OOM killer ran): give it more with "
            '*sandboxed(memory="1G"), --gondolin-memory or gondolin_memory',
        ]
    )


def test_hypothesis_text_strategies_run_in_a_default_guest(inner: pytest.Pytester) -> None:
    """Found marking attrs' suite: each test drawing text ran out of the 256 MiB guest.

    Hypothesis computes its Unicode tables on first use (a tuple for each
    code point) and caches them in ``.hypothesis``, which the copy leaves
    out, so every sandboxed test computed them again, ~20 MB/s of growth
    under TCG. The host's tables now go with the tree. Before: the first
    test hit its timeout.
    """
    inner.makepyfile(
        test_text="""
        import pytest
        from hypothesis import given, settings, strategies as st

        @pytest.mark.sandboxed(timeout=90)
        @settings(max_examples=20, deadline=None, database=None)
        @given(st.dictionaries(st.text(), st.lists(st.integers())))
        def test_one(d):
            assert isinstance(d, dict)

        @pytest.mark.sandboxed(timeout=90)
        @settings(max_examples=20, deadline=None, database=None)
        @given(st.text())
        def test_two(s):
            assert isinstance(s, str)
        """
    )
    result = run_gondolin(inner)
    result.assert_outcomes(passed=2)
    # The tables are packed byte for byte the same each run (Hypothesis rewrites
    # them with a new gzip header): an unchanged re-run reuses the collected worker.
    again = run_gondolin(inner)
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["*restored the cached collected worker (2 items)*"])


def test_hypothesis_deadlines_are_off_in_the_guest(inner: pytest.Pytester) -> None:
    """Found marking attrs' suite: two ``@given`` tests failed only sandboxed.

    "Unreliable test timings! On an initial run, this test took 763ms, which
    exceeded the deadline of 400ms": the first pass through any code in a
    freshly restored guest is slower than on the host. The guest now runs
    ``@given`` tests with ``deadline=None``; the host keeps the deadline
    (control). Each example sleeps four times the deadline, so with a
    deadline the guest's test fails on every run, however fast the machine.
    One inner session (~20-60 s under TCG).
    """
    inner.makepyfile(
        test_deadline="""
        import time
        from datetime import timedelta

        import pytest
        from hypothesis import given, settings, strategies as st

        SLOW = settings(max_examples=2, deadline=timedelta(milliseconds=50), database=None)

        @pytest.mark.sandboxed
        @SLOW
        @given(st.integers())
        def test_in_guest(n):
            time.sleep(0.2)

        @SLOW
        @given(st.integers())
        def test_on_host(n):
            time.sleep(0.2)
        """
    )
    result = run_gondolin(inner, "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_in_guest PASSED (in guest)*", "*test_on_host FAILED*", "*DeadlineExceeded*"]
    )
