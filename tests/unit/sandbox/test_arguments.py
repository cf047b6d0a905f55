"""The worker's pytest arguments (``sandbox/arguments.py``): the host session's, minus host plugins.

In-process (``pytester.parseconfig``), no worker and no VM.
"""

from __future__ import annotations

import os

import pytest

from pytest_gondolin.sandbox.arguments import guest_args, worker_args


@pytest.mark.parametrize("with_ini", [True, False], ids=["ini", "no-ini"])
def test_worker_args_mirror_the_host_session(pytester: pytest.Pytester, with_ini: bool) -> None:
    if with_ini:
        pytester.makeini("[pytest]\n")
    config = pytester.parseconfig(
        "-p", "no:gondolin", "-o", "xfail_strict=true", "-W", "error", "-vv", "--tb=short", "-l"
    )
    args = worker_args(config)
    if with_ini:
        assert args[:3] == [f"--rootdir={config.rootpath}", "-c", str(pytester.path / "tox.ini")]
        assert not any(a.startswith("--confcutdir") for a in args)
    else:
        assert args[:4] == [
            f"--rootdir={config.rootpath}",
            "-c",
            os.devnull,
            f"--confcutdir={config.rootpath}",
        ]
    joined = " ".join(args)
    for expected in (
        "-p no:gondolin",
        "-o xfail_strict=true",
        "-W error",
        "--tb=short",
        "-l",
        "-vv",
    ):
        assert expected in joined


@pytest.mark.parametrize(
    ("host", "guest"),
    [
        pytest.param(["-p", "xdist"], [], id="plugin-dropped"),
        pytest.param(["-p", "no:cacheprovider"], ["-p", "no:cacheprovider"], id="disable-kept"),
        pytest.param(
            ["--rootdir=/r", "-p", "cov", "-o", "x=1", "-p", "no:gondolin", "-v"],
            ["--rootdir=/r", "-o", "x=1", "-p", "no:gondolin", "-v"],
            id="mixed",
        ),
        pytest.param(["-p"], ["-p"], id="dangling-p-kept"),
        pytest.param([], [], id="empty"),
    ],
)
def test_guest_args_drop_only_plugin_loads(host: list[str], guest: list[str]) -> None:
    assert guest_args(host) == guest


def test_guest_args_keep_what_the_host_session_mirrors(pytester: pytest.Pytester) -> None:
    """Negative control: only ``-p NAME`` pairs go; every mirrored option survives."""
    config = pytester.parseconfig("-p", "no:gondolin", "-p", "pytester", "-W", "error", "--tb=line")
    args = worker_args(config)
    kept = guest_args(args)
    assert "pytester" not in kept
    assert [a for a in args if a not in ("-p", "pytester")] == [a for a in kept if a != "-p"]
