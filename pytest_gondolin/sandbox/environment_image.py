"""The host's environment as a file-system image the guest mounts, instead of a tar it unpacks.

A tar layer moves every byte twice through the guest's one emulated CPU
(the agent channel, then ``tar -x``): ~6 s of QEMU CPU for a 60 MiB venv.
Here the host builds an ext4 image of the carried files at their absolute
paths (``mkfs.ext4 -d``, 0.2-1 s for 60 MiB), the VM gets it read-only in its
environment slot (``vm/qemu.py``), and the layer (:func:`image_layer`) only
mounts it: the image read-only at :data:`GUEST_ROOT`/``image``, then over each
carried root folder (a site folder, ...) an overlay whose lower layer is that
folder of the image (and the guest's own folder, when it has one) and whose
upper layer is on the guest's disk. Paths are the host's (``__file__``,
``sys.path``) and the folders stay writable (``__pycache__``, a test writing
into site-packages): writes land in the upper folder, part of the snapshot.

Guarantees:

* **Content-addressed.** An image is named by the keys of what it carries
  (:attr:`~.host_environment.CarriedDistribution.key`, the loose ``.pth``
  files, the roots); a changed venv is a new image and a new layer key.
* **Never loaded wrong.** Each image gets a random id when built, kept with
  the ``stat`` of the image file in a side file; the layer's key holds the
  id. An image file missing, rebuilt or changed in place (its ``stat``
  differs) is built again with a new id, so no snapshot saved with the old
  one (whose guest has the old file system's metadata in memory) matches.
* **Nothing half-written is used.** A new image's file (``<content>-<id>.img``)
  exists, zeros, from :func:`prepare` on, so the VM can start on it while the
  layer's prepare thread builds it (:func:`image_layer`); the side file
  naming the id is written last (temporary name and rename), and an image no
  side file names is never reused (leftovers go after :data:`LEFTOVER_AGE`).
* **Built once.** Processes that need the same new image at once (xdist
  workers, parallel jobs) take the id its first one claimed
  (``<content>.claim``), so their layers have one key: one builds while
  holding the content's build lock, the others wait for it (at most
  :data:`BUILD_WAIT_TIMEOUT`, then a warning names the holder and the layer
  unpacks tars) and then find its side file. The lock goes with a builder
  that dies; the next one zeroes the image and builds it again, so nothing a
  killed builder wrote is used.
* **Bounded.** The carried size is capped by the scan
  (``gondolin_host_environment_limit``); the image must fit the slot
  (:data:`~pytest_gondolin.vm.qemu.ENV_SLOT_BYTES`). At most
  :data:`MAX_IMAGES` images are kept, the least recently used go first; a
  snapshot whose image went is then unusable by its key and rebuilt.

When no image can be made (no ``mkfs.ext4``, a cache that cannot be written,
a path an overlay mount option cannot hold), :func:`prepare` says why at
DEBUG and returns None: the caller uses the tar layer. A build that fails
while the VM starts makes the layer unpack the tars instead, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import ConfigError, GondolinError
from pytest_gondolin.sandbox.distribution_files import inside, outermost
from pytest_gondolin.sandbox.host_environment import HostEnvironment
from pytest_gondolin.vm.disk_backed import TMPFS_FOLDERS, backing_command
from pytest_gondolin.vm.layers import Layer, TarItem, tar_layer
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.qemu import ENV_SLOT_BYTES, ENV_SLOT_SERIAL
from pytest_gondolin.vm.slot_images import (
    MAX_IMAGES,
    build_lock,
    claim,
    claimed_id,
    drop_claim,
    evict_images,
    image_lock,
    image_path,
    images_folder,
    record_image,
    recorded_id,
    valid_id,
)

__all__ = [
    "GUEST_ROOT",
    "MAX_IMAGES",
    "EnvironmentImage",
    "image_layer",
    "image_roots",
    "mount_command",
    "prepare",
]

log = logging.getLogger(__name__)

#: Bumped when the image's layout or the way it is mounted changes.
IMAGE_FORMAT: Final = "env-image 1 (ext4, overlay per root)"
#: Where the guest mounts the image and keeps the overlays' upper folders (its disk).
GUEST_ROOT: Final = "/var/lib/gondolin/env"
#: ``mkfs.ext4 -d`` of 60 MiB takes ~0.3 s; 2 GiB on a loaded host far less than this.
MKFS_TIMEOUT: Final = 600.0
#: The side file's lock is held for a read or a rename (ms); the bound is for a hung file system.
IMAGE_LOCK_TIMEOUT: Final = 60.0
#: Another process building the same image holds its build lock about as long
#: as its ``mkfs.ext4`` may run: past this it is hung, and the layer unpacks tars.
BUILD_WAIT_TIMEOUT: Final = MKFS_TIMEOUT + 60.0
#: Mounting takes ~0.5 s under TCG; the bound covers a heavily loaded host.
MOUNT_TIMEOUT: Final = 120.0
#: Roots an overlay is never mounted on (the guest's own system).
_FORBIDDEN_ROOTS: Final = ("/proc", "/sys", "/dev", "/run", "/var/lib/gondolin", "/etc", "/boot")
#: Where ``mkfs.ext4`` is when ``PATH`` (a user's) lacks the sbin folders.
_SBIN: Final = "/usr/sbin:/sbin"


@dataclass(frozen=True)
class EnvironmentImage:
    """An image of the carried environment (built, or to be built) and the folders the guest mounts."""

    #: ``<content key>-<id>.img``: exists from :func:`prepare` on (zeros until built).
    path: Path
    #: Content key and the image's id: names the mounted state in a layer key.
    key: str
    #: Host folders (absolute) each mounted as an overlay in the guest.
    roots: tuple[str, ...]
    #: Builds the image (once; later calls wait for it or raise what it raised);
    #: None when it was built before.
    build: Callable[[], None] | None = field(default=None, compare=False, repr=False)


def _files(env: HostEnvironment) -> list[str]:
    return [*env.loose_files, *(f for d in env.carried for f in d.files)]


def image_roots(env: HostEnvironment) -> tuple[str, ...] | None:
    """The folders the guest mounts for ``env`` (None: one a mount cannot take).

    The outermost ``sys.path`` folders that hold a carried file, plus the
    folder of any file outside them.
    """
    entries = outermost(e.path for e in env.entries)
    used: set[str] = set()
    last = "\0"  # the folder the previous file was in, ending in "/": most files share it
    for name in _files(env):
        if name.startswith(last):  # one check for most of ~6,000 files (was 3-10 ms a session)
            continue
        home = next((e for e in entries if inside(name, e)), None)
        used.add(home if home is not None else os.path.dirname(name))
        last = (home if home is not None else os.path.dirname(name)).rstrip("/") + "/"
    roots = outermost(used)
    for root in roots:
        # ':' and ',' separate overlay options; a root must be below a top folder.
        if (
            not root.startswith("/")
            or any(c in root for c in ":,\\\n\t\"'")
            or root.count("/") < 2
            or any(inside(root, bad) or inside(bad, root) for bad in _FORBIDDEN_ROOTS)
        ):
            log.debug("no environment image: %r cannot be an overlay mount point", root)
            return None
    return roots


def _content_key(env: HostEnvironment, roots: Sequence[str]) -> str:
    loose = []
    for name in env.loose_files:
        try:
            st = os.stat(name)
        except OSError:
            continue
        loose.append([name, st.st_size, st.st_mtime_ns, st.st_mode])
    parts = [IMAGE_FORMAT, list(roots), sorted(d.key for d in env.carried), loose]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _mkfs() -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which("mkfs.ext4", path=f"{path}:{_SBIN}" if path else _SBIN)


def prepare(env: HostEnvironment, cache: Path) -> EnvironmentImage | None:
    """The image of ``env`` in ``cache``: reused, or to be built (None: it cannot be; see the module docstring).

    A new image's file is created empty (a VM can be started on it) and
    :attr:`EnvironmentImage.build` fills it: :func:`image_layer` runs that
    while the VM starts.
    """
    roots = image_roots(env)
    mkfs = _mkfs()
    if roots is None or (not env.carried and not env.loose_files):
        return None
    if mkfs is None:
        log.debug("no environment image: mkfs.ext4 is not installed")
        return None
    folder = images_folder(cache)
    if "," in str(folder):  # a comma ends a QEMU option
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not folder.is_dir():
            log.debug("no environment image: %s", exc)
            return None
    content = _content_key(env, roots)
    if not paths.can_write(folder):
        # A read-only cache: an image built before is used (its side file is
        # written last, by rename), none is built.
        image_id = valid_id(folder, content)
        if image_id is None:
            return None
        return EnvironmentImage(
            image_path(folder, content, image_id), f"{content}-{image_id}", roots
        )
    with image_lock(folder, content).acquire(timeout=IMAGE_LOCK_TIMEOUT):
        image_id = valid_id(folder, content)
        if image_id is not None:
            try:  # least recently used goes first (evict_images)
                os.utime(folder / f"{content}.json")
            except OSError:
                pass
            return EnvironmentImage(
                image_path(folder, content, image_id), f"{content}-{image_id}", roots
            )
        # A build of this content under way (or abandoned): the same id, so
        # this process waits for that build (or takes it over) and its layer
        # key is the other's: the layer's lock then lets one save the snapshot
        # and the other restore it (vm/layers.py).
        claimed = claimed_id(folder, content)
        if claimed is not None:
            image_id = claimed[0]
        else:
            image_id = str(uuid.uuid4())
            try:
                with image_path(folder, content, image_id).open("xb") as empty:
                    empty.truncate(ENV_SLOT_BYTES)  # sparse: the slot's capacity never changes
                claim(folder, content, image_id)
            except OSError as exc:
                log.debug("no environment image: %s", exc)
                return None
    image = image_path(folder, content, image_id)
    build = _Build(env, roots, mkfs, image, content, image_id)
    return EnvironmentImage(image, f"{content}-{image_id}", roots, build.run)


class _Build:
    """Fills one new image, once: stage the files, ``mkfs.ext4 -d``, then its side file."""

    def __init__(
        self,
        env: HostEnvironment,
        roots: Sequence[str],
        mkfs: str,
        image: Path,
        content: str,
        image_id: str,
    ) -> None:
        self._env, self._roots, self._mkfs = env, tuple(roots), mkfs
        self._image, self._content, self._id = image, content, image_id
        self._lock = threading.Lock()
        self._done = False
        self._error: GondolinError | None = None

    def run(self) -> None:
        """Build it, or wait for the build under way; raises GondolinError when it failed."""
        with self._lock:
            if not self._done:
                self._done = True
                try:
                    self._build()
                except GondolinError as exc:
                    self._error = exc
                except (OSError, subprocess.SubprocessError) as exc:
                    self._error = GondolinError(
                        f"the host environment's image {self._image}: {exc}"
                    )
            if self._error is not None:
                raise self._error

    def _build(self) -> None:
        folder = self._image.parent
        lock = build_lock(folder, self._content)
        try:
            lock.acquire(timeout=BUILD_WAIT_TIMEOUT)
        except filelock.Timeout:
            raise GondolinError(self._stuck()) from None
        try:
            with image_lock(folder, self._content).acquire(timeout=IMAGE_LOCK_TIMEOUT):
                recorded = recorded_id(folder, self._content)
            if recorded is not None and recorded[0] == self._id:
                if valid_id(folder, self._content) != self._id:
                    raise GondolinError(
                        f"the host environment's image {self._image} changed after it was built"
                    )
                log.info(
                    "the host environment's image %s was built by another process", self._image
                )
                return
            # Nobody is building this id and no side file names it: whatever
            # a builder killed before the end wrote there goes.
            with self._image.open("r+b") as image:
                image.truncate(0)
                image.truncate(ENV_SLOT_BYTES)
            count = self._make()
            with image_lock(folder, self._content).acquire(timeout=IMAGE_LOCK_TIMEOUT):
                side = record_image(folder, self._content, self._id)
                drop_claim(folder, self._content, self._id)
                evict_images(folder, keep=side)
        finally:
            lock.release()
        log.info("built the host environment's image %s (%d files)", self._image, count)

    def _stuck(self) -> str:
        """Why the wait for another builder of this image ended: its holder, for how long."""
        claimed = claimed_id(self._image.parent, self._content)
        who = "another process"
        if claimed is not None and claimed[0] == self._id:
            who = f"process {claimed[1]} (since {time.time() - claimed[2]:.0f} s ago)"
        return (
            f"gave up after {BUILD_WAIT_TIMEOUT:.0f} s waiting for {who} to finish building the "
            f"host environment's image {self._image}; it holds "
            f"{paths.lock_path(self._image.parent / f'{self._content}.build.lock')}. If that "
            "process is hung, end it: the next session builds the image"
        )

    def _make(self) -> int:
        """Stage the carried files and ``mkfs.ext4 -d`` them into the image; how many went in."""
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=self._image.parent))
        try:
            data_blocks, count = 0, 0
            for root in self._roots:
                (stage / root.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for name in _files(self._env):
                target = stage / name.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(name, target)  # same file system: no copy
                except OSError:
                    try:
                        shutil.copy2(name, target)  # keeps the mtime the host's .pyc checks
                    except OSError as exc:
                        log.debug("environment image: %s left out: %s", name, exc)
                        continue
                data_blocks += -(-target.stat().st_size // 4096)
                count += 1
            inodes = 2 * count + 1024  # files, their folders, slack
            size = data_blocks * 4096 + inodes * 512 + 32 * 2**20
            if size > ENV_SLOT_BYTES:
                raise ConfigError(
                    f"the host environment's image would be {size / 2**30:.1f} GiB, over the "
                    f"{ENV_SLOT_BYTES // 2**30} GiB of the guest's environment slot"
                )
            argv = [
                self._mkfs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
                "-N", str(inodes), "-U", self._id, "-E", "root_owner=0:0,nodiscard",
                "-L", "gondolin-env", "-d", str(stage), str(self._image), f"{-(-size // 1024)}k",
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=MKFS_TIMEOUT)
            if done.returncode != 0:
                raise GondolinError(
                    f"{self._mkfs} exited {done.returncode} building the host environment's "
                    f"image {self._image}: {done.stderr.strip()[-500:]}"
                )
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return count


def _tmpfs_folders(roots: Sequence[str]) -> list[str]:
    """The ``<tmpfs mount>/<first component>`` folders holding ``roots`` (``vm/disk_backed.py``)."""
    found = set()
    for root in roots:
        for mount in TMPFS_FOLDERS:
            if inside(root, mount) and root != mount:
                found.add(f"{mount}/{root[len(mount) + 1 :].split('/')[0]}")
    return sorted(found)


def mount_command(roots: Sequence[str]) -> str:
    """The guest's shell command that mounts the slot's image and an overlay over each root.

    The slot is found by its serial; the kernel's clean caches are dropped
    first (it read zeros from the slot at boot). Roots under the guest's tmpfs
    folders are first bound to its disk, as the project copy does, so that a
    later bind of the same folder never hides an overlay.
    """
    base = GUEST_ROOT
    uppers = [(f"{base}/upper/{i}", f"{base}/work/{i}") for i in range(len(roots))]
    folders = [f"{base}/image", *roots, *(d for pair in uppers for d in pair)]
    # Shell builtins where they do: each process started costs tens of ms under TCG.
    steps = [
        'dev=""',
        f'for b in /sys/block/vd*; do s=; read -r s < $b/serial || true; [ "$s" = {ENV_SLOT_SERIAL} ]'
        " && dev=/dev/${b##*/}; done",
        '[ -n "$dev" ] || { echo "no environment slot in this guest" >&2; exit 1; }',
        # The kernel read zeros there at boot (partition scan) and may still
        # cache them; dropping clean caches forgets them (BLKFLSBUF, without a process).
        "echo 3 > /proc/sys/vm/drop_caches",
        backing_command(_tmpfs_folders(roots)),
        "mkdir -p " + " ".join(shlex.quote(f) for f in folders),
        f'mount -t ext4 -o ro,noload "$dev" {base}/image',
    ]
    for root, (upper, work) in zip(roots, uppers, strict=True):
        r, lower = shlex.quote(root), shlex.quote(f"{base}/image{root}")
        steps += [
            # The guest's own files in that folder stay visible under the image's.
            f"lower={lower}",
            f"for f in {r}/* {r}/.[!.]* {r}/..?*; do"
            f' if [ -e "$f" ] || [ -L "$f" ]; then lower={lower}:{r}; break; fi; done',
            f'mount -t overlay -o "lowerdir=$lower,upperdir={upper},workdir={work}" gondolin-env {r}',
        ]
    return "set -e\n" + "\n".join(steps)


def _abandon(image: EnvironmentImage) -> None:
    """Drop the claim naming ``image`` (its build failed here): later sessions take a new id."""
    content, image_id = image.key.split("-", 1)
    try:
        with image_lock(image.path.parent, content).acquire(timeout=IMAGE_LOCK_TIMEOUT):
            drop_claim(image.path.parent, content, image_id)
    except OSError as exc:  # filelock.Timeout is one
        log.debug("the claim on %s stays: %s", image.path, exc)


def image_layer(
    name: str,
    image: EnvironmentImage,
    items: Sequence[TarItem],
    *,
    fallback: Sequence[TarItem] = (),
) -> Layer:
    """A layer that mounts ``image`` (in the VM's environment slot), then unpacks ``items``.

    ``items`` are what the image does not carry (requirements fetched for
    the guest, ...), unpacked as :func:`~pytest_gondolin.vm.layers.tar_layer`
    does. A new image is built by the layer's :attr:`~Layer.prepare`, while
    the VM starts; if that fails, the layer unpacks ``fallback`` (the same
    files as tars) instead, with a warning. Its key names the image's id,
    which later sessions do not take (no side file names it and its claim is
    dropped), so such a snapshot is not loaded again -- unless another process
    that was building that id finishes it after all; the snapshot then holds
    the same files, unpacked instead of mounted.
    """
    rest = tar_layer(name, items) if items else None
    key = hashlib.sha256(
        "\n".join([IMAGE_FORMAT, image.key, rest.key if rest else ""]).encode()
    ).hexdigest()[:24]
    command = mount_command(image.roots)
    build = image.build

    def prepare() -> None:
        if build is not None:
            try:
                build()
            except GondolinError:
                log.debug("building the environment image failed", exc_info=True)  # apply says it
        if rest is not None and rest.prepare is not None:
            rest.prepare()

    def apply(vm: VM) -> None:
        if build is not None:
            try:
                build()
            except GondolinError as exc:
                log.warning("%s; unpacking the host environment instead", exc)
                _abandon(image)  # this layer's key names an id no later session takes
                tar_layer(name, [*fallback, *items]).apply(vm)
                return
        vm.exec(["sh", "-c", command], check=True, timeout=MOUNT_TIMEOUT)
        if rest is not None:
            rest.apply(vm)

    return Layer(name, key, apply, prepare, drive=image.path)
