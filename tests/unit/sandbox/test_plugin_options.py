"""The host's plugins' and conftests' options, repeated for the guest worker as given
(``sandbox/plugin_options.py``): real pytest configs with the real plugins from PyPI,
no VM. End to end in a guest: tests/plugin/test_plugin_table.py::test_plugin_options_reach_the_guest_as_given.
"""

from __future__ import annotations

import pytest

from pytest_gondolin.sandbox.arguments import guest_args, worker_args
from pytest_gondolin.sandbox.plugin_options import PluginOption, given_tokens, plugin_options

FLAG = PluginOption(("--flag",), 0)
VALUE = PluginOption(("--value", "-V"), 1)
MANY = PluginOption(("--many",), -1)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["--flag", "-x"], ["--flag"]),
        (["--value=a b", "--flag"], ["--value=a b", "--flag"]),
        (["--value", "a", "tests/"], ["--value", "a"]),
        (["-V", "a", "-Vb"], ["-V", "a", "-Vb"]),
        (["--many", "a", "b", "-x", "c"], ["--many", "a", "b"]),
        # Not ours: pytest's, another plugin's, a longer name, after "--".
        (["-k", "x", "--flagged", "--value-other=1", "--", "--flag"], []),
        # A value option at the very end has nothing to take.
        (["--value"], ["--value"]),
    ],
)
def test_given_tokens_are_taken_verbatim(tokens: list[str], expected: list[str]) -> None:
    assert given_tokens(tokens, [FLAG, VALUE, MANY]) == expected


@pytest.fixture
def autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


@pytest.mark.usefixtures("autoload")
def test_options_of_plugins_in_the_guest_are_forwarded_as_given(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(
        "def pytest_addoption(parser):\n"
        "    parser.addoption('--target', default='dev')\n"
        "    parser.addoption('--runslow', action='store_true')\n"
    )
    monkeypatch.setenv("PYTEST_ADDOPTS", "--benchmark-disable")
    config = pytester.parseconfig(
        "-p",
        "randomly",
        "--randomly-seed=7",
        "--asyncio-mode",
        "auto",
        "--record-mode=none",
        "--block-network",
        "--hypothesis-profile=ci",
        "--target",
        "prod",
        "--runslow",
        # Host-only plugins' and pytest-split's: not for the guest.
        "--timeout=5",
        "--reruns=1",
        "--splits=2",
        "--group=1",
        "-x",
    )
    found = plugin_options(config)
    assert found.pop(str(pytester.path / "conftest.py")) == ["--target", "prod", "--runslow"]
    assert found == {
        "asyncio": ["--asyncio-mode", "auto"],
        "benchmark": ["--benchmark-disable"],
        "hypothesispytest": ["--hypothesis-profile=ci"],
        "recording": ["--record-mode=none", "--block-network"],
    }
    args = worker_args(config)
    # pytest-randomly's seed is the one the host resolved, given once.
    assert args.count("--randomly-seed=7") == 1
    for host_only in ("--timeout=5", "--reruns=1", "--splits=2", "--group=1"):
        assert host_only not in args
    at = args.index("--target")
    assert args[at : at + 3] == ["--target", "prod", "--runslow"]


@pytest.mark.usefixtures("autoload")
def test_a_plugin_the_guest_cannot_import_takes_its_options_along(
    pytester: pytest.Pytester,
) -> None:
    config = pytester.parseconfig("--record-mode=once", "--block-network", "--asyncio-mode=auto")
    options = plugin_options(config)
    kept = guest_args(worker_args(config), lambda name: name != "recording", options)
    assert kept.dropped_plugins == ("recording",)
    assert "--record-mode=once" not in kept.args and "--block-network" not in kept.args
    assert "--asyncio-mode=auto" in kept.args
    # Negative control: without the map, the options stay (and the worker would refuse them).
    assert "--block-network" in guest_args(worker_args(config), lambda n: n != "recording").args
