"""Coverage of a sandboxed test, measured in the guest for pytest-cov on the host.

When pytest-cov measures the host's session, the host starts the test
worker with :data:`CONFIG_ENV` holding its coverage settings as JSON
(``sandbox/coverage.py``). The worker then measures each item's run
(setup, call and teardown) with a fresh ``coverage.Coverage`` that writes
no file, and sends what it measured back as ``coverage`` messages before
``done``::

    {"t": "coverage", "nodeid": str, "arcs": bool,
     "files": {path: [int, ...]}}       line numbers, or arcs flattened as a, b, a, b ...
    {"t": "coverage", "nodeid": str, "error": str}
                                         coverage could not be measured (not importable)

A run's data is split over as many messages as it takes to keep each
under :data:`MAX_MESSAGE_VALUES` numbers. Without :data:`CONFIG_ENV`
(pytest-cov not active on the host) nothing here runs and ``coverage`` is
never imported. Standard library and pytest only; ``coverage`` is imported
lazily, from the guest's environment (the host's, carried in).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import pytest

__all__ = ["CONFIG_ENV", "MAX_MESSAGE_VALUES", "CoverageConfig", "GuestCoverage"]

#: The worker's environment variable holding the host's coverage settings.
CONFIG_ENV: Final = "GONDOLIN_COVERAGE"
#: Most numbers in one coverage message: well under the host's per-line
#: limit of JSON values (200k) and bytes (4 MiB, ~8 bytes a number).
MAX_MESSAGE_VALUES: Final = 100_000

Send = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CoverageConfig:
    """pytest-cov's settings on the host: what ``coverage.Coverage`` gets in the guest."""

    source: tuple[str, ...] | None
    branch: bool | None
    config_file: str | bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": None if self.source is None else list(self.source),
                "branch": self.branch,
                "config_file": self.config_file,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CoverageConfig:
        """Parse :meth:`to_json`'s output; ``ValueError`` for anything else."""
        data = json.loads(text)
        source, branch, config_file = data["source"], data["branch"], data["config_file"]
        if source is not None and not (
            isinstance(source, list) and all(isinstance(s, str) for s in source)
        ):
            raise ValueError(f"source must be a list of strings, got {source!r}")
        if branch is not None and not isinstance(branch, bool):
            raise ValueError(f"branch must be a boolean, got {branch!r}")
        if not isinstance(config_file, str | bool):
            raise ValueError(f"config_file must be a string or boolean, got {config_file!r}")
        return cls(None if source is None else tuple(source), branch, config_file)


def _skips(item: pytest.Item) -> bool:
    """pytest-cov's ``no_cover`` marker or fixture: the item is not measured."""
    return item.get_closest_marker("no_cover") is not None or "no_cover" in getattr(
        item, "fixturenames", ()
    )


class GuestCoverage:
    """Measures each run in the worker and sends the data to the host.

    Made when the worker starts, before the host snapshots it: ``coverage``
    is imported and its measurement set up once, so a run restored from the
    snapshot pays only for measuring (importing and setting up per run cost
    ~10 s a test, measured under TCG on a loaded 2-core host). Every run
    starts from that snapshot with no data; in a worker that is not restored
    between runs (a local one) the data is erased before the next run.
    """

    def __init__(self, config: CoverageConfig) -> None:
        self.config = config
        self._cov: Any = None
        #: Runs measured by this process since the snapshot (0 in every restored guest).
        self._runs = 0
        #: Why coverage cannot be measured here (sent with every run), or None.
        self.error: str | None = None
        try:
            self._cov = self._prepare()
        except Exception as exc:  # ImportError, or a bad config: every run says so
            self.error = f"{type(exc).__name__}: {exc}"[:2000]

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> GuestCoverage | None:
        """The measurer the host asked for (taking :data:`CONFIG_ENV` out of the
        environment, so tests do not see it); ``None`` when it asked for none."""
        env = os.environ if environ is None else environ
        text = env.pop(CONFIG_ENV, None)
        if text is None:
            return None
        return cls(CoverageConfig.from_json(text))

    @contextlib.contextmanager
    def measuring(self, item: pytest.Item, send: Send) -> Generator[None, None, None]:
        """Measure the block (one item's run) and send its data; never raises for coverage."""
        if _skips(item):
            yield
            return
        cov = self._cov
        if cov is None or self.error is not None:
            send({"t": "coverage", "nodeid": item.nodeid, "error": self.error or "no coverage"})
            yield
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self._runs:
                    # Not restored since the last run (a local worker): start empty.
                    cov.get_data().erase()
                self._runs += 1
                cov.start()
        except Exception as exc:  # the test's result matters more than its coverage
            send({"t": "coverage", "nodeid": item.nodeid, "error": f"{type(exc).__name__}: {exc}"})
            yield
            return
        try:
            yield
        finally:
            self._send(cov, item.nodeid, send)

    def _prepare(self) -> Any:
        """A ``coverage.Coverage`` with the host's settings, set up and stopped, no data."""
        import coverage  # lazily: only when pytest-cov is active on the host

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cov = coverage.Coverage(
                data_file=None,
                source=None if self.config.source is None else list(self.config.source),
                branch=self.config.branch,
                config_file=self.config.config_file,
            )
            # What the host reports on: whole-session warnings are its business.
            cov._warn_no_data = False
            cov._warn_unimported_source = False
            cov._warn_preimported_source = False
            # Starting sets up the collector and the file filters, once (Coverage.erase
            # would undo that); nothing runs in between, so no data is recorded.
            # Reading the (empty) data creates its in-memory database: ~9 ms a run
            # on the host (far more under TCG), paid here once instead.
            cov.start()
            cov.stop()
            cov.get_data().measured_files()
        return cov

    def _send(self, cov: Any, nodeid: str, send: Send) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cov.stop()
                data = cov.get_data()
                arcs = bool(data.has_arcs())
                files: dict[str, list[int]] = {}
                for path in sorted(data.measured_files()):
                    numbers = _flat(data.arcs(path) if arcs else data.lines(path))
                    if numbers:
                        files[path] = numbers
        except Exception as exc:  # the test's result matters more than its coverage
            send({"t": "coverage", "nodeid": nodeid, "error": f"{type(exc).__name__}: {exc}"})
            return
        for chunk in _chunks(files):
            send({"t": "coverage", "nodeid": nodeid, "arcs": arcs, "files": chunk})


def _flat(values: Any) -> list[int]:
    """Line numbers as they are; arcs ``(a, b)`` flattened to ``a, b``."""
    out: list[int] = []
    for value in values or ():
        if isinstance(value, tuple):
            out.extend(value)
        else:
            out.append(value)
    return out


def _chunks(files: Mapping[str, list[int]]) -> Generator[dict[str, list[int]], None, None]:
    """``files`` in pieces of at most MAX_MESSAGE_VALUES numbers (a larger file is split)."""
    chunk: dict[str, list[int]] = {}
    size = 0
    for path, numbers in files.items():
        step = MAX_MESSAGE_VALUES - MAX_MESSAGE_VALUES % 2  # keeps arc pairs whole
        for start in range(0, len(numbers), step):
            part = numbers[start : start + step]
            if size + len(part) > MAX_MESSAGE_VALUES and chunk:
                yield chunk
                chunk, size = {}, 0
            chunk.setdefault(path, []).extend(part)
            size += len(part)
    if chunk:
        yield chunk
