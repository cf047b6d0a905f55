"""The configured worker's record and its line (``sandbox/configured.py``, ``guest/configured.py``).

The record decides whether a later tree may start from a configured snapshot:
an edit of a file configuration read, or any file added or removed, must
refuse it; an edit of anything else must not. The record and the
``configured`` line come from the guest's side: hostile shapes are refused,
never trusted. The client passes ``configured`` to the host's callback and
tells the worker to collect (a scripted worker: ``tests/unit/sandbox/_wire.py``).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import pytest

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox import configured, worker_cache
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.messages import MAX_CONFIGURED_READS, Configured, parse_message
from tests.tars import tar_of
from tests.unit.sandbox._wire import COLLECTED, FakeTransport, line

TREE = {
    "proj/conftest.py": b"import helper\n",
    "proj/helper.py": b"VALUE = 1\n",
    "proj/test_x.py": b"def test(): pass\n",
}
READ = ["/proj/conftest.py", "/proj/helper.py", "/usr/lib/python3.11/os.py", "/proj/absent.txt"]


def _files(**changes: bytes) -> dict[str, str]:
    return configured.tree_files([tar_of({**TREE, **{f"proj/{k}": v for k, v in changes.items()}})])


def test_tree_files_name_every_member_by_its_guest_path() -> None:
    files = configured.tree_files([tar_of(TREE)])
    assert sorted(files) == ["/proj/conftest.py", "/proj/helper.py", "/proj/test_x.py"]
    assert files != _files(test_x=b"def test(): assert 0\n")


def test_the_record_keeps_only_project_files_that_were_read() -> None:
    record = configured.Record.made(_files(), READ)
    assert sorted(record.read) == ["/proj/conftest.py", "/proj/helper.py"]
    assert record.holds_for(_files())


@pytest.mark.parametrize(
    ("tree", "holds"),
    [
        pytest.param(_files(), True, id="unchanged"),
        pytest.param(_files(**{"test_x.py": b"def test(): assert 0\n"}), True, id="test-edited"),
        pytest.param(_files(**{"helper.py": b"VALUE = 2\n"}), False, id="read-file-edited"),
        pytest.param(_files(**{"conftest.py": b"import helper \n"}), False, id="conftest-edited"),
        pytest.param(_files(**{"new.py": b""}), False, id="file-added"),
        pytest.param(_files(**{"absent.txt": b"now here"}), False, id="read-file-appears"),
    ],
)
def test_the_record_holds_only_for_the_same_configuration_input(
    tree: dict[str, str], holds: bool
) -> None:
    assert configured.Record.made(_files(), READ).holds_for(tree) is holds


def test_a_file_removed_refuses_the_record() -> None:
    fewer = configured.tree_files([tar_of({k: v for k, v in TREE.items() if "test_x" not in k})])
    assert not configured.Record.made(_files(), READ).holds_for(fewer)


def test_a_name_that_changed_type_refuses_the_record() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in TREE.items():
            if "test_x" in name:
                folder = tarfile.TarInfo(name)
                folder.type = tarfile.DIRTYPE
                tar.addfile(folder)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    now_a_folder = configured.tree_files([buffer.getvalue()])
    assert sorted(now_a_folder) == sorted(_files())
    assert not configured.Record.made(_files(), READ).holds_for(now_a_folder)


def test_the_record_round_trips_through_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    configured.record_path("k").parent.mkdir(parents=True)
    record = configured.Record.made(_files(), READ)
    configured.store("old", record)
    assert configured.load("old") == record
    configured.move("old", "new")
    assert configured.load("old") is None and configured.load("new") == record
    configured.forget("new")
    assert configured.load("new") is None
    assert list(configured.record_path("k").parent.iterdir()) == []  # no temporary file left


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[" * 5000 + b"]" * 5000,
        b"[]",
        json.dumps({"format": "configured 0", "names": "x", "read": {}}).encode(),
        json.dumps({"format": configured.RECORD_FORMAT, "names": 1, "read": {}}).encode(),
        json.dumps({"format": configured.RECORD_FORMAT, "names": "x", "read": []}).encode(),
        json.dumps({"format": configured.RECORD_FORMAT, "names": "x", "read": {"/a": 1}}).encode(),
        json.dumps(
            {
                "format": configured.RECORD_FORMAT,
                "names": "x",
                "read": {f"/{i}": "d" for i in range(MAX_CONFIGURED_READS + 1)},
            }
        ).encode(),
    ],
    ids=["text", "deep", "list", "format", "names", "read-list", "digest", "too-many"],
)
def test_a_damaged_or_foreign_record_is_not_used(raw: bytes) -> None:
    assert configured.Record.from_json(raw) is None


def test_an_oversized_record_file_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    path = configured.record_path("big")
    path.parent.mkdir(parents=True)
    path.write_bytes(b" " * (configured.MAX_RECORD_BYTES + 1))
    assert configured.load("big") is None


def test_the_configured_line_is_parsed_and_checked() -> None:
    assert parse_message(line({"t": "configured", "read": ["/a", "/b"]})) == Configured(
        ("/a", "/b")
    )
    assert parse_message(line({"t": "configured", "read": None})) == Configured(None)


@pytest.mark.parametrize(
    "read",
    [
        "/a",
        ["relative/path"],
        [1],
        ["/" + "x" * 5000],
        [f"/{i}" for i in range(MAX_CONFIGURED_READS + 1)],
    ],
    ids=["not-a-list", "relative", "not-str", "too-long", "too-many"],
)
def test_a_hostile_configured_line_is_refused(read: object) -> None:
    with pytest.raises(WorkerProtocolError, match="configured"):
        parse_message(line({"t": "configured", "read": read}))


def test_the_client_tells_a_paused_worker_to_collect_after_the_callback() -> None:
    seen: list[Configured] = []
    transport = FakeTransport([line({"t": "configured", "read": ["/p/conftest.py"]}), COLLECTED])

    def on_configured(message: Configured) -> None:
        seen.append(message)
        assert transport.sent == []  # the host snapshots before the worker goes on

    collected = WorkerClient(transport).start(5, on_configured=on_configured)
    assert seen == [Configured(("/p/conftest.py",))]
    assert [json.loads(sent) for sent in transport.sent] == [{"t": "collect"}]
    assert collected.nodeids


def test_the_client_resumes_a_worker_restored_configured() -> None:
    transport = FakeTransport([COLLECTED])
    WorkerClient(transport).start(5, resume=True)
    assert [json.loads(sent) for sent in transport.sent] == [{"t": "collect"}]


@hypothesis.given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_any_record_file_is_read_or_refused_never_raises(raw: bytes) -> None:
    record = configured.Record.from_json(raw)
    assert record is None or isinstance(record.read, dict)


def test_members_read_once_give_the_same_key_and_files() -> None:
    tars = [tar_of(TREE), tar_of({"other/x.py": b"x"})]
    members = worker_cache.members_of(tars)
    assert worker_cache.tree_digest(members) == worker_cache.tree_digest(tars)
    assert configured.tree_files(members) == configured.tree_files(tars)
