"""Guest file errors are OSErrors naming the caller's path, and gondolin errors (no QEMU).

The agent answers a failed ``read`` / ``write_*`` with ``error {message,
errno}``; the host's call for that request turns it into the
:class:`GuestFileError` subclass ``OSError`` itself would pick for the
errno, naming the path the caller passed. The real agent's side is in
``test_agent_channel.py::test_file_errors``; a real guest's in
``tests/integration/test_vm_core.py``.
"""

from __future__ import annotations

import copy
import errno
import pickle

import pytest

from pytest_gondolin import errors
from pytest_gondolin.errors import (
    AgentRequestError,
    GondolinError,
    GuestFileError,
    GuestFileExistsError,
    GuestFileNotFoundError,
    GuestIsADirectoryError,
    GuestNotADirectoryError,
    GuestPermissionError,
    guest_file_error,
)
from pytest_gondolin.guest.protocol import Frame
from pytest_gondolin.vm.agent_calls import CallState, ReadCall, SimpleCall, WriteCall

PATH = "/srv/data.txt"


@pytest.mark.parametrize(
    ("err", "cls", "builtin"),
    [
        (errno.ENOENT, GuestFileNotFoundError, FileNotFoundError),
        (errno.EEXIST, GuestFileExistsError, FileExistsError),
        (errno.EACCES, GuestPermissionError, PermissionError),
        (errno.EPERM, GuestPermissionError, PermissionError),
        (errno.EISDIR, GuestIsADirectoryError, IsADirectoryError),
        (errno.ENOTDIR, GuestNotADirectoryError, NotADirectoryError),
        # Any other errno: the generic one, still an OSError with errno and path.
        (errno.EFBIG, GuestFileError, OSError),
        (errno.EROFS, GuestFileError, OSError),
        (errno.EINVAL, GuestFileError, OSError),
    ],
)
def test_errno_picks_the_class_os_error_would(
    err: int, cls: type[GuestFileError], builtin: type[OSError]
) -> None:
    error = guest_file_error("read_file", PATH, err, "the guest's reason")
    assert type(error) is cls
    assert isinstance(error, builtin) and isinstance(error, OSError)
    assert isinstance(error, GondolinError) and isinstance(error, AgentRequestError)
    assert (error.errno, error.strerror, error.filename) == (err, "the guest's reason", PATH)
    assert (error.request, error.message) == ("read_file", "the guest's reason")
    assert str(error) == f"read_file in the guest: [Errno {err}] the guest's reason: {PATH!r}"
    # The builtin would pick the same family for this errno (negative control: the table agrees).
    assert isinstance(OSError(err, "x"), builtin)


def test_copies_keep_class_path_and_operation() -> None:
    error = guest_file_error("write_file", PATH, errno.EACCES, "Permission denied")
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is GuestPermissionError
        assert (clone.errno, clone.filename, clone.request) == (errno.EACCES, PATH, "write_file")
        assert str(clone) == str(error)


def test_without_an_errno_it_is_no_file_error() -> None:
    """The agent failed for a reason that is not about the file (a bug): no OSError to pretend."""
    error = guest_file_error("read_file", PATH, None, "KeyError: 'x'")
    assert type(error) is AgentRequestError and not isinstance(error, OSError)
    assert error.errno is None and "KeyError" in str(error)


def test_exported_from_the_errors_module() -> None:
    for name in (
        "GuestFileError",
        "GuestFileNotFoundError",
        "GuestFileExistsError",
        "GuestPermissionError",
        "GuestIsADirectoryError",
        "GuestNotADirectoryError",
    ):
        assert issubclass(getattr(errors, name), GondolinError)
        assert name in (errors.__doc__ or ""), f"{name} is missing from the tree in the docstring"


def _error_frame(message: str, err: int | None) -> Frame:
    return Frame({"t": "error", "id": 1, "message": message, "errno": err})


@pytest.mark.parametrize(
    ("call", "operation"),
    [(ReadCall(10, path=PATH), "read_file"), (WriteCall(PATH), "write_file")],
)
def test_file_calls_name_the_callers_path(call: ReadCall | WriteCall, operation: str) -> None:
    assert call.receive(_error_frame("No such file or directory", errno.ENOENT))
    assert call.state is CallState.FAILED
    assert isinstance(call.error, GuestFileNotFoundError)
    assert (call.error.filename, call.error.request) == (PATH, operation)


def test_other_calls_keep_agent_request_error() -> None:
    """Negative control: only file requests become OSErrors (a clock the guest refuses is not one)."""
    call = SimpleCall("set_clock")
    assert call.receive(_error_frame("Operation not permitted", errno.EPERM))
    assert type(call.error) is AgentRequestError
