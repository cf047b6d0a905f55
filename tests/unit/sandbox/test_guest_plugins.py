"""The host's plugins and output options as worker arguments, and live output on the host.

``sandbox/guest_plugins.py`` (which autoloaded plugins the worker loads by
name, pytest-randomly's seed, ``--capture`` and ``--setup-show``),
``guest_args`` dropping a plugin's options with the plugin, the ``output``
message (``sandbox/messages.py``) and how the client shows it
(``sandbox/client.py``): bounded, with control characters made visible.
Real pytest configs (pytester, plugins installed from PyPI), no VM.
"""

from __future__ import annotations

import pytest

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.guest.worker import RANDOMLY_SEED_ENV
from pytest_gondolin.sandbox.arguments import guest_args, worker_args
from pytest_gondolin.sandbox.client import MAX_LIVE_CHARS_PER_RUN, WorkerClient, safe_terminal_text
from pytest_gondolin.sandbox.debugger import debugger_notice
from pytest_gondolin.sandbox.guest_plugins import (
    HOST_ONLY_PLUGINS,
    entry_point_plugins,
    key_args,
    output_args,
    plugin_option_args,
    run_seed_env,
)
from pytest_gondolin.sandbox.messages import MAX_OUTPUT_CHARS, OutputMessage, parse_message
from tests.unit.sandbox._wire import COLLECTED, DONE, NODEID, FakeTransport, line, report_line


@pytest.fixture
def autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)


def plugin_loads(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-p"]


@pytest.mark.usefixtures("autoload")
def test_autoloaded_plugins_are_named_for_the_worker(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "no:randomly", "-p", "no:cacheprovider")
    named = entry_point_plugins(config)
    # Installed in the test extra: pytest-mock, pytest-asyncio, hypothesis' plugin.
    assert {"pytest_mock", "asyncio", "hypothesispytest"} <= set(named)
    # Blocked on the host: not named, and its "-p no:" is repeated for the worker.
    assert "randomly" not in named
    assert not set(named) & HOST_ONLY_PLUGINS
    args = worker_args(config)
    assert "no:randomly" in plugin_loads(args)
    assert {"pytest_mock", "asyncio"} <= set(plugin_loads(args))


@pytest.mark.usefixtures("autoload")
def test_a_plugin_given_with_p_is_named_once(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "pytest_mock", "-p", "no:randomly")
    assert plugin_loads(worker_args(config)).count("pytest_mock") == 1


@pytest.mark.usefixtures("autoload")
def test_plugins_the_host_applies_around_a_run_stay_on_the_host(pytester: pytest.Pytester) -> None:
    # Named with -p or autoloaded: pytest-timeout's alarm in the guest would race the
    # host's, xdist never distributes there; "-p no:NAME" is repeated as it is.
    config = pytester.parseconfig("-p", "timeout", "-p", "xdist", "-p", "no:randomly")
    loads = plugin_loads(worker_args(config))
    assert not set(loads) & HOST_ONLY_PLUGINS
    assert "no:randomly" in loads and "pytest_mock" in loads


def test_without_autoload_nothing_is_added(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    config = pytester.parseconfig()
    assert entry_point_plugins(config) == []


@pytest.mark.usefixtures("autoload")
@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param(["--randomly-seed=1234"], ["--randomly-seed=1234"], id="given"),
        pytest.param(
            ["--randomly-seed=5", "--randomly-dont-reset-seed"],
            ["--randomly-seed=5", "--randomly-dont-reset-seed"],
            id="dont-reset",
        ),
    ],
)
def test_randomly_seed_reaches_the_worker(
    pytester: pytest.Pytester, host: list[str], expected: list[str]
) -> None:
    config = pytester.parseconfig("-p", "randomly", "-p", "no:asyncio", *host)
    config._do_configure()  # pytest-randomly resolves the seed at configure
    try:
        assert plugin_option_args(config) == expected
        assert all(arg in worker_args(config) for arg in expected)
    finally:
        config._ensure_unconfigure()


@pytest.mark.usefixtures("autoload")
def test_a_seed_randomly_picked_is_the_one_the_worker_gets(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("-p", "randomly", "-p", "no:asyncio")
    config._do_configure()
    try:
        seed = config.option.randomly_seed
        assert isinstance(seed, int)
        assert plugin_option_args(config) == [f"--randomly-seed={seed}"]
    finally:
        config._ensure_unconfigure()


@pytest.mark.usefixtures("autoload")
def test_the_seed_goes_with_each_run_and_not_into_the_cached_workers_key(
    pytester: pytest.Pytester,
) -> None:
    config = pytester.parseconfig("-p", "randomly", "-p", "no:asyncio", "--randomly-seed=7")
    config._do_configure()
    try:
        assert run_seed_env(config) == {RANDOMLY_SEED_ENV: "7"}
        args = worker_args(config)
        assert "--randomly-seed=7" in args and "--randomly-seed=7" not in key_args(args)
        other = [a.replace("=7", "=8") for a in args]
        assert key_args(other) == key_args(args)
    finally:
        config._ensure_unconfigure()
    without = pytester.parseconfig("-p", "no:randomly", "-p", "no:asyncio")
    assert run_seed_env(without) == {}


def test_a_dropped_plugin_takes_its_options_along() -> None:
    args = ["-p", "randomly", "--randomly-seed=3", "--randomly-dont-reset-seed", "-v"]
    assert guest_args(args, lambda name: False).args == ("-v",)
    assert guest_args(args, lambda name: False).dropped_plugins == ("randomly",)
    assert guest_args(args, lambda name: True).args == tuple(args)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        pytest.param([], [], id="default"),
        pytest.param(["-s"], ["--capture=no"], id="s"),
        pytest.param(["--capture=tee-sys"], ["--capture=tee-sys"], id="tee-sys"),
        pytest.param(["--setup-show"], ["--setup-show"], id="setup-show"),
    ],
)
def test_output_options_reach_the_worker(
    pytester: pytest.Pytester, host: list[str], expected: list[str]
) -> None:
    assert output_args(pytester.parseconfig("-p", "no:randomly", *host)) == expected


def test_debugger_notice_only_with_pdb_and_sandboxed_items(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("--pdb")
    notice = debugger_notice(config, 2)
    assert notice is not None and notice.startswith("--pdb does not enter sandboxed tests (2 here)")
    assert debugger_notice(config, 0) is None
    assert debugger_notice(pytester.parseconfig(), 3) is None
    assert "--trace" in (debugger_notice(pytester.parseconfig("--trace"), 1) or "")


def output_line(stream: str = "stdout", data: object = "hi\n") -> bytes:
    return line({"t": "output", "stream": stream, "data": data})


def test_output_messages_are_validated() -> None:
    assert parse_message(output_line("stderr", "x")) == OutputMessage("stderr", "x")
    for bad in (
        output_line("tty"),
        output_line(data=5),
        output_line(data="x" * (MAX_OUTPUT_CHARS + 1)),
        line({"t": "output", "data": "x"}),
    ):
        with pytest.raises(WorkerProtocolError, match=r"output\."):
            parse_message(bad)


def test_control_characters_are_made_visible() -> None:
    text = "a\x1b]52;c;Zm9v\x07b\x1b[2J\tc\r\n\x9b\x7f\x00"
    assert safe_terminal_text(text) == "a^[]52;c;Zm9v^Gb^[[2J\tc\r\n\\x9b^?^@"


def started(script: list[bytes]) -> WorkerClient:
    client = WorkerClient(FakeTransport([COLLECTED, *script]))
    client.start(1.0)
    return client


def test_a_run_shows_its_live_output_as_it_arrives_within_a_budget() -> None:
    chunk = "y" * MAX_OUTPUT_CHARS
    floods = (MAX_LIVE_CHARS_PER_RUN // MAX_OUTPUT_CHARS) + 3
    client = started(
        [
            report_line(when="setup"),
            output_line("stdout", "one\x1b[31m\n"),
            output_line("stderr", "two\n"),
            *[output_line("stdout", chunk)] * floods,
            report_line(),
            report_line(when="teardown"),
            DONE,
        ]
    )
    shown: list[tuple[str, str]] = []
    client.on_output = lambda stream, text: shown.append((stream, text))
    outcome = client.run(NODEID, seed=1, timeout=5)
    assert outcome.failure is None and len(outcome.reports) == 3
    assert shown[:2] == [("stdout", "one^[[31m\n"), ("stderr", "two\n")]
    assert sum(len(text) for _, text in shown) < MAX_LIVE_CHARS_PER_RUN + 200
    assert shown[-1][1].endswith("truncated by pytest-gondolin ...]\n")
    # The next run has a fresh budget.
    client2 = started([output_line("stdout", "again\n"), DONE])
    shown2: list[str] = []
    client2.on_output = lambda stream, text: shown2.append(text)
    client2.run(NODEID, seed=1, timeout=5)
    assert shown2 == ["again\n"]


ROUTER = ("-p", "tests.plugin._local_worker", "-p", "no:gondolin")


def test_private_report_attributes_of_plugins_stay_in_the_worker(
    pytester: pytest.Pytester,
) -> None:
    # hypothesis puts "_hypothesis_stats" on its reports; the host refuses private
    # names, so the worker leaves them out instead of failing the test.
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_makereport(item, call):
            report = yield
            report.__dict__["_plugin_private"] = {"n": 1}
            return report
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.remote_local
        def test_remote():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*ROUTER, "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=1)
    assert "WorkerProtocolError" not in result.stdout.str()
