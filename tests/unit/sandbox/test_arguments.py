"""The worker's pytest arguments (``sandbox/arguments.py``): the host session's, minus host plugins
the guest cannot import.

In-process (``pytester.parseconfig``), no worker and no VM.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_gondolin.sandbox.arguments import (
    GuestArgs,
    GuestSources,
    guest_args,
    plugin_in_guest,
    worker_args,
)


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
    ("host", "options"),
    [
        pytest.param(["--doctest-modules"], ["--doctest-modules"], id="doctest-modules"),
        pytest.param(
            ["--doctest-glob=*.rst", "--doctest-glob=*.txt"],
            ["--doctest-glob=*.rst", "--doctest-glob=*.txt"],
            id="doctest-glob",
        ),
        pytest.param(
            ["--doctest-modules", "--doctest-ignore-import-errors"],
            ["--doctest-modules", "--doctest-ignore-import-errors"],
            id="doctest-import-errors",
        ),
        pytest.param(
            ["--doctest-continue-on-failure", "--doctest-report=ndiff"],
            ["--doctest-continue-on-failure", "--doctest-report=ndiff"],
            id="doctest-report",
        ),
        pytest.param(["--ignore=sub"], ["--ignore={here}/sub"], id="ignore-made-absolute"),
        pytest.param(["--ignore=/abs/x"], ["--ignore=/abs/x"], id="ignore-absolute"),
        pytest.param(
            ["--ignore-glob=*_broken.py", "--ignore-glob=sub/*"],
            ["--ignore-glob=*_broken.py", "--ignore-glob=sub/*"],
            id="ignore-glob-verbatim",
        ),
        pytest.param(["--confcutdir=sub"], ["--confcutdir={here}/sub"], id="confcutdir-absolute"),
        pytest.param(["--import-mode=importlib"], ["--import-mode=importlib"], id="import-mode"),
        pytest.param(["--noconftest"], ["--noconftest"], id="noconftest"),
        pytest.param(
            ["-o", "python_functions=check_*"], ["-o", "python_functions=check_*"], id="o"
        ),
        pytest.param(
            ["-W", "error::DeprecationWarning"], ["-W", "error::DeprecationWarning"], id="W"
        ),
    ],
)
def test_worker_args_repeat_the_collection_options(
    pytester: pytest.Pytester, host: list[str], options: list[str]
) -> None:
    (pytester.path / "sub").mkdir()
    config = pytester.parseconfig("-p", "no:gondolin", *host)
    args = worker_args(config)
    expected = [o.format(here=pytester.path) for o in options]
    # In order, as one run: "-o x" pairs must stay pairs.
    joined = "\x00".join(args)
    assert "\x00".join(expected) in joined


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(["--deselect=test_a.py::test_x"], id="deselect"),
        pytest.param(["-k", "x", "-m", "slow"], id="k-m"),
        pytest.param(["-x", "--maxfail=2"], id="x"),
    ],
)
def test_worker_args_leave_selection_to_the_host(
    pytester: pytest.Pytester, host: list[str]
) -> None:
    """The host sends the worker the node ids to run; selecting again there changes nothing."""
    baseline = worker_args(pytester.parseconfig("-p", "no:gondolin"))
    assert worker_args(pytester.parseconfig("-p", "no:gondolin", *host)) == baseline


def test_worker_args_skip_doctest_options_without_the_doctest_plugin(
    pytester: pytest.Pytester,
) -> None:
    """Negative control: ``-p no:doctest`` leaves no doctest option the worker would reject."""
    config = pytester.parseconfig("-p", "no:gondolin", "-p", "no:doctest")
    assert not any(a.startswith("--doctest") for a in worker_args(config))


def _never(name: str) -> bool:
    return False


def _always(name: str) -> bool:
    return True


@pytest.mark.parametrize(
    ("host", "loads", "guest", "dropped"),
    [
        pytest.param(["-p", "xdist"], _never, [], ["xdist"], id="plugin-dropped"),
        pytest.param(["-p", "xdist"], _always, ["-p", "xdist"], [], id="plugin-kept"),
        pytest.param(
            ["-p", "no:cacheprovider"], _never, ["-p", "no:cacheprovider"], [], id="disable-kept"
        ),
        pytest.param(
            ["--rootdir=/r", "-p", "cov", "-o", "x=1", "-p", "no:gondolin", "-p", "local", "-v"],
            lambda name: name == "local",
            ["--rootdir=/r", "-o", "x=1", "-p", "no:gondolin", "-p", "local", "-v"],
            ["cov"],
            id="mixed",
        ),
        pytest.param(["-p"], _never, ["-p"], [], id="dangling-p-kept"),
        pytest.param([], _never, [], [], id="empty"),
    ],
)
def test_guest_args_drop_only_plugins_the_guest_cannot_load(
    host: list[str], loads: Callable[[str], bool], guest: list[str], dropped: list[str]
) -> None:
    assert guest_args(host, loads) == GuestArgs(tuple(guest), tuple(dropped))


def test_guest_args_keep_what_the_host_session_mirrors(pytester: pytest.Pytester) -> None:
    """Negative control: only ``-p NAME`` pairs go; every mirrored option survives."""
    config = pytester.parseconfig(
        "-p", "no:gondolin", "-p", "pytester", "-W", "error", "--tb=line", "--doctest-modules"
    )
    args = worker_args(config)
    kept = guest_args(args, _never)
    # pytester, then the plugins the host autoloaded (sandbox/guest_plugins.py).
    loads = [b for a, b in itertools.pairwise(args) if a == "-p" and "no:" not in b]
    assert kept.dropped_plugins == tuple(loads) and loads[0] == "pytester"
    assert [a for a in args if a not in ("-p", *loads)] == [a for a in kept.args if a != "-p"]


def _sources(
    project: Path, *, folders: tuple[Path, ...] = (), dists: tuple[str, ...] = ()
) -> GuestSources:
    return GuestSources(project.resolve(), tuple(f.resolve() for f in folders), frozenset(dists))


def _no_distribution(package: str) -> list[str]:
    return []


@pytest.mark.parametrize(
    ("where", "in_guest"),
    [
        pytest.param("local_plugin.py", True, id="project-module"),
        pytest.param("plugins/deep/local_plugin.py", True, id="project-subfolder"),
        pytest.param(".venv/lib/python3/site-packages/local_plugin.py", False, id="project-venv"),
        pytest.param("env/lib/python3/site-packages/local_plugin.py", False, id="site-packages"),
        pytest.param("build/lib/local_plugin.py", False, id="excluded-folder"),
    ],
)
def test_plugin_in_guest_by_where_the_host_loaded_it(
    pytester: pytest.Pytester, where: str, in_guest: bool
) -> None:
    path = pytester.path / "project" / where
    path.parent.mkdir(parents=True)
    path.write_text("")
    sys.path.insert(0, str(path.parent))  # pytester restores sys.path afterwards
    config = pytester.parseconfig("-p", "no:gondolin", "-p", "local_plugin")
    sources = _sources(pytester.path / "project")
    assert plugin_in_guest(config, "local_plugin", sources, distributions_of=_no_distribution) is (
        in_guest
    )


def test_plugin_in_guest_by_distribution_and_folder(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "no:gondolin", "-p", "pytester")
    project = pytester.path / "project"
    pytest_dir = Path(pytest.__file__).parent.parent / "_pytest"
    by_dist = {"_pytest": ["pytest"]}
    assert plugin_in_guest(
        config,
        "pytester",
        _sources(project, dists=("pytest",)),
        distributions_of=lambda p: by_dist.get(p, []),
    )
    assert plugin_in_guest(
        config,
        "pytester",
        _sources(project, folders=(pytest_dir,)),
        distributions_of=_no_distribution,
    )
    # Negative control: neither its distribution nor its folder is in the guest.
    assert not plugin_in_guest(
        config,
        "pytester",
        _sources(project, dists=("pytest-xdist",)),
        distributions_of=lambda p: by_dist.get(p, []),
    )
    # A name the host never registered is not known to load.
    assert not plugin_in_guest(
        config,
        "never-loaded",
        _sources(project, dists=("pytest",)),
        distributions_of=lambda p: by_dist.get(p, []),
    )
