"""Test-only routing plugin: items marked ``remote_local`` run in a local worker.

Load it with ``-p tests.plugin._local_worker``.  It does on a plain host
subprocess what ``pytest_gondolin.sandbox.session`` does with a VM: items carrying the
``remote_local`` marker are sent to one :class:`WorkerClient` over a
:class:`SubprocessTransport` (started on first use, restarted after a crash
or timeout) and their reports are replayed with :func:`replay_item`.

In the worker itself (``PYTEST_GONDOLIN_WORKER=1``, where the forwarded
``-p`` loads this module again) it only registers the marker.

Options: ``--local-worker-timeout=SECONDS`` (per item; the marker's
``timeout=`` wins) and ``--local-worker-off`` (run marked items in-process,
for comparing the two).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest

from pytest_gondolin.errors import GondolinError
from pytest_gondolin.guest.worker import WORKER_ENV
from pytest_gondolin.sandbox.arguments import worker_args
from pytest_gondolin.sandbox.client import WorkerClient, WorkerState
from pytest_gondolin.sandbox.outcome import Failure
from pytest_gondolin.sandbox.replay import replay_collect_errors, replay_item
from pytest_gondolin.sandbox.transports import SubprocessTransport, worker_command

MARKER = "remote_local"
#: Importing pytest and collecting a handful of files takes ~0.5 s here.
START_TIMEOUT = 60.0
#: Default per-item bound; tests that exercise timeouts pass a small one.
DEFAULT_TIMEOUT = 60.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("local-worker", "test-only local worker routing")
    group.addoption("--local-worker-timeout", type=float, default=DEFAULT_TIMEOUT)
    group.addoption("--local-worker-off", action="store_true", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(timeout=None): run this test in a local pytest-gondolin worker"
    )
    if os.environ.get(WORKER_ENV) != "1" and not config.getoption("local_worker_off"):
        config.pluginmanager.register(LocalRouter(config), "local-worker-router")


class LocalRouter:
    """Routes marked items to a worker subprocess and replays their reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.client: WorkerClient | None = None
        self.starts = 0
        self.seen_collect_errors: set[str] = set()
        self._tmp = Path(tempfile.mkdtemp(prefix="gondolin-local-worker-"))

    def _start(self, session: pytest.Session) -> WorkerClient | Failure:
        if self.client is not None and self.client.state is WorkerState.READY:
            return self.client
        files = sorted(
            {str(item.path) for item in session.items if item.get_closest_marker(MARKER)}
        )
        self.starts += 1
        # The worker clears its basetemp; never let it share the host's.
        args = [*worker_args(self.config), f"--basetemp={self._tmp / str(self.starts)}", *files]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        try:
            transport = SubprocessTransport(
                worker_command(args), cwd=self.config.invocation_params.dir, env=env
            )
        except GondolinError as exc:
            return Failure.from_exception(exc)
        client = WorkerClient(transport)
        try:
            collected = client.start(START_TIMEOUT)
        except GondolinError as exc:
            client.close()
            return Failure.from_exception(exc)
        replay_collect_errors(self.config, collected, self.seen_collect_errors)
        self.client = client
        return client

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        marker = item.get_closest_marker(MARKER)
        if marker is None:
            return None
        timeout = float(
            marker.kwargs.get("timeout") or self.config.getoption("local_worker_timeout")
        )
        client = self._start(item.session)
        if isinstance(client, Failure):
            replay_item(item, client)
            return True
        try:
            outcome = client.run(
                item.nodeid, seed=zlib.crc32(item.nodeid.encode()), timeout=timeout
            )
        except GondolinError as exc:
            replay_item(item, Failure.from_exception(exc))
        else:
            replay_item(item, outcome)
        if client.state is not WorkerState.READY:
            client.close()
            self.client = None
        return True

    def pytest_unconfigure(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        shutil.rmtree(self._tmp, ignore_errors=True)
