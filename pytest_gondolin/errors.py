"""Exceptions raised by pytest-gondolin.

The classes are defined in :mod:`pytest_gondolin.guest.errors`, standard
library only, so the guest has the very same ones: a module the guest
imports may name any of them (``from pytest_gondolin.errors import
ExecError``; in the guest ``pytest_gondolin.errors`` is that module). This
module re-exports every name; add new errors there, and draw them here.

Every error the plugin raises derives from :class:`GondolinError`; nothing
from ``OSError``, ``h11`` or ``qemu.qmp`` escapes the public API unwrapped.
Errors carry the data needed to act on them (a command line, a console
tail, the policy rule that decided).

::

    GondolinError
     ├── ConfigError              a bad option, marker argument or policy (names the value)
     │    └── CacheDirError       the cache folder cannot be created or written (names it)
     ├── HostToolMissing          a host program is absent (names the package to install)
     ├── ImageError               building, finding or validating a guest image failed
     ├── StateError               a method was called in a state that does not allow it
     │                            (carries the state and the required ones: a caller's bug)
     ├── HostOnlyError            a host-side object (VM, Checkpoint, ...) was used in the guest
     ├── VMError                  anything about a running (or dead) VM
     │    ├── VMLaunchError       QEMU exited or the agent never answered during boot
     │    ├── VMCrashed           QEMU died after boot (carries exit code, console tail)
     │    ├── AgentError          the guest agent reported a failure or misbehaved
     │    │    ├── AgentTimeout        the agent did not answer within the deadline
     │    │    ├── AgentRequestError   the agent refused or failed one request (errno)
     │    │    │    └── GuestFileError     † read_file / write_file failed (names the path)
     │    │    │         ├── GuestFileNotFoundError   † also FileNotFoundError
     │    │    │         ├── GuestFileExistsError     † also FileExistsError
     │    │    │         ├── GuestPermissionError     † also PermissionError
     │    │    │         ├── GuestIsADirectoryError   † also IsADirectoryError
     │    │    │         └── GuestNotADirectoryError  † also NotADirectoryError
     │    │    └── AgentProtocolError  *
     │    ├── ExecError           a guest command failed (check=True) ...
     │    │    └── ExecTimeout    ... or ran past its timeout and was killed
     │    └── SnapshotError       saving / restoring / checkpointing failed
     ├── WireProtocolError        a message on a host <-> guest wire broke its protocol
     │    ├── AgentProtocolError  * a bad agent frame or request (either side); also an AgentError
     │    └── WorkerProtocolError a bad line from (or for) the in-guest test worker
     └── NetworkPolicyError       the host's network mediation refused or failed

``GuestFileError`` and its subclasses (†) are also ``OSError``: a guest
file error is caught like the host's own (``except FileNotFoundError``),
carries the guest's ``errno`` and ``strerror``, and its ``filename`` is the
guest path the caller passed (never a temporary file of the agent's).
:func:`guest_file_error` picks the class for an errno the way ``OSError``
does.

``AgentProtocolError`` sits under both ``AgentError`` (the agent is who
broke it) and ``WireProtocolError`` (what broke). ``WorkerProtocolError``
is not an ``AgentError``: the test worker's line protocol has nothing to do
with the agent's frames, even though its lines ride on an agent process.
The guest-side codec (:mod:`pytest_gondolin.guest.protocol`, stdlib only)
raises its own ``FrameError``; the host maps it to
``AgentProtocolError`` at the boundary.
"""

from __future__ import annotations

from pytest_gondolin.guest.errors import EXEC_TAIL_LINES as EXEC_TAIL_LINES
from pytest_gondolin.guest.errors import MESSAGE_TAIL_LINES as MESSAGE_TAIL_LINES
from pytest_gondolin.guest.errors import AgentError as AgentError
from pytest_gondolin.guest.errors import AgentProtocolError as AgentProtocolError
from pytest_gondolin.guest.errors import AgentRequestError as AgentRequestError
from pytest_gondolin.guest.errors import AgentTimeout as AgentTimeout
from pytest_gondolin.guest.errors import CacheDirError as CacheDirError
from pytest_gondolin.guest.errors import ConfigError as ConfigError
from pytest_gondolin.guest.errors import ExecError as ExecError
from pytest_gondolin.guest.errors import ExecTimeout as ExecTimeout
from pytest_gondolin.guest.errors import GondolinError as GondolinError
from pytest_gondolin.guest.errors import GuestFileError as GuestFileError
from pytest_gondolin.guest.errors import GuestFileExistsError as GuestFileExistsError
from pytest_gondolin.guest.errors import GuestFileNotFoundError as GuestFileNotFoundError
from pytest_gondolin.guest.errors import GuestIsADirectoryError as GuestIsADirectoryError
from pytest_gondolin.guest.errors import GuestNotADirectoryError as GuestNotADirectoryError
from pytest_gondolin.guest.errors import GuestPermissionError as GuestPermissionError
from pytest_gondolin.guest.errors import HostOnlyError as HostOnlyError
from pytest_gondolin.guest.errors import HostToolMissing as HostToolMissing
from pytest_gondolin.guest.errors import ImageError as ImageError
from pytest_gondolin.guest.errors import NetworkPolicyError as NetworkPolicyError
from pytest_gondolin.guest.errors import SnapshotError as SnapshotError
from pytest_gondolin.guest.errors import StateError as StateError
from pytest_gondolin.guest.errors import VMCrashed as VMCrashed
from pytest_gondolin.guest.errors import VMError as VMError
from pytest_gondolin.guest.errors import VMLaunchError as VMLaunchError
from pytest_gondolin.guest.errors import WireProtocolError as WireProtocolError
from pytest_gondolin.guest.errors import WorkerProtocolError as WorkerProtocolError
from pytest_gondolin.guest.errors import guest_file_error as guest_file_error

__all__ = [
    "EXEC_TAIL_LINES",
    "MESSAGE_TAIL_LINES",
    "AgentError",
    "AgentProtocolError",
    "AgentRequestError",
    "AgentTimeout",
    "CacheDirError",
    "ConfigError",
    "ExecError",
    "ExecTimeout",
    "GondolinError",
    "GuestFileError",
    "GuestFileExistsError",
    "GuestFileNotFoundError",
    "GuestIsADirectoryError",
    "GuestNotADirectoryError",
    "GuestPermissionError",
    "HostOnlyError",
    "HostToolMissing",
    "ImageError",
    "NetworkPolicyError",
    "SnapshotError",
    "StateError",
    "VMCrashed",
    "VMError",
    "VMLaunchError",
    "WireProtocolError",
    "WorkerProtocolError",
    "guest_file_error",
]
