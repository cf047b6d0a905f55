"""The pure parts of the cached guest worker: tree digests, keys, the go, state read from the guest."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gondolin.errors import VMError
from pytest_gondolin.guest import startup
from pytest_gondolin.guest.hostpath import HOST_PATH_ENV, SITE
from pytest_gondolin.guest.worker import parse_command
from pytest_gondolin.sandbox import worker_cache
from tests.fake_distributions import install_plugin_distribution


def _tar(files: dict[str, tuple[bytes, int, float]]) -> bytes:
    """A tar of ``name -> (content, mode, mtime)``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode, mtime) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE = {"p/test_x.py": (b"assert 1\n", 0o644, 1000.0)}


@pytest.mark.parametrize(
    ("other", "same"),
    [
        ({"p/test_x.py": (b"assert 1\n", 0o644, 2000.0)}, True),  # only the mtime
        ({"p/test_x.py": (b"assert 2\n", 0o644, 1000.0)}, False),  # same size, other bytes
        ({"p/test_x.py": (b"assert 1\n", 0o755, 1000.0)}, False),  # mode
        ({"p/test_y.py": (b"assert 1\n", 0o644, 1000.0)}, False),  # name
        ({**BASE, "p/conftest.py": (b"", 0o644, 1000.0)}, False),  # a new empty file
    ],
)
def test_tree_digest_is_content_not_times(
    other: dict[str, tuple[bytes, int, float]], same: bool
) -> None:
    assert (
        worker_cache.tree_digest([_tar(BASE)]) == worker_cache.tree_digest([_tar(other)])
    ) is same


def test_tree_digest_keeps_tars_apart() -> None:
    a, b = _tar({"x": (b"1", 0o644, 0.0)}), _tar({"y": (b"2", 0o644, 0.0)})
    assert worker_cache.tree_digest([a, b]) != worker_cache.tree_digest([b, a])


def test_collected_key_covers_stack_tree_and_go() -> None:
    go = {"argv": ["-v"], "cwd": "/p", "env": {}}
    key = worker_cache.collected_key("s", "t", go)
    assert key == worker_cache.collected_key("s", "t", dict(go))
    assert key != worker_cache.collected_key("s2", "t", go)
    assert key != worker_cache.collected_key("s", "t2", go)
    assert key != worker_cache.collected_key("s", "t", {**go, "argv": ["-vv"]})
    assert key != worker_cache.collected_key("s", "t", {**go, "env": {"COV": "1"}})


def test_the_started_worker_key_covers_argv_env_and_files() -> None:
    def key(argv: list[str], env: dict[str, str], files: bytes = b"") -> str:
        return worker_cache.StartedWorker(argv, env, 1, files=files).key

    base = key(["python3"], {"A": "1"})
    assert base == key(["python3"], {"A": "1"})
    assert base != key(["python3", "-s"], {"A": "1"})
    assert base != key(["python3"], {"A": "2"})
    assert base != key(["python3"], {"A": "1"}, _tar(BASE))


def test_plugins_to_preload() -> None:
    args = ["--rootdir=/p", "-p", "xdist.plugin", "-p", "no:cacheprovider", "-p", "gondolin", "-v"]
    assert startup.plugins_to_preload(args) == ["xdist.plugin", "gondolin"]
    assert startup.plugins_to_preload(["-p"]) == []


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ({"t": "go", "argv": ["-v"], "cwd": "/p", "env": {"A": "1"}}, None),
        ({"t": "go", "argv": ["-v"], "cwd": "/p"}, None),
        ({"t": "go", "argv": "-v", "cwd": "/p"}, "argv"),
        ({"t": "go", "argv": [1], "cwd": "/p"}, "argv"),
        ({"t": "go", "argv": ["a\0b"], "cwd": "/p"}, "argv"),
        ({"t": "go", "argv": [], "cwd": "p"}, "absolute cwd, got 'p'"),
        ({"t": "go", "argv": [], "cwd": None}, "absolute cwd"),
        ({"t": "go", "argv": [], "cwd": "/p", "env": {"A=B": "1"}}, "env"),
        ({"t": "go", "argv": [], "cwd": "/p", "env": {"A": 1}}, "env"),
    ],
)
def test_go_commands_are_checked(command: dict[str, object], problem: str | None) -> None:
    parsed = parse_command(json.dumps(command).encode() + b"\n")
    if problem is None:
        assert parsed == command
    else:
        assert parsed["t"] == "invalid" and problem in parsed["message"]


class _Guest:
    """A guest whose state file holds ``data`` (what a hostile guest could leave there)."""

    name = "vm9"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_file(self, path: str, *, max_size: int) -> bytes:
        assert path == worker_cache.STATE_FILE
        if len(self.data) > max_size:
            raise OSError(27, "File too large")
        return self.data


def _read(data: bytes) -> tuple[int, int, object]:
    return worker_cache.read_state(_Guest(data), ["python3"])  # type: ignore[arg-type]


def test_state_read_back() -> None:
    collected = '{"t":"collected","nodeids":["test_x.py::test_one"],"errors":[]}\n'
    req_id, pid, got = _read(json.dumps({"id": 7, "pid": 42, "collected": collected}).encode())
    assert (req_id, pid) == (7, 42)
    assert got is not None and got.nodeids == ("test_x.py::test_one",)  # type: ignore[attr-defined]
    assert _read(b'{"id": 7, "pid": 42}')[2] is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"not json", "no usable worker state"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": true, "pid": 42}', "id=True"),
        (b'{"id": 7, "pid": -1}', "pid=-1"),
        (b'{"id": 7, "pid": 42.0}', "pid=42.0"),
        (b'{"id": 4294967296, "pid": 42}', "id=4294967296"),
        (b'{"id": 7, "pid": 42, "collected": 5}', "'collected' is not a string"),
        (
            b'{"id": 7, "pid": 42, "collected": "{\\"t\\":\\"pong\\",\\"nonce\\":\\"x\\"}\\n"}',
            "holds a",
        ),
        (b'{"id": 7, "pid": 42, "collected": "{]\\n"}', "bad collected line"),
        (b"x" * (worker_cache.MAX_STATE_BYTES + 1), "no usable worker state"),
    ],
)
def test_hostile_state_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(VMError, match="vm9") as info:
        _read(data)
    assert problem in str(info.value)


def test_refresh_path_adds_pth_folders_that_appeared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, src = tmp_path / "site", tmp_path / "src"
    site.mkdir()
    (site / "editable.pth").write_text(f"# comment\nimport os\n{src}\n{tmp_path / 'missing'}\n")
    monkeypatch.setattr(sys, "path", ["/stdlib", str(site), "/other"])
    monkeypatch.setenv(HOST_PATH_ENV, json.dumps([[SITE, str(site)]]))
    monkeypatch.setitem(sys.path_importer_cache, str(src), None)
    src.mkdir()  # copied in after start-up
    startup.refresh_path()
    assert sys.path == ["/stdlib", str(site), str(src), "/other"]
    assert str(src) not in sys.path_importer_cache  # the "nothing here" verdict is gone
    startup.refresh_path()  # idempotent
    assert sys.path == ["/stdlib", str(site), str(src), "/other"]


def test_preload_imports_and_the_rewrite_warning_is_silenced_for_those_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "gondolin_fake_dep.py").write_text("VALUE = 1\n")
    (tmp_path / "gondolin_fake_plugin.py").write_text("import gondolin_fake_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("gondolin_fake_dep", "gondolin_fake_plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    startup.preload(["gondolin_fake_plugin", "gondolin_missing_plugin", ""])
    assert "gondolin_fake_plugin" in sys.modules and "gondolin_fake_dep" in sys.modules
    assert "gondolin_missing_plugin" not in sys.modules
    args = [
        "-p",
        "gondolin_fake_dep",
        "-p",
        "gondolin_fake_plugin",
        "-p",
        "gondolin_missing_plugin",
    ]
    filters = startup.rewrite_warning_filters(args)
    assert filters == [
        "-W",
        "ignore:Module already imported so cannot be rewritten; gondolin_fake_dep$"
        ":pytest.PytestAssertRewriteWarning",
        "-W",
        "ignore:Module already imported so cannot be rewritten; gondolin_fake_plugin$"
        ":pytest.PytestAssertRewriteWarning",
    ]
    for name in ("gondolin_fake_dep", "gondolin_fake_plugin"):
        del sys.modules[name]


def test_preload_modules_follow_entry_points() -> None:
    args = ["-p", "gondolin", "-p", "no:cacheprovider", "-p", "some_module", "-p", "xdist.plugin"]
    modules = worker_cache.preload_modules(args)
    assert modules == ["some_module", "xdist.plugin"]  # gondolin: the guest's own plugin


@pytest.fixture
def two_plugin_distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin_distribution(
        site, "gondolin-fake-one", "[pytest11]\nfake_one = gondolin_fake_one\n"
    )
    install_plugin_distribution(
        site, "gondolin-fake-two", "[pytest11]\nfake_two = gondolin_fake_two\n"
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in ("gondolin_fake_one", "gondolin_fake_two", "gondolin_fake_three"):
        sys.modules.pop(name, None)


def test_distributions_are_read_once_while_pytest_parses(two_plugin_distributions: Path) -> None:
    """Each -p NAME looks NAME up among every distribution's entry points: read once, found the same."""
    from _pytest.config import PytestPluginManager

    site = two_plugin_distributions
    pm = PytestPluginManager()
    with startup.distributions_read_once():
        pm.consider_pluginarg("fake_one")
        # Written after the first lookup: not seen until the next read.
        (site / "gondolin_fake_two-1.0.dist-info" / "entry_points.txt").write_text(
            "[pytest11]\nfake_two = gondolin_fake_two\nfake_three = gondolin_fake_three\n"
        )
        (site / "gondolin_fake_three.py").write_text("")
        assert pm.load_setuptools_entrypoints("pytest11", name="fake_three") == 0
        pm.consider_pluginarg("fake_two")
    names = {dist.project_name: plugin for plugin, dist in pm.list_plugin_distinfo()}
    assert names == {
        "gondolin-fake-one": sys.modules["gondolin_fake_one"],
        "gondolin-fake-two": sys.modules["gondolin_fake_two"],
    }
    assert pm.get_plugin("fake_one") is sys.modules["gondolin_fake_one"]
    assert pm.get_plugin("fake_two") is sys.modules["gondolin_fake_two"]
    # Outside, the distributions are read again.
    assert pm.load_setuptools_entrypoints("pytest11", name="fake_three") == 1


def test_distributions_read_once_is_undone_and_passes_queries_through(
    two_plugin_distributions: Path,
) -> None:
    import importlib.metadata

    original = importlib.metadata.distributions
    with startup.distributions_read_once():
        first = list(importlib.metadata.distributions())
        assert [id(d) for d in importlib.metadata.distributions()] == [id(d) for d in first]
        mine = [d for d in first if d.metadata["Name"] == "gondolin-fake-one"]
        assert len(mine) == 1 and mine[0].version == "1.0"
        assert [ep.value for ep in mine[0].entry_points] == ["gondolin_fake_one"]
        # A PathDistribution's own attribute (some plugins read it): still there.
        path = getattr(mine[0], "_path")  # noqa: B009 (private, not in the type stubs)
        assert path == two_plugin_distributions / "gondolin_fake_one-1.0.dist-info"
        # A query by name is pytest's or a plugin's own: passed through, read now.
        (named,) = importlib.metadata.distributions(name="gondolin-fake-two")
        assert named not in first
    assert importlib.metadata.distributions is original


def test_a_waiting_worker_loads_its_p_plugins_with_their_distributions(tmp_path: Path) -> None:
    """A real worker process: -p by entry-point name, required_plugins satisfied, no header."""
    import os
    import subprocess

    from pytest_gondolin.guest.worker import WAIT_ENV, WAITING_LINE, encode_line

    (tmp_path / "test_x.py").write_text("def test_one(mocker):\n    assert mocker\n")
    env = {**os.environ, WAIT_ENV: "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    go = {
        "t": "go",
        "argv": [
            "-c",
            os.devnull,
            f"--rootdir={tmp_path}",
            "-o",
            "required_plugins=pytest-mock",
            "-p",
            "pytest_mock",
            str(tmp_path / "test_x.py"),
        ],
        "cwd": str(tmp_path),
        "env": {},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_gondolin.guest.worker"],
        input=encode_line(go) + encode_line({"t": "quit"}),
        capture_output=True,
        env=env,
        timeout=120,
        cwd="/",
    )
    lines = proc.stdout.splitlines(keepends=True)
    assert lines[:1] == [WAITING_LINE], proc.stderr.decode()[-2000:]
    collected = json.loads(lines[1])
    assert collected == {"t": "collected", "nodeids": ["test_x.py::test_one"], "errors": []}, (
        proc.stderr.decode()[-2000:]
    )
    assert b"rootdir:" not in proc.stderr  # --no-header: the guest's terminal shows none
