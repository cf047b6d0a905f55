"""A project under the guest's tmpfs folders (here /tmp, as pytester's are) lives on the guest's disk.

Without it a project or venv in /tmp or a pyenv interpreter in /root went to
guest RAM: a real suite's worker was killed by the OOM killer at collection.
"""

from __future__ import annotations

import pytest

from tests.plugin.test_sandboxed import INNER_TIMEOUT

pytestmark = pytest.mark.integration


def test_a_project_under_tmp_is_backed_by_the_guests_disk(inner: pytest.Pytester) -> None:
    assert str(inner.path).startswith("/tmp/")
    top = "/tmp/" + inner.path.relative_to("/tmp").parts[0]
    inner.makepyfile(
        test_where=f"""
        import os
        import pytest

        @pytest.mark.sandboxed
        def test_on_disk():
            assert os.environ.get("GONDOLIN_GUEST")
            points = [line.split()[4] for line in open("/proc/self/mountinfo")]
            assert {top!r} in points
            # the project's folder is not the /tmp tmpfs: another device
            assert os.stat(os.path.dirname(__file__)).st_dev != os.stat("/tmp").st_dev
        """
    )
    result = inner.runpytest_subprocess("-p", "gondolin", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=1)
