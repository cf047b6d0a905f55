"""What a waiting guest worker does before its go, and that pytest behaves as if it had not.

``guest/startup.py``: the distributions' entry points read ahead (and read
again when a distribution changed), the modules imported ahead (and
forgotten when the project shadows one), the page cache dropped before
``collected``; ``worker_cache.write_state`` as one agent write.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.guest import startup, worker
from pytest_gondolin.sandbox import worker_cache
from tests.fake_distributions import install_plugin_distribution


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "site"
    folder.mkdir()
    install_plugin_distribution(
        folder, "gondolin-ahead-one", "[pytest11]\nahead_one = gondolin_ahead_one\n"
    )
    install_plugin_distribution(
        folder, "gondolin-ahead-two", "[pytest11]\nahead_two = gondolin_ahead_two\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in ("gondolin_ahead_one", "gondolin_ahead_two", "gondolin_ahead_three"):
        sys.modules.pop(name, None)


@pytest.fixture
def entry_point_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The metadata folders whose ``entry_points.txt`` is read from now on."""
    reads: list[str] = []
    original = importlib.metadata.PathDistribution.read_text

    def read_text(self: importlib.metadata.PathDistribution, filename: str) -> str | None:
        if filename == "entry_points.txt":
            reads.append(str(getattr(self, "_path")))  # noqa: B009 (private attribute)
        return original(self, filename)

    monkeypatch.setattr(importlib.metadata.PathDistribution, "read_text", read_text)
    return reads


def _ours(reads: list[str]) -> list[str]:
    return sorted(Path(r).name for r in reads if "gondolin_ahead" in r)


def test_entry_points_read_ahead_are_not_read_again_while_pytest_parses(
    site: Path, entry_point_reads: list[str]
) -> None:
    from _pytest.config import PytestPluginManager

    ahead = startup.EntryPointsRead.now()
    assert _ours(entry_point_reads) == [
        "gondolin_ahead_one-1.0.dist-info",
        "gondolin_ahead_two-1.0.dist-info",
    ]
    entry_point_reads.clear()
    pm = PytestPluginManager()
    with startup.distributions_read_once(ahead):
        pm.consider_pluginarg("ahead_one")
        pm.consider_pluginarg("ahead_two")
    assert _ours(entry_point_reads) == []  # every one remembered
    assert pm.get_plugin("ahead_one") is sys.modules["gondolin_ahead_one"]
    names = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert names == {"gondolin-ahead-one", "gondolin-ahead-two"}


def test_a_distribution_changed_or_added_after_is_read_anew(
    site: Path, entry_point_reads: list[str]
) -> None:
    from _pytest.config import PytestPluginManager

    ahead = startup.EntryPointsRead.now()
    # Reinstalled with another entry point: its folder is not the same one.
    info = site / "gondolin_ahead_two-1.0.dist-info"
    (info / "entry_points.txt").write_text("[pytest11]\nahead_three = gondolin_ahead_three\n")
    stat = info.stat()
    os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (site / "gondolin_ahead_three.py").write_text("")
    # Installed after (as the project's own metadata is copied after the go).
    install_plugin_distribution(
        site, "gondolin-ahead-four", "[pytest11]\nahead_four = gondolin_ahead_four\n"
    )
    entry_point_reads.clear()
    pm = PytestPluginManager()
    with startup.distributions_read_once(ahead):
        assert pm.load_setuptools_entrypoints("pytest11", name="ahead_two") == 0
        assert pm.load_setuptools_entrypoints("pytest11", name="ahead_three") == 1
        assert pm.load_setuptools_entrypoints("pytest11", name="ahead_four") == 1
    assert _ours(entry_point_reads) == [
        "gondolin_ahead_four-1.0.dist-info",
        "gondolin_ahead_two-1.0.dist-info",
    ]
    sys.modules.pop("gondolin_ahead_four", None)


def test_drop_page_cache_writes_1_and_ignores_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = tmp_path / "drop_caches"
    monkeypatch.setattr(startup, "DROP_CACHES", str(control))
    startup.drop_page_cache()
    assert control.read_text() == "1"
    monkeypatch.setattr(startup, "DROP_CACHES", str(tmp_path / "missing" / "drop_caches"))
    startup.drop_page_cache()  # no /proc (or not root): nothing raised


class _Channel:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def send(self, message: dict[str, Any]) -> None:
        self.events.append(message["t"])

    def recv(self) -> dict[str, Any] | None:
        return None


class _Session:
    def __init__(self) -> None:
        self.items: list[object] = []


@pytest.mark.parametrize("drop", [True, False])
def test_the_page_cache_is_dropped_before_the_collected_line(
    drop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(startup, "drop_page_cache", lambda: events.append("dropped"))
    plugin = worker.WorkerPlugin(_Channel(events), drop_page_cache=drop)  # type: ignore[arg-type]
    plugin.pytest_runtestloop(_Session())  # type: ignore[arg-type]
    assert events == (["dropped", "collected"] if drop else ["collected"])


class _VM:
    name = "vm7"

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.writes: list[tuple[str, bytes, int]] = []

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self.calls.append(("write_file", path))
        self.writes.append((path, data, mode))

    def exec(self, *args: object, **kwargs: object) -> None:
        self.calls.append(("exec", args))


class _Call:
    id = 11


class _Proc:
    call = _Call()
    pid = 123


def test_write_state_is_one_agent_write_readable_back() -> None:
    from pytest_gondolin.sandbox.messages import Collected

    vm = _VM()
    collected = Collected(nodeids=("test_x.py::test_one",), errors=())
    worker_cache.write_state(vm, _Proc(), collected)  # type: ignore[arg-type]
    assert [kind for kind, _ in vm.calls] == ["write_file"]  # no shell: no exec at all
    path, data, mode = vm.writes[0]
    assert (path, mode) == (worker_cache.STATE_FILE, 0o600)
    state = json.loads(data)
    assert (state["id"], state["pid"]) == (11, 123)

    class Guest:
        name = "vm7"

        def read_file(self, path: str, *, max_size: int) -> bytes:
            return bytes(data)

    req_id, pid, back = worker_cache.read_state(Guest(), ["python3"])  # type: ignore[arg-type]
    assert (req_id, pid) == (11, 123)
    assert back is not None and back.nodeids == ("test_x.py::test_one",)


# -- a real waiting worker process (on this host: no page cache is dropped here) --------


def _run_worker(
    project: Path, argv: list[str], nodeid: str, *, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Start a waiting worker, send its go and one run; the messages it sent back."""
    full_env = {**os.environ, worker.WAIT_ENV: "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **env}
    full_env.pop("PYTEST_ADDOPTS", None)
    full_env.pop(worker.GUEST_ENV, None)
    go: dict[str, object] = {
        "t": "go",
        "argv": ["-c", os.devnull, f"--rootdir={project}", *argv],
        "cwd": str(project),
        "env": {},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_gondolin.guest.worker"],
        input=b"".join(
            worker.encode_line(m)
            for m in (go, {"t": "run", "nodeid": nodeid, "seed": 1}, {"t": "quit"})
        ),
        capture_output=True,
        env=full_env,
        timeout=120,
        cwd="/",
    )
    lines = proc.stdout.splitlines(keepends=True)
    assert lines[:1] == [worker.WAITING_LINE], proc.stderr.decode()[-2000:]
    return [json.loads(line) for line in lines[1:]]


def _call_outcome(messages: list[dict[str, Any]]) -> tuple[str, str]:
    for message in messages:
        data = message.get("data", {})
        if message["t"] == "report" and data.get("when") == "call":
            return data["outcome"], json.dumps(data.get("longrepr"))[:2000]
    raise AssertionError(f"no call report in {messages}")


def test_a_preloaded_entry_point_plugin_is_still_blocked_by_p_no(site: Path) -> None:
    project = site.parent / "project"
    project.mkdir()
    (project / "test_x.py").write_text(
        "def test_blocked(pytestconfig):\n"
        "    assert not pytestconfig.pluginmanager.has_plugin('ahead_one')\n"
        "    assert pytestconfig.pluginmanager.has_plugin('ahead_two')\n"
    )
    env = {
        startup.PRELOAD_ENV: "gondolin_ahead_one,gondolin_ahead_two",
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path]),
    }
    argv = ["-p", "no:ahead_one", "-p", "ahead_two", "test_x.py"]
    messages = _run_worker(project, argv, "test_x.py::test_blocked", env=env)
    assert messages[0] == {"t": "collected", "nodeids": ["test_x.py::test_blocked"], "errors": []}
    assert _call_outcome(messages)[0] == "passed", _call_outcome(messages)[1]


def test_a_projects_own_module_named_like_a_preloaded_one_is_the_projects(
    tmp_path: Path,
) -> None:
    (tmp_path / "readline.py").write_text("OURS = True\n")
    (tmp_path / "test_x.py").write_text(
        "def test_ours():\n    import readline\n    assert getattr(readline, 'OURS', False)\n"
    )
    messages = _run_worker(tmp_path, ["test_x.py"], "test_x.py::test_ours", env={})
    assert _call_outcome(messages)[0] == "passed", _call_outcome(messages)[1]


def test_forget_shadowed_keeps_what_nothing_shadows() -> None:
    import readline  # noqa: F401 (imported ahead, as a waiting worker does)

    assert startup.forget_shadowed() == []
    assert "readline" in sys.modules
