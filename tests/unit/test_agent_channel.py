"""AgentChannel driving the real agent (a host subprocess over a socketpair), and a hostile peer."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import (
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentTimeout,
    ExecTimeout,
    GuestFileError,
    VMError,
)
from pytest_gondolin.guest import protocol as proto
from pytest_gondolin.vm.agent_calls import RawExecResult
from pytest_gondolin.vm.channel import AgentChannel
from pytest_gondolin.vm.channel_core import ChannelState

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

# linux/prctl.h and linux/capability.h
PR_CAPBSET_DROP = 24
CAP_SYS_BOOT = 22
CAP_SYS_TIME = 25


@pytest.fixture(autouse=True)
def no_thread_crashes() -> Iterator[None]:
    """Fail the test if any thread (the channel reader above all) dies with an exception."""
    crashes: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = crashes.append
    try:
        yield
    finally:
        threading.excepthook = previous
    assert not crashes, [f"{c.thread}: {c.exc_value!r}" for c in crashes]


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as ex:
        yield ex


# -- the real agent ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _drop_dangerous_caps() -> None:
    # Tests may run as root: make sure the agent can never set the clock or power
    # off this machine (execve as root keeps only the bounding set).
    for cap in (CAP_SYS_TIME, CAP_SYS_BOOT):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


class Agent:
    def __init__(self, tmp_path: Path) -> None:
        host, guest = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["GONDOLIN_TEST_MARK"] = "inherited"
        self.log_path = tmp_path / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_gondolin.guest.agent", "--fd", str(guest.fileno())],
                pass_fds=[guest.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=_drop_dangerous_caps,
            )
        guest.close()
        self.sock = host
        self.lost: list[VMError] = []
        self.channel = AgentChannel(host, name="test-agent", on_lost=self.lost.append)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.channel.close()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One agent for the module (starting Python costs ~0.1 s); tests leave it clean."""
    a = Agent(tmp_path_factory.mktemp("agent"))
    a.channel.wait_ready(10)
    try:
        yield a
    finally:
        rc = a.stop()
    assert rc == 0, a.log
    assert not a.lost


def test_agent_exits_cleanly_on_host_eof(tmp_path: Path) -> None:
    a = Agent(tmp_path)
    assert a.channel.wait_ready(10)["pid"] == a.proc.pid
    p = a.channel.spawn(["sleep", "100"])
    assert a.stop() == 0, a.log  # --fd mode: EOF from the host means exit, killing children
    assert _eventually(lambda: not _alive(p.pid))


@pytest.fixture
def ch(agent: Agent) -> AgentChannel:
    return agent.channel


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _eventually(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_ready_header(agent: Agent) -> None:
    ready = agent.channel.wait_ready(1)
    assert ready["version"] == proto.PROTOCOL_VERSION
    assert ready["pid"] == agent.proc.pid


@pytest.mark.parametrize(
    ("argv", "returncode"),
    [
        (["true"], 0),
        (["false"], 1),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -TERM $$"], -signal.SIGTERM),
        (["sh", "-c", "kill -KILL $$"], -signal.SIGKILL),
    ],
)
def test_exit_codes(ch: AgentChannel, argv: list[str], returncode: int) -> None:
    result = ch.exec(argv, timeout=10)
    assert result == RawExecResult(returncode, b"", b"", timed_out=False, truncated=False)


def test_stdout_and_stderr_are_separate(ch: AgentChannel) -> None:
    result = ch.exec(["sh", "-c", "echo out; echo err >&2; echo out2"], timeout=10)
    assert (result.stdout, result.stderr) == (b"out\nout2\n", b"err\n")


def test_stdin_round_trip_large(ch: AgentChannel) -> None:
    data = os.urandom(3 * proto.CHUNK + 123)
    result = ch.exec(["cat"], input=data, timeout=10)
    assert result.stdout == data
    assert result.returncode == 0


def test_no_input_means_dev_null(ch: AgentChannel) -> None:
    result = ch.exec(["sh", "-c", "cat; readlink /proc/self/fd/0"], timeout=10)
    assert result.stdout == b"/dev/null\n"


def test_env_replaces_or_inherits(ch: AgentChannel) -> None:
    script = 'echo "$FOO|$GONDOLIN_TEST_MARK"'
    replaced = ch.exec(["/bin/sh", "-c", script], env={"FOO": "bar"}, timeout=10)
    assert replaced.stdout == b"bar|\n"
    inherited = ch.exec(["sh", "-c", script], timeout=10)
    assert inherited.stdout == b"|inherited\n"


def test_cwd(ch: AgentChannel, tmp_path: Path) -> None:
    assert ch.exec(["pwd"], cwd=str(tmp_path), timeout=10).stdout == f"{tmp_path}\n".encode()


@pytest.mark.parametrize(
    ("argv", "cwd", "err"),
    [
        (["/nonexistent/prog"], None, errno.ENOENT),
        (["no-such-program-gondolin"], None, errno.ENOENT),
        (["{tmp}/not-executable"], None, errno.EACCES),
        (["true"], "/nonexistent-dir", errno.ENOENT),
    ],
)
def test_start_failures_are_errors(
    ch: AgentChannel, tmp_path: Path, argv: list[str], cwd: str | None, err: int
) -> None:
    (tmp_path / "not-executable").write_text("echo hi\n")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(AgentRequestError) as info:
        ch.exec(argv, cwd=cwd, timeout=10)
    assert info.value.errno == err
    assert ch.exec(["echo", "still alive"], timeout=10).stdout == b"still alive\n"


def test_timeout_kills_the_whole_process_group(ch: AgentChannel) -> None:
    start = time.monotonic()
    result = ch.exec(["sh", "-c", "sleep 100 & echo $!; sleep 100 & echo $!; wait"], timeout=0.5)
    assert time.monotonic() - start < 5
    assert result.timed_out
    assert result.returncode == -signal.SIGKILL
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2
    assert _eventually(lambda: not any(_alive(p) for p in pids)), pids


def test_background_process_does_not_hold_exec_open(ch: AgentChannel) -> None:
    start = time.monotonic()
    result = ch.exec(["sh", "-c", "sleep 3 & echo hi"], timeout=10)
    assert time.monotonic() - start < 2
    assert (result.returncode, result.stdout, result.timed_out) == (0, b"hi\n", False)


def test_orphans_are_reaped_without_stealing_statuses(agent: Agent) -> None:
    ch = agent.channel
    for _ in range(5):
        # The subshell outlives its parent and is re-parented to the agent (a
        # subreaper in tests, PID 1 in the guest): its status must be discarded.
        result = ch.exec(["sh", "-c", "(sleep 0.05; exit 5) </dev/null >/dev/null 2>&1 & exit 3"])
        assert result.returncode == 3
    time.sleep(0.3)
    assert ch.exec(["sh", "-c", "exit 4"]).returncode == 4

    def zombies() -> list[str]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == agent.proc.pid:
                out.append(stat.parent.name)
        return out

    assert _eventually(lambda: not zombies()), zombies()


def test_max_output_truncates(ch: AgentChannel) -> None:
    result = ch.exec(["head", "-c", "1000000", "/dev/zero"], max_output=1000, timeout=10)
    assert (len(result.stdout), result.truncated, result.returncode) == (1000, True, 0)
    both = ch.exec(
        ["sh", "-c", "head -c 600 /dev/zero; head -c 600 /dev/zero >&2"],
        max_output=1000,
        timeout=10,
    )
    assert len(both.stdout) + len(both.stderr) == 1000
    assert both.truncated
    exact = ch.exec(["head", "-c", "1000", "/dev/zero"], max_output=1000, timeout=10)
    assert (len(exact.stdout), exact.truncated) == (1000, False)


def test_three_megabyte_file_round_trip(ch: AgentChannel, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    target = tmp_path / "a" / "b" / "blob.bin"
    ch.write_file(str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o600
    assert os.listdir(target.parent) == ["blob.bin"]  # the temp file was renamed away
    assert ch.read_file(str(target), max_size=len(data)) == data
    assert ch.exec(["cat", str(target)], timeout=10).stdout == data


def test_write_file_replaces_and_honours_mode(ch: AgentChannel, tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_text("old")
    ch.write_file(str(target), b"#!/bin/sh\necho new\n", mode=0o755)
    assert target.stat().st_mode & 0o7777 == 0o755
    assert ch.exec([str(target)], timeout=10).stdout == b"new\n"
    ch.write_file(str(tmp_path / "empty"), b"")
    assert (tmp_path / "empty").read_bytes() == b""


def test_file_errors(ch: AgentChannel, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"12345")
    missing, file, sub = (
        str(tmp_path / "missing"),
        str(tmp_path / "file"),
        str(tmp_path / "file" / "sub"),
    )
    cases: list[tuple[Callable[[], object], str, int, type[OSError]]] = [
        (lambda: ch.read_file(missing, max_size=10), missing, errno.ENOENT, FileNotFoundError),
        (lambda: ch.read_file(file, max_size=4), file, errno.EFBIG, GuestFileError),
        (
            lambda: ch.read_file(str(tmp_path), max_size=10),
            str(tmp_path),
            errno.EISDIR,
            IsADirectoryError,
        ),
        (lambda: ch.write_file(sub, b"x" * 10), sub, errno.ENOTDIR, NotADirectoryError),
        (
            lambda: ch.write_file(str(tmp_path) + "/", b"x"),
            str(tmp_path) + "/",
            errno.EISDIR,
            IsADirectoryError,
        ),
        # The agent's temp file cannot be created in /proc: the error names the path given.
        (lambda: ch.write_file("/proc/nope", b"x"), "/proc/nope", errno.ENOENT, FileNotFoundError),
    ]
    for call, path, err, kind in cases:
        with pytest.raises(kind) as info:
            call()
        error = info.value
        assert isinstance(error, GuestFileError), repr(error)
        assert isinstance(error, AgentRequestError)  # what callers caught before
        assert (error.errno, error.filename) == (err, path), error
        assert str(error).endswith(f": {path!r}"), str(error)
        assert ".tmp" not in str(error), str(error)
    assert ch.read_file(file, max_size=5) == b"12345"
    with pytest.raises(AgentProtocolError, match="path"):
        ch.read_file("relative/path", max_size=10)


def test_concurrent_execs_from_threads(
    ch: AgentChannel, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    def job(i: int) -> None:
        for j in range(3):
            r = ch.exec(["sh", "-c", 'echo "$0"; echo "e$0" >&2', f"{i}-{j}"], timeout=10)
            assert (r.stdout, r.stderr) == (f"{i}-{j}\n".encode(), f"e{i}-{j}\n".encode())

    for f in [pool.submit(job, i) for i in range(16)]:
        f.result(timeout=30)


def test_exec_cap(ch: AgentChannel) -> None:
    procs = [ch.spawn(["sleep", "100"]) for _ in range(64)]
    try:
        with pytest.raises(AgentRequestError) as info:
            ch.exec(["true"], timeout=5)
        assert info.value.errno == errno.EAGAIN
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            assert p.wait(10) == -signal.SIGKILL
    assert ch.exec(["true"], timeout=10).returncode == 0


def test_spawn_streams(ch: AgentChannel) -> None:
    with ch.spawn(["sh", "-c", "while read l; do echo got-$l; echo err-$l >&2; done"]) as p:
        assert p.pid > 0
        p.write_stdin(b"a\nb\n")
        assert p.readline_stdout(5) == b"got-a\n"
        assert p.readline_stdout(5) == b"got-b\n"
        with pytest.raises(AgentTimeout):
            p.readline_stdout(0.2)
        p.close_stdin()
        p.close_stdin()
        assert p.wait(5) == 0
        chunks = []
        while (chunk := p.read(5)) is not None:
            chunks.append(chunk)
        assert {s for s, _ in chunks} == {"stderr"}
        assert b"".join(d for _, d in chunks) == b"err-a\nerr-b\n"
        assert p.readline_stdout(1) == b""
        with pytest.raises(ValueError, match="close_stdin"):
            p.write_stdin(b"late")


def test_kill_signals_the_group(ch: AgentChannel) -> None:
    p = ch.spawn(["sh", "-c", "sleep 100 & echo $!; wait"])
    bg = int(p.readline_stdout(5))
    p.kill(signal.SIGTERM)
    assert p.wait(5) == -signal.SIGTERM
    assert _eventually(lambda: not _alive(bg))


def test_spawn_missing_program(ch: AgentChannel) -> None:
    with pytest.raises(AgentRequestError) as info:
        ch.spawn(["no-such-program-gondolin"])
    assert info.value.errno == errno.ENOENT


def test_entropy_clock_and_poweroff(agent: Agent) -> None:
    ch = agent.channel
    ch.add_entropy(os.urandom(64))
    with pytest.raises(AgentRequestError) as info:
        ch.poweroff()  # the test agent is not PID 1
    assert info.value.errno == errno.EPERM
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    cap_eff = int(next(x for x in status.splitlines() if x.startswith("CapEff")).split()[1], 16)
    if cap_eff & (1 << CAP_SYS_TIME):
        pytest.skip("the agent could really set this machine's clock")
    with pytest.raises(AgentRequestError) as info:
        ch.set_clock(time.time_ns())
    assert info.value.errno == errno.EPERM


def test_sync_drops_stale_state(
    ch: AgentChannel, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    sleeper = ch.spawn(["sleep", "100"])
    late = pool.submit(ch.exec, ["sh", "-c", "sleep 0.3; echo late"], timeout=10)
    time.sleep(0.1)
    ch.sync(5)
    with pytest.raises(AgentError, match="state reset by restore"):
        late.result(5)
    with pytest.raises(AgentError, match="state reset by restore"):
        sleeper.wait(5)
    time.sleep(0.5)  # the stale exec's output and exit arrive now and must be dropped
    assert ch.exec(["echo", "fresh"], timeout=10).stdout == b"fresh\n"
    ch.sync(5)
    assert ch.exec(["echo", "again"], timeout=10).stdout == b"again\n"


# -- the real agent, driven with raw frames --------------------------------------------


class RawPeer:
    """Our end of a socket, speaking frames directly (no AgentChannel)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = proto.FrameDecoder()
        sock.settimeout(5)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sock.sendall(proto.encode_frame(header, payload))

    def recv(self) -> proto.Frame:
        while (frame := self.dec.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.dec.feed(data)
        return frame

    def recv_for(self, req_id: int) -> proto.Frame:
        while (frame := self.recv()).id != req_id:
            pass
        return frame


@pytest.fixture
def raw_agent(tmp_path: Path) -> Iterator[tuple[RawPeer, subprocess.Popen[bytes], Path]]:
    host, guest = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path / "agent.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_gondolin.guest.agent", "--fd", str(guest.fileno())],
            pass_fds=[guest.fileno()],
            stdout=f,
            stderr=f,
            env=env,
            preexec_fn=_drop_dangerous_caps,
        )
    guest.close()
    peer = RawPeer(host)
    assert peer.recv().type == "ready"
    try:
        yield peer, proc, log
    finally:
        host.close()
        assert proc.wait(5) == 0


EXEC = {"argv": ["echo", "hi"], "env": None, "cwd": None, "timeout": 5, "max_output": 100}


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        ({"t": "bogus", "id": 5}, b"", "unknown message type"),
        ({"t": "exec", "id": 5, **EXEC, "argv": []}, b"", r"exec\.argv"),
        ({"t": "exec", "id": 5, **EXEC}, b"", r"exec\.stdin: missing"),
        ({"t": "ok", "id": 5}, b"", "only be sent by the guest"),
        ({"t": "set_clock", "id": 5, "ns": 1}, b"payload", "no payload"),
        ({"t": "write_close", "id": 5}, b"", "no open write"),
    ],
)
def test_agent_answers_bad_requests_and_survives(
    raw_agent: tuple[RawPeer, subprocess.Popen[bytes], Path],
    header: dict[str, Any],
    payload: bytes,
    match: str,
) -> None:
    peer, _, _ = raw_agent
    peer.send(header, payload)
    reply = peer.recv_for(5)
    assert reply.type == "error"
    assert re.search(match, reply.header["message"]), reply.header
    peer.send({"t": "exec", "id": 6, **EXEC, "stdin": False})
    frames = [peer.recv_for(6) for _ in range(3)]
    assert [f.type for f in frames] == ["started", "stdout", "exit"]


def test_agent_write_errors_are_reported_once(
    raw_agent: tuple[RawPeer, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    peer, _, _ = raw_agent
    (tmp_path / "file").write_bytes(b"")
    peer.send({"t": "write_open", "id": 7, "path": str(tmp_path / "file" / "x"), "mode": 0o644})
    peer.send({"t": "write_chunk", "id": 7}, b"data")
    peer.send({"t": "write_close", "id": 7})
    peer.send({"t": "sync", "id": 8, "nonce": "n", "clock_ns": None})
    first = peer.recv()
    assert (first.type, first.id, first.header["errno"]) == ("error", 7, errno.ENOTDIR)
    assert (peer.recv().type) == "sync_ok"  # no second reply for id 7


def test_agent_resynchronises_after_garbage(
    raw_agent: tuple[RawPeer, subprocess.Popen[bytes], Path],
) -> None:
    peer, _, log = raw_agent
    peer.sock.sendall(struct.pack(">I", 0xFFFFFFFF) + b"garbage")
    for attempt in range(20):
        time.sleep(0.05)
        peer.send({"t": "sync", "id": 100 + attempt, "nonce": f"n{attempt}", "clock_ns": None})
        peer.sock.settimeout(0.3)
        try:
            reply = peer.recv()
        except TimeoutError:
            continue
        assert reply.type == "sync_ok"
        break
    else:
        pytest.fail("agent never answered sync after garbage")
    assert "malformed frame" in log.read_text()
    peer.sock.settimeout(5)
    peer.send({"t": "exec", "id": 200, **EXEC, "stdin": False})
    assert peer.recv_for(200).type == "started"


# -- a hostile guest ------------------------------------------------------------------------


class Fake:
    def __init__(self) -> None:
        host, guest = socket.socketpair()
        self.peer = RawPeer(guest)
        self.lost: list[VMError] = []
        self.channel = AgentChannel(
            host, name="fake", on_lost=self.lost.append, exec_grace=0.3, request_timeout=2
        )

    def close(self) -> None:
        self.channel.close()
        self.peer.sock.close()


@pytest.fixture
def fake() -> Iterator[Fake]:
    f = Fake()
    try:
        yield f
    finally:
        f.close()


def _pending_exec(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor, **kwargs: Any
) -> tuple[concurrent.futures.Future[RawExecResult], int]:
    future = pool.submit(fake.channel.exec, ["x"], **kwargs)
    frame = fake.peer.recv()
    assert frame.type == "exec"
    return future, frame.id


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 8,
        struct.pack(">II", 6, 2) + b"[]",
        proto.encode_frame({"t": "exit", "id": 1, "returncode": "0"}),
        proto.encode_frame({"t": "exec", "id": 1, **EXEC, "stdin": False}),
        proto.encode_frame({"t": "ok", "id": 1}, b"unexpected payload"),
    ],
)
def test_hostile_frames_fail_pending_calls(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor, garbage: bytes
) -> None:
    future, _ = _pending_exec(fake, pool)
    fake.peer.sock.sendall(garbage)
    with pytest.raises(AgentProtocolError):
        future.result(5)
    with pytest.raises(AgentProtocolError, match="unusable"):
        fake.channel.exec(["y"])
    assert not fake.channel.closed


def test_wrong_frame_type_fails_only_that_call(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future, req_id = _pending_exec(fake, pool)
    fake.peer.send({"t": "data", "id": req_id}, b"x")
    with pytest.raises(AgentProtocolError, match="unexpected 'data'"):
        future.result(5)
    future, req_id = _pending_exec(fake, pool)
    fake.peer.send(
        {"t": "exit", "id": req_id, "returncode": 0, "timed_out": False, "truncated": False}
    )
    assert future.result(5).returncode == 0


def test_unknown_ids_are_dropped_and_output_is_capped(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future, req_id = _pending_exec(fake, pool, max_output=250)
    fake.peer.send({"t": "stdout", "id": req_id + 1000}, b"not mine")
    fake.peer.send({"t": "ok", "id": 12345})
    fake.peer.send({"t": "sync_ok", "id": 3, "nonce": "stale"})
    fake.peer.send({"t": "started", "id": req_id, "pid": 9})
    for _ in range(10):
        fake.peer.send({"t": "stdout", "id": req_id}, b"a" * 100)
    # The guest claims nothing was truncated; the host knows better.
    fake.peer.send(
        {"t": "exit", "id": req_id, "returncode": 0, "timed_out": False, "truncated": False}
    )
    result = future.result(5)
    assert (result.stdout, result.truncated) == (b"a" * 250, True)


def test_guest_timeout_is_a_result_not_an_exception(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future, req_id = _pending_exec(fake, pool, timeout=1)
    fake.peer.send(
        {"t": "exit", "id": req_id, "returncode": -9, "timed_out": True, "truncated": False}
    )
    assert future.result(5) == RawExecResult(-9, b"", b"", timed_out=True, truncated=False)


def test_read_file_over_max_size_from_guest(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future = pool.submit(fake.channel.read_file, "/f", max_size=5)
    req = fake.peer.recv()
    fake.peer.send({"t": "data", "id": req.id}, b"123")
    fake.peer.send({"t": "data", "id": req.id}, b"456")
    with pytest.raises(AgentProtocolError, match="max_size"):
        future.result(5)


def test_host_deadline_kills_and_raises(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    start = time.monotonic()
    future, req_id = _pending_exec(fake, pool, timeout=0.2)
    fake.peer.send({"t": "stdout", "id": req_id}, b"partial")
    with pytest.raises(ExecTimeout) as info:
        future.result(5)
    assert 0.4 < time.monotonic() - start < 3
    assert info.value.stdout == "partial"
    kill = fake.peer.recv()
    assert (kill.type, kill.id, kill.header["signal"]) == ("kill", req_id, signal.SIGKILL)


def test_request_deadlines(fake: Fake) -> None:
    with pytest.raises(AgentTimeout):
        fake.channel.wait_ready(0.1)
    with pytest.raises(AgentTimeout):
        fake.channel.sync(0.2)
    # A failed sync leaves the channel unusable until a sync succeeds.
    with pytest.raises(AgentProtocolError, match="sync did not complete"):
        fake.channel.exec(["x"])


def test_wait_ready_checks_version(fake: Fake) -> None:
    fake.peer.send({"t": "ready", "id": 0, "version": "999", "pid": 1})
    with pytest.raises(AgentProtocolError, match="protocol '999'"):
        fake.channel.wait_ready(5)


def test_sync_recovers_a_broken_stream(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    fake.peer.sock.sendall(b"\x00\x00\x00\x02??")  # breaks framing
    _wait_for(lambda: fake.channel.state is ChannelState.BROKEN)
    syncing = pool.submit(fake.channel.sync, 5)
    req = fake.peer.recv()
    assert req.type == "sync"
    answer = proto.encode_frame({"t": "sync_ok", "id": req.id, "nonce": req.header["nonce"]})
    # Junk and a half frame before the answer, a valid frame right after it.
    fake.peer.sock.sendall(
        b"\x00\x00\x10\x00junk" + answer + proto.encode_frame({"t": "ok", "id": 1})
    )
    syncing.result(5)
    future, req_id = _pending_exec(fake, pool)
    fake.peer.send(
        {"t": "exit", "id": req_id, "returncode": 3, "timed_out": False, "truncated": False}
    )
    assert future.result(5).returncode == 3


def _wait_for(pred: Callable[[], bool]) -> None:
    assert _eventually(pred, 5)


def test_eof_fails_pending_calls_and_reports_loss(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future, _ = _pending_exec(fake, pool)
    fake.peer.sock.close()
    with pytest.raises(VMError) as info:
        future.result(5)
    assert not isinstance(info.value, AgentError)
    # on_lost runs on the reader thread just after the channel is marked lost: wait for it.
    _wait_for(lambda: fake.channel.closed and len(fake.lost) > 0)
    assert len(fake.lost) == 1
    with pytest.raises(VMError, match="EOF"):
        fake.channel.exec(["x"])


def test_close_fails_pending_calls_and_is_idempotent(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future, _ = _pending_exec(fake, pool)
    fake.channel.close()
    with pytest.raises(VMError, match="closed"):
        future.result(5)
    fake.channel.close()
    assert fake.channel.closed
    assert fake.lost == []
    with pytest.raises(VMError):
        fake.channel.write_file("/x", b"")


def test_poweroff_treats_loss_as_success(
    fake: Fake, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    future = pool.submit(fake.channel.poweroff)
    assert fake.peer.recv().type == "poweroff"
    fake.peer.sock.close()
    assert future.result(5) is None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=6))
def test_random_guest_bytes_never_crash_the_host(
    pool: concurrent.futures.ThreadPoolExecutor, garbage: list[bytes]
) -> None:
    fake = Fake()
    try:
        future, _ = _pending_exec(fake, pool)
        for piece in garbage:
            fake.peer.sock.sendall(piece)
        fake.peer.sock.close()  # so the call ends even if the bytes were merely incomplete
        with contextlib.suppress(AgentError, VMError):
            future.result(5)
    finally:
        fake.close()
