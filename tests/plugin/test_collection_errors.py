"""A bad ``sandboxed(...)`` argument or image name is a collection error, reported once.

Real inner pytest runs. Nothing boots: pytest stops after collection
(``Interrupted: N errors during collection``) unless
``--continue-on-collection-errors``, and then only the bad items are left out.
"""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)

#: Bound on one inner session (no VM boots in these runs).
INNER_TIMEOUT = 300.0

BAD_MARKERS = """
import pytest

@pytest.mark.sandboxed(memry="1G")
def test_bad_keyword():
    pass

@pytest.mark.sandboxed(timeout="soon")
def test_bad_timeout():
    pass

@pytest.mark.sandboxed("512M")
def test_bad_positional():
    pass

def test_on_host():
    pass
"""

BAD_IMAGE = """
import pytest

@pytest.mark.sandboxed(image="no-such-image")
def test_one():
    pass

@pytest.mark.sandboxed(image="no-such-image")
def test_two():
    pass

def test_on_host():
    pass
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest_subprocess("-rA", *args, timeout=INNER_TIMEOUT)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str(), result.stdout.str()
    return result


def test_bad_marker_arguments_are_collection_errors(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_bad=BAD_MARKERS)
    result = _run(inner)
    result.assert_outcomes(errors=3)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    output = result.stdout.str()
    assert "Interrupted: 3 errors during collection" in output
    assert "ERROR at setup" not in output
    assert "sandbox1" not in output, "nothing boots"
    # The short summary holds each reason whole (the known keywords are below it).
    result.stdout.fnmatch_lines(
        [
            "ERROR test_bad.py::test_bad_keyword - @pytest.mark.sandboxed got unknown "
            "argument(s) memry",
            "ERROR test_bad.py::test_bad_timeout - sandboxed(timeout=...): timeout must be a "
            "number, got 'soon'",
            "ERROR test_bad.py::test_bad_positional - @pytest.mark.sandboxed takes keyword "
            "arguments only, got ('512M',)",
        ]
    )
    # The error section has the whole message, the known keywords included.
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_bad.py*",
            "@pytest.mark.sandboxed got unknown argument(s) memry",
            "",
            "test_bad.py::test_bad_keyword: *; known: memory, cpus, image, *",
        ]
    )


def test_a_bad_image_is_one_collection_error(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_image=BAD_IMAGE)
    result = _run(inner)
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert output.count("image 'no-such-image' is neither a built-in recipe") == 2, output
    result.stdout.fnmatch_lines(
        [
            "ERROR test_image.py::test_one - image 'no-such-image' is neither a built-in "
            "recipe (*) nor a recipe folder",
        ]
    )
    assert "2 sandboxed tests use it: test_image.py::test_one, test_image.py::test_two" in output
    assert "sandbox1" not in output, "nothing boots"


def test_other_tests_run_when_collection_errors_are_allowed(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_bad=BAD_MARKERS, test_image=BAD_IMAGE)
    result = _run(inner, "--continue-on-collection-errors")
    result.assert_outcomes(passed=2, errors=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["PASSED test_bad.py::test_on_host", "PASSED test_image.py::test_on_host"]
    )
