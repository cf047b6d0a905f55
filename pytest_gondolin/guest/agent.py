"""The in-guest agent: runs commands and moves files for the host (stdlib only).

In the guest it is PID 1 (``python3 -m pytest_gondolin.guest.agent --device
/dev/virtio-ports/org.gondolin.agent``); in tests it serves an inherited,
already-connected socket (``--fd N``). It imports nothing from the host
package: only the standard library and :mod:`pytest_gondolin.guest`.

This module owns the main loop, the dispatch table and the requests about
the machine itself (``sync``, ``set_clock``, ``entropy``, ``poweroff``); the
rest of the agent is split by concern:

* :mod:`~pytest_gondolin.guest.execs`: ``exec``, ``stdin``, ``stdin_eof``, ``kill``;
* :mod:`~pytest_gondolin.guest.spawn`: starting one child, like execvp(3);
* :mod:`~pytest_gondolin.guest.files`: ``write_*`` and ``read``;
* :mod:`~pytest_gondolin.guest.reaper`: the one owner of ``waitpid(-1)``;
* :mod:`~pytest_gondolin.guest.agentio`: the frame writer and fd helpers.

Guarantees:

* The agent never dies on a bad request: it answers ``error`` and keeps
  serving. A malformed frame is logged to stderr and the receive buffer is
  discarded; the host resynchronises with ``sync``.
* Frames never interleave (one lock around every write to the channel).
* As PID 1 it reaps every orphan (see :mod:`~pytest_gondolin.guest.reaper`);
  the guarantees of each exec are listed in :mod:`~pytest_gondolin.guest.execs`.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import glob
import logging
import os
import random
import struct
import sys
import tarfile
import threading
import time
from collections.abc import Callable

from pytest_gondolin.guest.agentio import FrameWriter, describe, errno_of, write_all
from pytest_gondolin.guest.binds import bind_folders
from pytest_gondolin.guest.execs import Execs
from pytest_gondolin.guest.files import Files
from pytest_gondolin.guest.protocol import (
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    validate_frame,
)
from pytest_gondolin.guest.reaper import Reaper
from pytest_gondolin.guest.unpack import unpack_tar

log = logging.getLogger("pytest_gondolin.guest.agent")

#: virtio-serial reads return EOF while no host is connected; re-check this often.
DISCONNECTED_POLL = 0.05
#: How long to wait for the virtio port to appear (modules may still be loading).
DEVICE_WAIT = 30.0
#: Bytes per read from the channel.
READ_SIZE = 256 << 10

# linux/random.h: _IOW('R', 0x03, int[2]); adds bytes to the pool and credits entropy.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
# linux/reboot.h
RB_POWER_OFF = 0x4321FEDC
# linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


class Agent:
    """Serves one channel fd until the host goes away (``--fd``) or forever (``--device``)."""

    def __init__(self, fd: int, *, device: bool) -> None:
        self.fd = fd
        self.device = device
        self.writer = FrameWriter(fd, device=device)
        self.reaper = Reaper()
        self._reaper_thread: threading.Thread | None = None
        self.execs = Execs(self.writer, self.reaper)
        self.files = Files(self.writer)
        self._urandom_fd: int | None = None
        self._handlers: dict[str, Callable[[Frame], None]] = {
            "sync": self._h_sync,
            "exec": self.execs.start,
            "stdin": self.execs.stdin,
            "stdin_eof": self.execs.stdin_eof,
            "kill": self.execs.kill,
            "write_open": self.files.write_open,
            "write_chunk": self.files.write_chunk,
            "write_close": self.files.write_close,
            "read": self.files.read,
            "set_clock": self._h_set_clock,
            "bind": self._h_bind,
            "unpack": self._h_unpack,
            "entropy": self._h_entropy,
            "poweroff": self._h_poweroff,
        }

    # -- main loop -------------------------------------------------------------

    def serve(self) -> int:
        """Announce ``ready`` and dispatch requests; returns an exit status (``--fd`` only)."""
        if self._reaper_thread is None:
            self._reaper_thread = threading.Thread(
                target=self.reaper.run, name="reaper", daemon=True
            )
            self._reaper_thread.start()
        fd = self.fd
        self.writer.send({"t": "ready", "id": 0, "version": PROTOCOL_VERSION, "pid": os.getpid()})
        decoder = FrameDecoder()
        # One buffer for every read: os.read(fd, READ_SIZE) would mmap and
        # munmap a fresh 256 KiB object per read, which under TCG is a
        # visible cost, and more so right after a restore (cold translations).
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while not self.writer.failed.is_set():
            try:
                n = os.readv(fd, [buf])
            except OSError as exc:
                if not self.device:
                    log.error("channel read failed: %s", exc)
                    break
                log.warning("channel read failed: %s", exc)
                time.sleep(DISCONNECTED_POLL)
                continue
            if not n:
                if not self.device:
                    break
                # No host connected: a half-received frame will never be completed.
                if decoder.buffered:
                    decoder = FrameDecoder()
                time.sleep(DISCONNECTED_POLL)
                continue
            try:
                decoder.feed(view[:n])
                for frame in decoder:
                    self._dispatch(frame)
            except FrameError as exc:
                log.error("malformed frame from host (%s); discarding buffered input", exc)
                decoder = FrameDecoder()
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self.execs.kill_all()
        self.files.abort_writes()

    def _dispatch(self, frame: Frame) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s (+%d bytes)", frame.header, len(frame.payload))
        try:
            validate_frame(frame, sender="host")
        except FrameError as exc:
            self.writer.error(frame.id, f"bad request: {exc}", errno.EINVAL)
            return
        try:
            self._handlers[frame.type](frame)
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("handler for %s failed", frame.type)
            self.writer.error(frame.id, describe(exc), errno_of(exc))

    # -- sync ------------------------------------------------------------------

    def _h_sync(self, frame: Frame) -> None:
        # Writes in flight belong to host state that was just dropped.
        self.files.abort_writes()
        if frame.payload:
            try:
                self._mix_entropy(frame.payload)
            except OSError as exc:
                log.warning("sync: mixing entropy failed: %s", exc)
        if frame.header["clock_ns"] is not None:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, frame.header["clock_ns"])
            except OSError as exc:
                log.debug("sync: setting the clock failed: %s", exc)
        self.writer.send({"t": "sync_ok", "id": frame.id, "nonce": frame.header["nonce"]})

    # -- machine -----------------------------------------------------------------

    def _h_set_clock(self, frame: Frame) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, frame.header["ns"])
        self.writer.send({"t": "ok", "id": frame.id})

    def _h_bind(self, frame: Frame) -> None:
        bind_folders([(disk, folder) for disk, folder in frame.header["pairs"]])
        self.writer.send({"t": "ok", "id": frame.id})

    def _h_unpack(self, frame: Frame) -> None:
        try:
            unpack_tar(frame.header["path"], frame.header["folder"])
        except tarfile.TarError as exc:
            raise OSError(errno.EINVAL, f"not a tar: {exc}") from exc
        self.writer.send({"t": "ok", "id": frame.id})

    def _h_entropy(self, frame: Frame) -> None:
        self._mix_entropy(frame.payload)
        self.writer.send({"t": "ok", "id": frame.id})

    def _mix_entropy(self, payload: bytes) -> None:
        """Mix host entropy into the kernel pool, reseed the CRNG and this process's ``random``."""
        if self._urandom_fd is None:
            # Kept open: this runs right after every restore, when each new
            # kernel path (here: an open()) costs fresh translations under TCG.
            self._urandom_fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        fd = self._urandom_fd
        credited = False
        if os.geteuid() == 0 and payload:
            # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
            info = struct.pack("ii", len(payload) * 8, len(payload))
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, info + payload)
                credited = True
            except OSError as exc:
                log.debug("RNDADDENTROPY failed (%s); mixing without credit", exc)
        if not credited:
            write_all(fd, payload)
        if credited:
            # A restored snapshot carries the kernel CRNG's state: without an
            # immediate reseed, two restores would hand out the same bytes
            # until the next scheduled reseed (up to a minute later).
            try:
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            except OSError as exc:
                log.debug("RNDRESEEDCRNG failed (%s)", exc)
        # The agent's own PRNG was cloned with the snapshot too.
        # An int seed: a bytes seed would run SHA-512 first (more cold code after a restore).
        random.seed(int.from_bytes(os.urandom(32), "big"))

    def _h_poweroff(self, frame: Frame) -> None:
        if os.getpid() != 1:
            raise OSError(errno.EPERM, "poweroff is only allowed when the agent is PID 1")
        os.sync()
        self.writer.send({"t": "ok", "id": frame.id})
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.reboot(ctypes.c_int(RB_POWER_OFF)) != 0:
            log.error("reboot(RB_POWER_OFF) failed: %s", os.strerror(ctypes.get_errno()))


# ---------------------------------------------------------------------------
# Process setup


def _ensure_std_fds() -> None:
    # If 0-2 were closed, pipes could land there and dup2 in children would clobber them.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


def _set_subreaper() -> None:
    # Outside the guest (tests) orphans of our children come back to us, as they would to PID 1.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _find_port(device: str) -> str | None:
    """Return the device node for ``device``, also when udev has not made the symlink."""
    if os.path.exists(device):
        return device
    wanted = os.path.basename(device)
    for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
        try:
            with open(name_file) as f:
                if f.read().strip() == wanted:
                    return "/dev/" + os.path.basename(os.path.dirname(name_file))
        except OSError:
            continue
    return None


def _open_device(device: str) -> int:
    deadline = time.monotonic() + DEVICE_WAIT
    while True:
        path = _find_port(device)
        if path is not None:
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.debug("opening %s: %s", path, exc)
        elif time.monotonic() >= deadline:
            raise FileNotFoundError(errno.ENOENT, "virtio port not found", device)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="pytest_gondolin.guest.agent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", help="virtio-serial port to serve")
    where.add_argument("--fd", type=int, help="connected socket/pipe fd to serve (tests)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="gondolin-agent[%(process)d] %(levelname)s %(message)s",
    )
    _ensure_std_fds()
    if args.fd is not None:
        fd: int = args.fd
        os.set_inheritable(fd, False)
        _set_subreaper()
        return Agent(fd, device=False).serve()
    while True:
        try:
            fd = _open_device(args.device)
            break
        except OSError as exc:
            log.error("cannot open %s: %s", args.device, exc)
            if os.getpid() != 1:
                return 1
            # PID 1 must not exit (the kernel would panic); keep trying.
    agent = Agent(fd, device=True)
    while True:
        try:
            agent.serve()
        except Exception:
            log.exception("agent loop crashed; restarting it")
            time.sleep(DISCONNECTED_POLL)
        if os.getpid() != 1:
            return 1


if __name__ == "__main__":
    sys.exit(main())
