"""The host's own Python interpreter, carried into the guest at the same paths when it can run there.

A sandboxed test must run under the Python that started pytest, not the
image's (Debian 12: CPython 3.11.2). :func:`choose` decides, from the host's
interpreter (:class:`HostLayout`) and what the guest offers
(:class:`GuestFacts`, asked once per image with :data:`FACTS_SCRIPT` and
cached), one of:

* **carry it** (:class:`HostInterpreter`): the ``sys.base_prefix`` tree the
  interpreter needs (listed by :mod:`.interpreter_files`: the binary, ``libpython`` when shared, the standard
  library with ``lib-dynload``; not ``site-packages`` (the environment goes
  through :mod:`.host_environment`), ``test/``, bytecode of other
  interpreters or optimisation levels, IDLE,
  tkinter, turtledemo, ensurepip or the static ``libpython.a``), plus a
  venv's ``pyvenv.cfg`` and ``bin/python*`` links, all at their host paths,
  so the worker runs as the host's ``sys.executable`` with the host's
  ``sys.prefix``. Checked first: every ELF object (binary, ``libpython``,
  extension modules) is built for the guest's machine, needs no newer glibc
  than the guest's, and finds each ``DT_NEEDED`` library in the guest or
  carried from the host (:mod:`.elf_checks`). An extension module that fails
  a check is left out and named once; the binary or ``libpython`` failing
  refuses the whole interpreter.
* **the image's Python** (``interpreter=None``), when carrying is refused
  and the image's Python has the host's major.minor: today's path, silently;
* **a refusal** (``message``) naming both versions and why, when it has not:
  the session fails its sandboxed tests with that message instead of running
  them under another Python (a SyntaxError at best).

The carried files are packed once into tars in the cache
(:mod:`.interpreter_pack`), keyed by :attr:`HostInterpreter.key`: every carried
path with its size, mtime and mode (:func:`interpreter_key`), so a cached
guest layer can be keyed by it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pytest_gondolin.sandbox import elf_checks
from pytest_gondolin.sandbox import interpreter_files as interpreter_files_module
from pytest_gondolin.sandbox.elf_checks import (
    MACHINES,
    ElfNeeds,
    ElfReadError,
    is_elf,
    read_elf,
    why_not_runnable,
)
from pytest_gondolin.sandbox.guest_facts import GuestFacts, image_facts
from pytest_gondolin.sandbox.host_environment import report_once
from pytest_gondolin.sandbox.interpreter_files import (
    SKIPPED_DIRS,
    CarriedFile,
    HostLayout,
    carried_file,
    interpreter_files,
    link_chain,
)
from pytest_gondolin.vm.identity import VMConfig

__all__ = [
    "CarriedFile",
    "Choice",
    "HostInterpreter",
    "HostLayout",
    "choice_entry",
    "choose",
    "decide",
    "interpreter_key",
]

log = logging.getLogger(__name__)

#: Libraries carried from the host for one interpreter, transitively.
MAX_CARRIED_LIBRARIES: Final = 64
#: Bumped when the carried layout or the pack format changes.
_FORMAT: Final = "1"


@dataclass(frozen=True)
class HostInterpreter:
    """The host's interpreter as carried into the guest (see the module docstring)."""

    executable: str
    prefix: str
    version: str
    #: The base interpreter's files (and host libraries carried for it): the
    #: cached layer, keyed by :attr:`key`.
    files: tuple[CarriedFile, ...]
    #: The venv's own files (``pyvenv.cfg``, ``bin/python*`` links), a few
    #: hundred bytes copied each session with the project, so one layer
    #: serves every venv made from the same interpreter.
    venv: tuple[CarriedFile, ...] = field(default=())
    #: Extension modules left out, and why.
    notes: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return interpreter_key(self)

    @property
    def size(self) -> int:
        return sum(f.size for f in (*self.files, *self.venv))


@dataclass(frozen=True)
class Choice:
    """Which Python runs the guest worker (see the module docstring)."""

    #: The host's interpreter, carried; None: the image's ``python3``.
    interpreter: HostInterpreter | None
    #: Why the host's interpreter is not carried (None: it is).
    reason: str | None = None
    #: Set when neither can run the tests: the message the session fails them with.
    refusal: str | None = None
    #: The Python that runs the worker: its version (``3.11.7``) and extension
    #: ABI (``cpython-311-x86_64-linux-gnu``), which binary wheels carried or
    #: fetched for the guest must match ("" when refused).
    version: str = ""
    soabi: str = ""


def interpreter_key(interpreter: HostInterpreter | None) -> str:
    """The content key of the carried layer ("" for the image's Python): paths, sizes, mtimes, modes.

    Over the base interpreter's files only: venvs made from one interpreter share it.
    """
    if interpreter is None:
        return ""
    h = hashlib.sha256(f"host-python {_FORMAT}\n".encode())
    for f in interpreter.files:
        h.update(f"{f.path}\0{f.source}\0{f.link}\0{f.size}\0{f.mtime_ns}\0{f.mode}\n".encode())
    return h.hexdigest()[:32]


class _Linker:
    """Resolves ``DT_NEEDED`` names against the guest, the carried files and the host's libraries."""

    def __init__(self, facts: GuestFacts, files: dict[str, CarriedFile]) -> None:
        self.facts = facts
        self.files = files
        self.machine = MACHINES[facts.machine]
        # Sonames the carried tree provides (libpython), by file name.
        self.provided = {os.path.basename(p) for p in files if ".so" in os.path.basename(p)}
        self.libraries: dict[str, CarriedFile] = {}  # carried from the host, by guest path
        self.failed: dict[str, str] = {}  # soname -> why it cannot be carried

    def why_not(self, path: str) -> str | None:
        """Why ``path`` cannot run in the guest, carrying the host libraries it lacks; None: it can."""
        try:
            needs = read_elf(path)
        except ElfReadError as exc:
            return str(exc)
        return self._check(path, needs, depth=0)

    def _have(self) -> frozenset[str]:
        carried = {os.path.basename(p) for p in self.libraries}
        return self.facts.libraries | self.provided | carried

    def _check(self, path: str, needs: ElfNeeds, depth: int) -> str | None:
        for name in needs.needed:
            if name in self._have():
                continue
            why = self.failed.get(name) or self._carry(name, needs.runpath, depth)
            if why is not None:
                self.failed[name] = why
                return f"{path} needs {name}: {why}"
        return why_not_runnable(
            path, needs, machine=self.machine, glibc=self.facts.glibc, libraries=self._have()
        )

    def _carry(self, name: str, runpath: tuple[str, ...], depth: int) -> str | None:
        """Carry host library ``name`` where the guest's linker finds it; None on success."""
        if depth > 8 or len(self.libraries) >= MAX_CARRIED_LIBRARIES:
            return "too many libraries to carry"
        for folder in (*runpath, *self.facts.default_dirs()):
            host = os.path.join(folder, name)
            if not os.path.isfile(host):
                continue
            source = os.path.realpath(host)
            carried = carried_file(host, source)
            if carried is None:
                continue
            self.libraries[host] = carried  # before the check: a cycle ends here
            try:
                why = self._check(source, read_elf(source), depth + 1)
            except ElfReadError as exc:
                why = str(exc)
            if why is None:
                return None
            del self.libraries[host]
            return f"the guest lacks it and the host's copy cannot go there ({why})"
        return "the guest lacks it and the host has none"


def choose(layout: HostLayout, facts: GuestFacts) -> Choice:
    """Carry ``layout``'s interpreter, fall back to the image's Python, or refuse (module docstring)."""
    interpreter, reason = _plan(layout, facts)
    if interpreter is not None:
        return Choice(interpreter, version=layout.version, soabi=layout.soabi)
    assert reason is not None
    guest = facts.python
    if guest and guest.split(".")[:2] == layout.version.split(".")[:2]:
        major, minor = guest.split(".")[:2]
        return Choice(
            None, reason, version=guest, soabi=f"cpython-{major}{minor}-{facts.multiarch}"
        )
    return Choice(
        None,
        reason,
        refusal=(
            f"the guest cannot run the host's Python {layout.version} ({layout.executable}): "
            f"{reason}; and the image's Python is "
            + (guest if guest else "missing")
            + f", not {layout.major_minor}: sandboxed tests would run under another Python. "
            "Run pytest with a Python the guest can run (same machine, glibc no newer than "
            f"{facts.glibc[0]}.{facts.glibc[1]}) or use an image whose Python is {layout.major_minor}."
        ),
    )


def _plan(layout: HostLayout, facts: GuestFacts) -> tuple[HostInterpreter | None, str | None]:
    if layout.implementation != "cpython":
        return None, f"it is {layout.implementation}, only CPython is carried"
    if os.path.normpath(layout.base_prefix) in ("/", "/usr"):
        return None, (
            f"it is installed in {layout.base_prefix}, where the guest's own Python lives"
        )
    try:
        files = interpreter_files(layout)
        binary = link_chain(layout.executable)[-1]
    except OSError as exc:
        return None, f"its files cannot be read ({exc})"
    linker = _Linker(facts, files)
    core = [binary] + ([layout.libpython] if layout.libpython else [])
    for path in core:
        if path not in files:
            return None, f"{path} is missing"
        why = linker.why_not(path)
        if why is not None:
            return None, why
    notes: list[str] = []
    for path in [p for p, f in files.items() if f.link is None and p not in core]:
        if ".so" in os.path.basename(path) and is_elf(path):
            why = linker.why_not(path)
            if why is not None:
                del files[path]
                notes.append(f"{os.path.basename(path)} left out: {why}")
    carried = {**files, **linker.libraries}
    venv = os.path.normpath(layout.prefix) + "/"
    in_venv = sorted(
        p
        for p in carried
        if layout.prefix != layout.base_prefix
        and p.startswith(venv)
        and not p.startswith(os.path.normpath(layout.base_prefix) + "/")
    )
    interpreter = HostInterpreter(
        executable=layout.executable,
        prefix=layout.prefix,
        version=layout.version,
        files=tuple(carried[p] for p in sorted(carried) if p not in in_venv),
        venv=tuple(carried[p] for p in in_venv),
        notes=tuple(notes),
    )
    return interpreter, None


def decide(
    config: VMConfig, cache: Path, *, progress: Callable[[str], None] | None = None
) -> Choice:
    """Which Python runs the guest worker for ``config``'s image (module docstring).

    The image's facts are asked once per image (:func:`.guest_facts.image_facts`).
    The host's files are checked (0.3-0.4 s: their ELF checks) when the
    interpreter's folders changed since the last session on this image, else
    the choice comes from ``cache`` (:func:`_cached_choice`, ~0.03 s).
    Extension modules left out are named once, as a warning.
    """
    facts = image_facts(config, cache, progress=progress)
    layout = HostLayout.current()
    entry = choice_entry(cache, layout, facts)
    stamp = _folder_stamp(layout)
    choice = _cached_choice(entry, stamp)
    if choice is None:
        choice = choose(layout, facts)
        _save_choice(entry, stamp, choice, layout)
    if choice.interpreter is not None and choice.interpreter.notes:
        report_once(
            ["pytest-gondolin: parts of the host's Python are not carried into the guest:"]
            + [f"  {note}" for note in choice.interpreter.notes]
        )
    elif choice.reason is not None and choice.refusal is None:
        log.info(
            "the guest runs the image's Python: the host's cannot run there (%s)", choice.reason
        )
    return choice


def choice_entry(cache: Path, layout: HostLayout, facts: GuestFacts) -> Path:
    """The file in ``cache`` that holds the choice for ``layout`` on an image with ``facts``.

    The same in every process: the library set goes in sorted (a
    frozenset's repr follows string hashing, which differs between
    processes; the cache was once never hit, 0.15 s every session).
    """
    key = (_FORMAT, layout, facts.machine, facts.glibc, facts.python, sorted(facts.libraries))
    return cache / f"choice-{_digest(repr(key))}.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _folder_stamp(layout: HostLayout) -> str:
    """The mtimes of the interpreter's folders (and its link chain, ``libpython``, venv).

    A file added, removed or replaced (pip, an upgrade: a rename) changes its
    folder's mtime; a file rewritten in place does not, and is not noticed.
    This module, the file list's and the ELF checks' are in it too: new
    checks, a new choice.
    """
    parts: list[str] = []
    paths = [__file__, interpreter_files_module.__file__, elf_checks.__file__]
    paths += link_chain(layout.executable)
    paths += [layout.libpython or "", layout.prefix]
    paths += [os.path.join(layout.prefix, "bin"), os.path.join(layout.prefix, "pyvenv.cfg")]
    for folder in layout.stdlib:
        for dirpath, dirnames, _ in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            paths.append(dirpath)
    for path in paths:
        try:
            st = os.lstat(path)
            parts.append(f"{path}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_size}")
        except OSError:
            parts.append(f"{path}\0-")
    return _digest("\n".join(parts))


def _cached_choice(entry: Path, stamp: str) -> Choice | None:
    """The choice saved in ``entry`` if the folders still have ``stamp`` and the
    files carried from outside them (host libraries) are unchanged; else None."""
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        if saved.get("stamp") != stamp:
            return None
        data = saved["choice"]
        interpreter = None
        if data["interpreter"] is not None:
            raw = data["interpreter"]
            files = tuple(CarriedFile(**f) for f in raw["files"])
            for f in files:
                if f.source not in raw["inside"] and carried_file(f.path, f.source) != f:
                    return None
            interpreter = HostInterpreter(
                raw["executable"],
                raw["prefix"],
                raw["version"],
                files,
                tuple(CarriedFile(**f) for f in raw["venv"]),
                tuple(raw["notes"]),
            )
        return Choice(interpreter, data["reason"], data["refusal"], data["version"], data["soabi"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.debug("no cached interpreter choice in %s: %s", entry, exc)
        return None


def _save_choice(entry: Path, stamp: str, choice: Choice, layout: HostLayout) -> None:
    """Save ``choice`` for :func:`_cached_choice`; a read-only cache keeps nothing."""
    data = dataclasses.asdict(choice)
    interpreter = choice.interpreter
    if interpreter is not None:
        stdlib = tuple(os.path.normpath(f) + "/" for f in layout.stdlib)
        data["interpreter"]["inside"] = [
            f.source for f in interpreter.files if f.source.startswith(stdlib)
        ]
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "choice": data}), encoding="utf-8")
        os.replace(tmp, entry)
    except OSError as exc:
        log.debug("interpreter choice not cached in %s: %s", entry, exc)
