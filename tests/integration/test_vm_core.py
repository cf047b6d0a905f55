"""The VM core against a real guest: exec, files, errors, lifecycle."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import signal
import time

import pytest

from pytest_gondolin.errors import (
    ExecError,
    ExecTimeout,
    GondolinError,
    GuestFileError,
    GuestFileNotFoundError,
    GuestIsADirectoryError,
    GuestNotADirectoryError,
    GuestPermissionError,
    VMCrashed,
    VMError,
    VMLaunchError,
)
from pytest_gondolin.image.store import Image
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.machine import VM


def test_guest_is_linux_with_python(session_vm: VM) -> None:
    r = session_vm.exec(
        ["python3", "-c", "import os, sys; print(os.uname().sysname, sys.version_info[:2])"]
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Linux (3, 11)")


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes(session_vm: VM, code: int) -> None:
    assert session_vm.exec(f"exit {code}").returncode == code


def test_signal_exit_is_negative(session_vm: VM) -> None:
    assert session_vm.exec("kill -9 $$").returncode == -9


def test_str_runs_under_sh_and_list_is_argv(session_vm: VM) -> None:
    assert session_vm.exec("echo $((6 * 7))").stdout == "42\n"
    assert session_vm.exec(["echo", "$((6 * 7))"]).stdout == "$((6 * 7))\n"


def test_stdin_stdout_stderr(session_vm: VM) -> None:
    r = session_vm.exec("tr a-z A-Z; echo oops >&2", input="hello\n")
    assert r.stdout == "HELLO\n"
    assert r.stderr == "oops\n"
    assert r.stdout_bytes == b"HELLO\n"


def test_binary_output_kept_raw(session_vm: VM) -> None:
    r = session_vm.exec(["python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))"])
    assert r.stdout_bytes == bytes(range(256))
    assert "\ufffd" in r.stdout  # invalid UTF-8 decoded with replacement


def test_env_and_cwd(session_vm: VM) -> None:
    r = session_vm.exec("echo $GREETING; pwd", env={"GREETING": "hi there"}, cwd="/usr/share")
    assert r.stdout == "hi there\n/usr/share\n"


def test_missing_cwd_or_program_is_an_error(session_vm: VM) -> None:
    with pytest.raises(VMError, match="no-such-dir"):
        session_vm.exec("true", cwd="/no-such-dir")
    with pytest.raises(VMError, match="no-such-program"):
        session_vm.exec(["no-such-program"])


def test_check_raises_with_output(session_vm: VM) -> None:
    with pytest.raises(ExecError, match="exited with 3") as info:
        session_vm.exec("echo visible-out; echo visible-err >&2; exit 3", check=True)
    assert info.value.returncode == 3
    assert "visible-out" in str(info.value) and "visible-err" in str(info.value)
    assert session_vm.exec("true", check=True).returncode == 0


def test_timeout_kills_the_process_group(session_vm: VM) -> None:
    started = time.monotonic()
    with pytest.raises(ExecTimeout, match="timed out after 1"):
        session_vm.exec("sleep 300 & sleep 301; echo never", timeout=1)
    assert time.monotonic() - started < 15
    left = session_vm.exec("ps -eo args | grep -c '^sleep 30[01]' || true").stdout.strip()
    assert left == "0", session_vm.exec("ps -eo pid,pgid,args").stdout


def test_output_is_capped(session_vm: VM) -> None:
    r = session_vm.exec("head -c 3000000 /dev/zero", max_output=1_000_000)
    assert r.truncated
    assert len(r.stdout_bytes) <= 1_000_000
    full = session_vm.exec("head -c 3000000 /dev/zero")
    assert not full.truncated and len(full.stdout_bytes) == 3_000_000


def test_file_round_trip_multi_megabyte(session_vm: VM) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    session_vm.write_file("/tmp/deep/dir/blob.bin", data)
    assert session_vm.read_file("/tmp/deep/dir/blob.bin") == data
    digest = session_vm.exec("sha256sum /tmp/deep/dir/blob.bin").stdout.split()[0]
    import hashlib

    assert digest == hashlib.sha256(data).hexdigest()


def test_write_file_mode_and_text(session_vm: VM) -> None:
    session_vm.write_file("/tmp/script.sh", "#!/bin/sh\necho from-script\n", mode=0o755)
    assert session_vm.exec("/tmp/script.sh").stdout == "from-script\n"


def test_read_missing_file_is_an_error(session_vm: VM) -> None:
    with pytest.raises(VMError, match="no-such-file"):
        session_vm.read_file("/no-such-file")


def test_concurrent_execs(session_vm: VM) -> None:
    def run(i: int) -> str:
        return session_vm.exec(f"sleep 1.5; echo {i}").stdout

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert results == [f"{i}\n" for i in range(8)]
    # One after another takes 12 s at least; at the same time ~2 s, ~6 s on a
    # loaded 2-core host (starting 8 processes under TCG).
    assert time.monotonic() - started < 10


def test_guest_clock_matches_host(session_vm: VM) -> None:
    guest = float(session_vm.exec("date +%s.%N").stdout)
    assert abs(guest - time.time()) < 5


def test_crashed_qemu_gives_clear_error(vm_factory) -> None:  # type: ignore[no-untyped-def]
    machine = vm_factory()
    assert machine.pid is not None
    os.kill(machine.pid, signal.SIGKILL)
    with pytest.raises(VMCrashed, match="QEMU exit"):
        machine.exec("true")
    machine.close()
    assert machine.rundir is not None and not machine.rundir.exists()


def test_failed_launch_carries_command_and_stderr(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bogus = tmp_path / "image"
    bogus.mkdir()
    (bogus / "rootfs.qcow2").write_bytes(b"")
    fake = Image(bogus, {"build_id": "0", "name": "bogus"})
    with pytest.raises(VMLaunchError) as info:
        VM.launch(VMConfig(image=fake, accel="tcg", boot_timeout=20))
    text = str(info.value)
    assert "qemu" in text.lower()
    assert info.value.command or "qemu-img" in text


def test_guest_kernel_panic_is_reported(vm_factory) -> None:  # type: ignore[no-untyped-def]
    machine = vm_factory()
    with pytest.raises((VMCrashed, VMError)):
        machine.exec("echo c > /proc/sysrq-trigger; sleep 30", timeout=60)
    assert "sysrq" in machine.console_log().lower() or "panic" in machine.console_log().lower()
    machine.close()


# -- guest file errors: OSErrors (and gondolin errors) naming the path given -----------


def test_read_of_a_missing_file_is_file_not_found(session_vm: VM) -> None:
    path = "/no-such-dir/missing.txt"
    with pytest.raises(FileNotFoundError) as info:
        session_vm.read_file(path)
    error = info.value
    assert isinstance(error, GuestFileNotFoundError) and isinstance(error, GondolinError)
    assert (error.errno, error.filename) == (errno.ENOENT, path)
    assert str(error).endswith(f"No such file or directory: {path!r}")


def test_a_write_the_guest_refuses_names_the_path_given(session_vm: VM) -> None:
    # /proc takes no new files: the agent's temp file next to the target is refused.
    with pytest.raises(OSError) as info:
        session_vm.write_file("/proc/nope", b"x")
    error = info.value
    assert isinstance(error, GuestFileError) and error.filename == "/proc/nope"
    assert "/proc/nope" in str(error) and ".tmp" not in str(error)
    # sysfs refuses with EACCES: a PermissionError.
    with pytest.raises(PermissionError) as denied:
        session_vm.write_file("/sys/nope", b"x")
    assert isinstance(denied.value, GuestPermissionError)
    assert denied.value.filename == "/sys/nope"


def test_write_into_a_missing_folder(session_vm: VM) -> None:
    # Missing folders are created, as documented ...
    session_vm.write_file("/tmp/new-folder/sub/file.txt", "made")
    assert session_vm.read_file("/tmp/new-folder/sub/file.txt") == b"made"
    # ... unless they cannot be: the error names the file asked for, not the folder.
    with pytest.raises(FileNotFoundError) as info:
        session_vm.write_file("/proc/no-folder/file.txt", "x")
    assert info.value.filename == "/proc/no-folder/file.txt"
    # A file where a folder should be.
    session_vm.write_file("/tmp/plain-file", "x")
    with pytest.raises(NotADirectoryError) as not_dir:
        session_vm.write_file("/tmp/plain-file/file.txt", "x")
    assert isinstance(not_dir.value, GuestNotADirectoryError)
    assert not_dir.value.filename == "/tmp/plain-file/file.txt"


def test_read_of_a_folder_is_a_directory_error(session_vm: VM) -> None:
    with pytest.raises(IsADirectoryError) as info:
        session_vm.read_file("/etc")
    assert isinstance(info.value, GuestIsADirectoryError) and info.value.filename == "/etc"
    # Negative control: the VM is fine and reads a real file.
    assert b"Debian" in session_vm.read_file("/etc/os-release")
