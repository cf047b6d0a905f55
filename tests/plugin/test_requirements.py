"""Guest requirements: installed from wheels by the host's pip, no network in the guest."""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration


def test_requirements_are_importable_in_the_guest(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ngondolin_requirements =\n    six==1.16.0\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandboxed
        def test_uses_six():
            import six
            assert six.__version__ == "1.16.0"
            assert six.__file__.startswith("/opt/gondolin/requirements/")
        """
    )
    result = pytester.runpytest_subprocess("-p", "gondolin")
    result.assert_outcomes(passed=1)


def test_bad_requirement_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(
        "-p", "gondolin", "--gondolin-requirements=not a==valid!!"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a valid requirement" in result.stderr.str()


def test_uninstallable_requirement_fails_the_sandboxed_tests_clearly(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\ngondolin_requirements = no-such-package-gondolin-xyz==9.9\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandboxed
        def test_a():
            pass

        def test_host():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "gondolin")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*pip could not install the guest requirements*no-such-package-gondolin-xyz*"]
    )
