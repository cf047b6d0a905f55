"""The in-guest test worker: a pytest session that runs the items the host names.

Runs on the far side of the VM boundary (or in a plain subprocess) as::

    python3 -m pytest_gondolin.guest.worker [pytest args ...]

with the host's invocation directory as cwd and the host's rootdir / inifile
passed explicitly (``--rootdir=R``, ``-c INI``).  This module imports only
the standard library, pytest and :mod:`pytest_gondolin.guest`: the guest
has none of the host's dependencies.  Importing it has no side effects, so
the host imports it for the protocol constants below.

Wire protocol
-------------

Newline-delimited JSON, one object per line, UTF-8 with every non-ASCII
character escaped (so a line never holds a raw newline or a lone surrogate
byte sequence).  Every object has a string member ``"t"`` naming its type.

host → worker, on the worker's fd 0, each line at most ``MAX_COMMAND_LINE``
bytes::

    {"t": "run", "nodeid": str, "seed": int,
     "env": {str: str}}                          run one item (reply: report*, warning*, done);
                                                 "env" (optional) is merged into os.environ first
    {"t": "ping", "nonce": str}                 liveness check (reply: pong)
    {"t": "answer", "ok": bool, "data"|"error"} the reply to a query (only during a run)
    {"t": "quit"}                                end the session (EOF means the same)
    {"t": "go", "argv": [str], "cwd": str,
     "env": {str: str}, "pause": bool}           start the session (only in waiting mode, below)
    {"t": "collect"}                             collect (only after ``configured``, below)

worker → host, on the fd that was fd 1 at start-up, each line at most
``MAX_WORKER_LINE`` bytes::

    {"t": "configured", "read": [str] | null}                  with the go's "pause", before collecting
    {"t": "collected", "nodeids": [str], "errors": [report]}   once, before any command is read
    {"t": "report", "data": report}                             a pytest_runtest_logreport report
    {"t": "warning", "message": str, "category": str,
     "nodeid": str, "filename": str, "lineno": int}             a warning recorded during the run
    {"t": "error", "message": str}                              a command could not be served
    {"t": "done", "nodeid": str}                                the run command is finished
    {"t": "pong", "nonce": str}                                 answer to ping, same nonce
    {"t": "query", "kind": str, "args": object}                 mid-run question (see hostquery)
    {"t": "coverage", "nodeid": str, ...}                       the run's coverage (see guest.coverage)
    {"t": "output", "stream": "stdout"|"stderr", "data": str}   live output of the run (see guest.live)
    {"t": "pdb_output" | "pdb_read" | "pdb_end", ...}           --pdb on the host's terminal (see guest.debugger)
    {"t": "settled", "reason": str}                             after a process-isolated run's done (below)

``report`` is the dict made by ``pytest_report_to_serializable``; the
``errors`` of ``collected`` are the collect reports that failed.

Waiting mode (:data:`WAIT_ENV` set to ``"1"``): the worker imports pytest,
its built-in plugins, the modules a session imports late and the host's
plugin modules (:data:`~pytest_gondolin.guest.startup.PRELOAD_ENV`), reads
the installed distributions' entry points (``startup.preload``), sends
``{"t": "waiting"}`` and reads one ``go`` command; only then does it change
to ``cwd``, merge ``env`` into its environment, put back on ``sys.path`` the
folders of the host's ``.pth`` files that exist only now (the project's
editable sources, copied after start-up), forget what the import system
cached about folders, and start the session with ``argv`` (its command line
arguments) as above, pytest's "already imported" warning silenced for the
``-p`` names imported ahead.  The host snapshots a VM whose worker waits
there and reuses it across runs (``sandbox/worker_cache.py``): nothing of
the project is read before the go.  In a guest (:data:`GUEST_ENV`), a
waiting worker writes back and drops the guest's page cache after
collection, before its ``collected`` line: the host snapshots it next.
With the go's ``"pause"``, the worker also stops once pytest is configured,
before it collects: it says ``configured`` (the files it read meanwhile),
then waits for ``collect`` (:mod:`pytest_gondolin.guest.configured`).

Guarantees the host relies on
-----------------------------

* Nothing a test or plugin writes to stdout reaches the protocol stream:
  before pytest starts, fd 1 is duplicated into a private descriptor and fd 1
  becomes a copy of fd 2.  fd 0 is likewise moved aside and replaced with
  ``/dev/null`` so a test reading stdin cannot eat commands.
* Each ``run`` uses ``nextitem=None``: every fixture the item uses, session
  scope included, is set up and torn down within that run, because on the
  real VM every run starts from the same clean snapshot.
* ``random`` is seeded with the command's seed before each run (then
  pytest-randomly, when the host loaded it, reseeds each phase from the
  seed the host passed it: ``--randomly-seed``, or the run's own in its
  environment, :data:`RANDOMLY_SEED_ENV`, since a cached worker was
  collected in an earlier run).
* With ``--capture=no`` (``-s``) or ``tee-sys``, what a run writes to fds 1
  and 2 is sent as ``output`` messages while it runs, and so are
  ``--setup-show``'s lines (:mod:`pytest_gondolin.guest.live`); the guest's
  own terminal reporter writes to stderr.  The worker's own ``--pdb`` / ``--trace``
  are off; when a run's environment asks for it, a failure gets pdb's
  post-mortem on the host's terminal instead (:mod:`pytest_gondolin.guest.debugger`).
* SIGUSR1 dumps every thread's stack to stderr (``faulthandler``); the host
  sends it before giving up on a run that timed out.
* A run whose environment sets ``PYTEST_GONDOLIN_ISOLATION=process`` runs in
  a fork of the worker in fresh namespaces, forked ahead after the previous
  one (:mod:`pytest_gondolin.guest.process_runs`): the test process says
  ``done`` itself (the worker sends ``error`` and ``done`` if it died first);
  then the worker checks what namespaces cannot hold and sends
  ``{"t": "settled", "reason": str}`` (empty: clean), which the host reads
  before it gives that VM another test.
* The environment variable ``PYTEST_GONDOLIN_WORKER`` is ``"1"`` in the worker,
  so plugins loaded in both places can tell the far side from the host.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import random
import signal
import sys
import traceback
import warnings
from collections.abc import Generator, Sequence
from typing import IO, Any, Final

import pytest

from pytest_gondolin.guest import configured, debugger, hostquery, isolation, live, startup
from pytest_gondolin.guest.coverage import GuestCoverage
from pytest_gondolin.guest.process_runs import ProcessRuns
from pytest_gondolin.guest.worker_channel import MAX_COMMAND_LINE as MAX_COMMAND_LINE
from pytest_gondolin.guest.worker_channel import MAX_GO_ITEMS as MAX_GO_ITEMS
from pytest_gondolin.guest.worker_channel import MAX_JSON_DEPTH as MAX_JSON_DEPTH
from pytest_gondolin.guest.worker_channel import MAX_WORKER_LINE as MAX_WORKER_LINE
from pytest_gondolin.guest.worker_channel import SHRINK_STRING_CHARS, shrink
from pytest_gondolin.guest.worker_channel import HostPipe as HostPipe
from pytest_gondolin.guest.worker_channel import encode_line as encode_line
from pytest_gondolin.guest.worker_channel import parse_command as parse_command
from pytest_gondolin.guest.worker_channel import to_jsonable as to_jsonable

#: Environment variable set to "1" inside the worker process.
WORKER_ENV: Final = "PYTEST_GONDOLIN_WORKER"
#: Module name to run with ``python -m``.
WORKER_MODULE: Final = "pytest_gondolin.guest.worker"
#: Environment variable: "1" makes the worker wait for a ``go`` before pytest starts.
WAIT_ENV: Final = "GONDOLIN_WORKER_WAIT"
#: Environment variable the host sets to "1" for a worker in a guest (sandbox/worker_setup.py).
GUEST_ENV: Final = "GONDOLIN_GUEST"
#: In a run's environment: the host's pytest-randomly seed for this run. The
#: worker may have been collected (and cached) under another run's seed.
RANDOMLY_SEED_ENV: Final = "PYTEST_GONDOLIN_RANDOMLY_SEED"
#: The line a waiting worker sends once it is ready for its ``go``.
WAITING_LINE: Final = b'{"t":"waiting"}\n'
#: Appended to the worker's pytest arguments.  No cache: the host owns
#: ``--lf`` & co. and the guest's tree is thrown away.  The filter: this very
#: process imported ``pytest_gondolin`` before pytest could mark the
#: installed plugin's package for assertion rewriting, which pytest reports
#: as a warning -- fatal under ``-W error`` -- though nothing is lost (the
#: package has no test code).  It comes last so it wins over the user's
#: ``-W`` options, and matches only that one message.  No header: the guest's
#: terminal output is only the worker's stderr, and the header's "plugins:"
#: line parses every plugin distribution's metadata (~0.2 s under TCG).
_EXTRA_ARGS: Final = (
    "-p",
    "no:cacheprovider",
    "--no-header",
    "-W",
    "ignore:Module already imported so cannot be rewritten; pytest_gondolin"
    ":pytest.PytestAssertRewriteWarning",
)

#: Keys pytest itself serializes with a leading underscore. The private
#: attributes plugins put on reports (hypothesis' ``_hypothesis_stats``) stay
#: in the guest: the host refuses private names (sandbox/report_checks.py).
_PYTEST_PRIVATE_KEYS: Final = frozenset({"_report_type", "_subtest.context"})

#: Message type names (the ``"t"`` member).
COMMAND_TYPES: Final = frozenset({"run", "ping", "quit", "answer", "go", "collect"})
MESSAGE_TYPES: Final = frozenset(
    {
        "configured",
        "collected",
        "report",
        "warning",
        "error",
        "done",
        "pong",
        "coverage",
        "output",
        "seal",
    }
)


def _category_name(category: type[Warning] | None) -> str:
    if category is None:
        return "builtins.UserWarning"
    return f"{category.__module__}.{category.__qualname__}"


class WorkerPlugin:
    """The pytest plugin that turns the session into a command server."""

    def __init__(
        self,
        channel: HostPipe,
        *,
        entry_points: startup.EntryPointsRead | None = None,
        drop_page_cache: bool = False,
        pause: configured.ReadRecorder | None = None,
    ) -> None:
        self._channel = channel
        #: Stop before collecting (guest/configured.py): what configuring read.
        self._pause = pause
        #: Read before the go (waiting mode): not read again while pytest parses.
        self._entry_points = entry_points
        #: The host snapshots this guest after collection (waiting mode in a guest).
        self._drop_page_cache = drop_page_cache
        self._config: pytest.Config | None = None
        self._collect_errors: list[dict[str, Any]] = []
        self._running: str | None = None
        #: Set when pytest-cov measures the host's session (guest/coverage.py).
        self._coverage = GuestCoverage.from_environment()
        #: Set with -s (guest/live.py); the real sys.stdout until the session starts.
        self._live: live.LiveOutput | None = None
        self._real_stdout: IO[str] | None = None
        #: ``process``-isolated runs (guest/process_runs.py) and the items they name.
        self._process_runs = ProcessRuns(channel.send, self._run_forked)
        self._items: dict[str, pytest.Item] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_main(self, config: pytest.Config) -> Generator[None, object, object]:
        # A worker never distributes or loops: if pytest-xdist is present and
        # the user's addopts ask for ``-n``/``--tx``/``-f``, turn that off
        # before xdist's own (tryfirst) hook reads it.  A wrapper, because
        # wrappers run before every plain implementation; blocking xdist
        # instead would make ``-n`` an unknown option.
        option = config.option
        if hasattr(option, "numprocesses"):
            option.numprocesses = 0  # xdist then sets dist="no", tx=[]
        for name in ("distload", "looponfail"):
            if hasattr(option, name):
                setattr(option, name, False)
        # No debugger either (an ini's addopts may hold --pdb): its stdin is
        # /dev/null, and pdb quitting at EOF would end the worker's session.
        # The host says so up front (sandbox/replay.py: debugger_notice).
        for name in ("usepdb", "trace"):
            if hasattr(option, name):
                setattr(option, name, False)
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_cmdline_parse(self) -> Generator[None, pytest.Config, pytest.Config]:
        # Each -p NAME makes pytest read every distribution's entry points
        # again; while it parses, they are read once (guest/startup.py).
        with startup.distributions_read_once(self._entry_points):
            return (yield)

    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config: pytest.Config) -> None:
        self._config = config
        if config.getoption("capture", "fd") in live.STREAMED_CAPTURE:
            # -s: a run's fds 1 and 2 go to the host live (guest/live.py); the
            # terminal reporter, made after this hook, writes to stderr instead.
            self._live = live.LiveOutput(self._channel.send)
            self._real_stdout, sys.stdout = sys.stdout, live.terminal_file()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self) -> None:
        if self._real_stdout is not None:
            sys.stdout, self._real_stdout = self._real_stdout, None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self) -> None:
        # Configured, the session started, nothing collected: the host may
        # snapshot the worker here (guest/configured.py).
        if self._pause is None:
            return
        recorder, self._pause = self._pause, None
        before = startup.drop_page_cache if self._drop_page_cache else lambda: None
        if not configured.pause(recorder, self._channel.send, self._channel.recv, before):
            pytest.exit("the host ended the session before collection", returncode=0)

    def _showing(self) -> contextlib.ExitStack:
        """What the run shows live on the host: its fds 1 and 2 (``-s``), ``--setup-show``."""
        stack = contextlib.ExitStack()
        if self._live is not None:
            stack.enter_context(self._live.running())
        if self._config is not None and self._config.getoption("setupshow", False):
            stack.enter_context(
                live.terminal_to_host(
                    self._config, self._channel.send, streaming=self._live is not None
                )
            )
        return stack

    def _serialize(self, report: pytest.CollectReport | pytest.TestReport) -> dict[str, Any]:
        assert self._config is not None
        data = self._config.hook.pytest_report_to_serializable(config=self._config, report=report)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k in _PYTEST_PRIVATE_KEYS or k[:1] != "_"}
        jsonable: dict[str, Any] = to_jsonable(data)
        return jsonable

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._collect_errors.append(self._serialize(report))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self._running is None:
            return
        data = self._serialize(report)
        line_len = len(encode_line({"t": "report", "data": data}))
        if line_len > MAX_WORKER_LINE:
            data = shrink(data, SHRINK_STRING_CHARS)
            if len(encode_line({"t": "report", "data": data})) > MAX_WORKER_LINE:
                data["sections"] = []
                data = shrink(data, 64 * 1024)
        self._channel.send({"t": "report", "data": data})

    def pytest_warning_recorded(
        self,
        warning_message: warnings.WarningMessage,
        when: str,
        nodeid: str,
        location: tuple[str, int, str] | None,
    ) -> None:
        if self._running is None or when != "runtest":
            return
        self._channel.send(
            {
                "t": "warning",
                "message": str(warning_message.message),
                "category": _category_name(warning_message.category),
                "nodeid": nodeid,
                "filename": str(warning_message.filename),
                "lineno": int(warning_message.lineno or 0),
            }
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        items: dict[str, pytest.Item] = {}
        for item in session.items:
            items.setdefault(item.nodeid, item)
        collected = {"t": "collected", "nodeids": list(items), "errors": self._collect_errors}
        if len(encode_line(collected)) > MAX_WORKER_LINE:
            collected["errors"] = shrink(self._collect_errors, 64 * 1024)
        if self._drop_page_cache:
            startup.drop_page_cache()  # before the host's snapshot, which follows this line
        self._channel.send(collected)
        while True:
            command = self._channel.recv()
            if command is None or command["t"] == "quit":
                return True
            if command["t"] == "ping":
                self._channel.send({"t": "pong", "nonce": command["nonce"]})
            elif command["t"] == "run":
                self._run(items, command["nodeid"], command["seed"], command.get("env", {}))
            else:
                message = command.get("message") or f"unexpected {command['t']!r} between runs"
                self._channel.send({"t": "error", "message": message})

    def pytest_exception_interact(
        self, node: pytest.Item | pytest.Collector, call: pytest.CallInfo[Any], report: Any
    ) -> None:
        """``--pdb`` on the host: a run's failure gets pdb on the host's terminal."""
        if self._running is not None and isinstance(node, pytest.Item) and debugger.enabled():
            debugger.post_mortem(self._channel, node, call, report)

    def _measuring(self, item: pytest.Item) -> contextlib.AbstractContextManager[None]:
        if self._coverage is None:
            return contextlib.nullcontext()
        return self._coverage.measuring(item, self._channel.send)

    def _run(
        self, items: dict[str, pytest.Item], nodeid: str, seed: int, env: dict[str, str]
    ) -> None:
        """Run one item, here or (``process`` isolation, guest/process_runs.py) in a prepared fork."""
        item = items.get(nodeid)
        env = dict(env)
        mode = env.pop(isolation.ISOLATION_ENV, "vm")
        if item is None:
            self._channel.send({"t": "error", "message": f"not collected in the worker: {nodeid}"})
        elif mode == "process":
            self._items = items
            self._process_runs.run(nodeid, seed, env)  # says done (and settled) itself
            return
        else:
            self._process_runs.abandon()
            os.environ.update(env)
            self._run_item(item, nodeid, seed)
        self._channel.send({"t": "done", "nodeid": nodeid})

    def _run_forked(self, nodeid: str, seed: int, env: dict[str, str]) -> None:
        """In a process-isolated test's process: the item, as a ``vm``-mode run would."""
        if self._live is not None:  # -s: the worker's pump thread is not in this process
            self._live = live.LiveOutput(self._channel.send)
        os.environ.update(env)
        self._run_item(self._items[nodeid], nodeid, seed)

    def _run_item(self, item: pytest.Item, nodeid: str, seed: int) -> None:
        randomly_seed = os.environ.pop(RANDOMLY_SEED_ENV, "")
        if randomly_seed.isdigit() and self._config is not None:
            # pytest-randomly reseeds each phase from this option (sandbox/guest_plugins.py).
            self._config.option.randomly_seed = int(randomly_seed)
        random.seed(seed)
        self._running = nodeid
        try:
            with hostquery.active(self._channel), self._measuring(item), self._showing():
                # The hook (not runtestprotocol directly) so that the wrappers
                # around it take part: warnings capture, unraisable-exception
                # and thread-exception checks, faulthandler_timeout.
                item.ihook.pytest_runtest_protocol(item=item, nextitem=None)
        except Exception:
            self._channel.send(
                {"t": "error", "message": "worker internal error:\n" + traceback.format_exc()}
            )
        finally:
            self._running = None


def _wait_for_go(channel: HostPipe) -> tuple[list[str], startup.EntryPointsRead, bool] | None:
    """Preload, say ``waiting``, apply the ``go``; its arguments, what was read ahead, its pause.

    None: the host went away.
    """
    ahead = startup.preload(os.environ.pop(startup.PRELOAD_ENV, "").split(","))
    channel.send({"t": "waiting"})
    while True:
        command = channel.recv()
        if command is None or command["t"] == "quit":
            return None
        if command["t"] == "go":
            break
        message = command.get("message") or f"expected 'go', got {command['t']!r}"
        channel.send({"t": "error", "message": message})
    started_in = os.getcwd()
    os.chdir(command["cwd"])
    # `python -m` put the folder it started in first on sys.path; a worker
    # started in the run's folder (as before this cache) has that one there,
    # so `-p module_of_the_project` imports as it did.
    if sys.path and sys.path[0] == started_in:
        sys.path[0] = os.getcwd()
    os.environ.update(command.get("env", {}))
    startup.refresh_path()
    startup.forget_shadowed()
    return list(command["argv"]), ahead, bool(command.get("pause", False))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns pytest's exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    channel = HostPipe.take_std_fds()
    # The stack dump must reach the real stderr even while pytest's fd
    # capture has fd 2 redirected to a temporary file during a test.
    dump_file = os.fdopen(os.dup(2), "w", closefd=True)
    faulthandler.register(signal.SIGUSR1, file=dump_file, all_threads=True)
    os.environ[WORKER_ENV] = "1"
    extra = list(_EXTRA_ARGS)
    ahead: startup.EntryPointsRead | None = None
    snapshotted = False
    recorder: configured.ReadRecorder | None = None
    if os.environ.pop(WAIT_ENV, "") == "1":
        go = _wait_for_go(channel)
        if go is None:
            return 0
        go_args, ahead, pause = go
        args += go_args
        extra += startup.rewrite_warning_filters(go_args)
        # In a guest, the host snapshots this worker once it has collected.
        snapshotted = os.environ.get(GUEST_ENV) == "1"
        if pause:
            recorder = configured.ReadRecorder()
            recorder.start()
    plugin = WorkerPlugin(channel, entry_points=ahead, drop_page_cache=snapshotted, pause=recorder)
    exit_code = pytest.main([*args, *extra], plugins=[plugin])
    return int(exit_code)


if __name__ == "__main__":
    sys.exit(main())
