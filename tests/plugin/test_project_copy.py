"""The project copy in a real guest: symlinks out of the tree bring nothing in (issue 14, item 5).

One inner session (a VM restore, the project copy and the guest worker's
collection: ~25 s under TCG). ``tests/unit/sandbox/test_project_files.py`` covers each
way out of the tree on its own; this proves the guest sees the result.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.plugin.test_sandboxed import run_gondolin

pytestmark = pytest.mark.integration

SECRET = "HOST-SECRET-7c9e6679"


def test_symlinks_out_of_the_tree_reach_nothing_in_the_guest(
    inner: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "mod.py").write_text(f"SECRET = {SECRET!r}\n")
    root = inner.path
    (root / "pkg").mkdir()
    (root / "pkg" / "mod.py").write_text("SECRET = None\n")
    (root / "ok" / "nested").mkdir(parents=True)
    (root / "ok" / "nested" / "deep.py").write_text("ok = 1\n")
    inner.makepyfile(
        test_copy=f"""
        import os
        import pytest

        ROOT = {str(root)!r}
        OUTSIDE = {str(outside)!r}

        @pytest.mark.sandboxed
        def test_in_guest():
            assert os.uname().nodename == "gondolin"
            # Negative control: an ordinary nested file is copied.
            with open(os.path.join(ROOT, "ok", "nested", "deep.py")) as fh:
                assert fh.read() == "ok = 1\\n"
            for path in ("pkg", "alias.py", OUTSIDE):
                assert not os.path.lexists(os.path.join(ROOT, path)), path
        """
    )
    subprocess.run(["git", "-C", str(root), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    # After `git add`: the index lists pkg/mod.py, which now lives outside.
    (root / "pkg" / "mod.py").unlink()
    (root / "pkg").rmdir()
    (root / "pkg").symlink_to(outside, target_is_directory=True)
    (root / "alias.py").symlink_to(outside / "mod.py")

    result = run_gondolin(inner, "-v", "-o", "log_cli=true", "--log-cli-level=WARNING")
    result.assert_outcomes(passed=1)
    output = result.stdout.str()
    assert SECRET not in output
    result.stdout.fnmatch_lines(
        ["* path(s) of * not copied into the guest*: alias.py (symlink), pkg/ (symlink)*"]
    )
