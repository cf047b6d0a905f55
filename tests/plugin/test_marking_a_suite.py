"""A team marks its whole suite ``sandboxed`` from a root conftest, as the docs suggest.

Found trying a real project as a new user: a plain ``pytest_collection_modifyitems``
in the root conftest (no ``tryfirst``) ran after the plugin had read the markers, so
every test errored with a bare "options missing". One inner session (~20 s under TCG).
"""

from __future__ import annotations

import pytest

from tests.plugin.test_sandboxed import run_gondolin

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
