"""Which Python runs the guest worker: the host's own carried in, the image's, or a clear refusal.

The host side is a real interpreter tree in ``tmp_path`` built from this
host's own files (its binary, ``libpython``, an extension module), patched
where a test needs a need the guest cannot meet; the guest side is the
facts an image reports (:class:`GuestFacts`), here as inputs.
"""

from __future__ import annotations

import io
import os
import platform
import re
import shutil
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_gondolin.errors import ImageError
from pytest_gondolin.guest import hostpath
from pytest_gondolin.sandbox import guest_facts as gf
from pytest_gondolin.sandbox import interpreter_pack
from pytest_gondolin.sandbox.host_python import Choice, HostLayout, choose, interpreter_key

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ELF hosts only")

HOST = HostLayout.current()
GLIBC = tuple(int(p) for p in platform.libc_ver()[1].split(".")[:2])


def _host_libraries() -> frozenset[str]:
    """Sonames in this host's default library folders: a guest that has what the host has."""
    facts = gf.GuestFacts(platform.machine(), (2, 0), "", frozenset())
    names: set[str] = set()
    for folder in facts.default_dirs():
        try:
            names.update(n for n in os.listdir(folder) if ".so" in n)
        except OSError:
            pass
    return frozenset(names)


FACTS = gf.GuestFacts(platform.machine(), (GLIBC[0], GLIBC[1]), "3.11.2", _host_libraries())


def _module(name: str) -> Path:
    found = sorted(Path(HOST.stdlib[0], "lib-dynload").glob(f"{name}.*.so"))
    if not found:
        pytest.skip(f"{name} is built into this interpreter")
    return found[0]


def _patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    at = data.find(old + b"\0")
    assert at > 0 and len(old) == len(new)
    path.write_bytes(data[:at] + new + data[at + len(old) :])


def _newest_glibc(path: Path) -> bytes:
    names = re.findall(rb"GLIBC_2\.[0-9.]+(?=\0)", path.read_bytes())
    return max(names, key=lambda n: tuple(int(p) for p in n[6:].split(b".")[:2]))


def _too_new(old: bytes) -> bytes:
    """A glibc version string of the same length naming glibc 9.x."""
    return (b"GLIBC_9." + b"9" * len(old))[: len(old)]


def _interpreter(tmp_path: Path) -> HostLayout:
    """A venv over an interpreter tree made of this host's real files."""
    base, venv = tmp_path / "base", tmp_path / "venv"
    stdlib = base / "lib" / "python3.x"
    for folder in (base / "bin", stdlib / "lib-dynload", stdlib / "__pycache__", venv / "bin"):
        folder.mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), base / "bin" / "python3.x")
    (base / "bin" / "python3").symlink_to("python3.x")
    (stdlib / "os.py").write_text("# os\n")
    (stdlib / "__pycache__" / f"os.{HOST.cache_tag}.pyc").write_bytes(b"pyc")
    (stdlib / "__pycache__" / f"os.{HOST.cache_tag}.opt-1.pyc").write_bytes(b"pyc")
    (stdlib / "__pycache__" / "os.cpython-30.pyc").write_bytes(b"pyc")
    for skipped in ("test", "site-packages", "idlelib"):
        (stdlib / skipped).mkdir()
        (stdlib / skipped / "x.py").write_text("")
    zlib = _module("zlib")
    shutil.copy2(zlib, stdlib / "lib-dynload" / zlib.name)
    libpython = None
    if HOST.libpython is not None:
        libpython = str(base / "lib" / os.path.basename(HOST.libpython))
        shutil.copy2(HOST.libpython, libpython)
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\n")
    (venv / "bin" / "python").symlink_to(base / "bin" / "python3")
    (venv / "bin" / "pip").write_text("#!/bin/sh\n")
    return HostLayout(
        executable=str(venv / "bin" / "python"),
        prefix=str(venv),
        base_prefix=str(base),
        version=HOST.version,
        implementation="cpython",
        cache_tag=HOST.cache_tag,
        soabi=HOST.soabi,
        stdlib=(str(stdlib),),
        libpython=libpython,
    )


def _carried(choice: Choice) -> dict[str, str | None]:
    assert choice.interpreter is not None, choice.reason
    return {f.path: f.link for f in (*choice.interpreter.files, *choice.interpreter.venv)}


def test_the_interpreter_tree_is_carried_at_its_paths(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    choice = choose(layout, FACTS)
    files = _carried(choice)
    base, venv = tmp_path / "base", tmp_path / "venv"
    stdlib = base / "lib" / "python3.x"
    assert files[str(venv / "bin" / "python")] == str(base / "bin" / "python3")
    assert files[str(base / "bin" / "python3")] == "python3.x"
    assert files[str(base / "bin" / "python3.x")] is None
    expected = [
        venv / "pyvenv.cfg",
        stdlib / "os.py",
        stdlib / "__pycache__" / f"os.{HOST.cache_tag}.pyc",
        stdlib / "lib-dynload" / _module("zlib").name,
    ]
    assert all(str(p) in files for p in expected), sorted(files)
    if layout.libpython is not None:
        assert layout.libpython in files
    left_out = [
        venv / "bin" / "pip",
        stdlib / "__pycache__" / "os.cpython-30.pyc",
        stdlib / "__pycache__" / f"os.{HOST.cache_tag}.opt-1.pyc",
        stdlib / "test" / "x.py",
        stdlib / "site-packages" / "x.py",
        stdlib / "idlelib" / "x.py",
    ]
    assert not [p for p in left_out if str(p) in files]
    assert choice.interpreter is not None and choice.interpreter.notes == ()
    assert (choice.version, choice.soabi) == (HOST.version, HOST.soabi)
    # The venv's own files travel apart from the (cached) base interpreter.
    assert {f.path for f in choice.interpreter.venv} == {
        str(venv / "bin" / "python"),
        str(venv / "pyvenv.cfg"),
    }


def test_venvs_of_one_interpreter_share_its_key(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    other = tmp_path / "venv2"
    (other / "bin").mkdir(parents=True)
    (other / "pyvenv.cfg").write_text("home = elsewhere\n")
    (other / "bin" / "python").symlink_to(tmp_path / "base" / "bin" / "python3")
    second = replace(layout, executable=str(other / "bin" / "python"), prefix=str(other))
    first_python, second_python = (
        choose(layout, FACTS).interpreter,
        choose(second, FACTS).interpreter,
    )
    assert first_python is not None and second_python is not None
    assert first_python.key == second_python.key
    assert first_python.venv != second_python.venv


def test_the_key_follows_the_content(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    first = interpreter_key(choose(layout, FACTS).interpreter)
    assert first == interpreter_key(choose(layout, FACTS).interpreter)
    os_py = tmp_path / "base" / "lib" / "python3.x" / "os.py"
    os.utime(os_py, ns=(0, os_py.stat().st_mtime_ns + 1_000_000_000))
    assert interpreter_key(choose(layout, FACTS).interpreter) not in ("", first)
    assert interpreter_key(None) == ""


def test_a_binary_needing_a_newer_glibc_is_refused_naming_both_versions(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    binary = tmp_path / "base" / "bin" / "python3.x"
    _patch(binary, _newest_glibc(binary), _too_new(_newest_glibc(binary)))
    guest = replace(FACTS, python="3.2.1")
    choice = choose(layout, guest)
    assert choice.interpreter is None
    assert choice.refusal is not None
    assert f"the host's Python {layout.version}" in choice.refusal
    assert "the image's Python is 3.2.1" in choice.refusal
    assert (choice.version, choice.soabi) == ("", "")
    assert re.search(r"python3\.x needs glibc 9\.\d+, the guest has \d+\.\d+", choice.refusal)
    # Negative control: the unpatched tree of the same test is carried.
    assert choose(_interpreter(tmp_path / "control"), guest).interpreter is not None


def test_the_image_python_of_the_same_minor_version_is_used_silently(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    binary = tmp_path / "base" / "bin" / "python3.x"
    _patch(binary, _newest_glibc(binary), _too_new(_newest_glibc(binary)))
    major, minor = layout.version.split(".")[:2]
    choice = choose(layout, replace(FACTS, python=f"{major}.{minor}.0"))
    assert choice.interpreter is None and choice.refusal is None
    assert choice.reason is not None and "needs glibc 9." in choice.reason
    assert choice.version == f"{major}.{minor}.0"
    assert choice.soabi == f"cpython-{major}{minor}-{platform.machine()}-linux-gnu"


def test_another_machine_is_refused(tmp_path: Path) -> None:
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    choice = choose(_interpreter(tmp_path), replace(FACTS, machine=other, python=""))
    assert choice.interpreter is None
    assert choice.refusal is not None and "the image's Python is missing" in choice.refusal
    assert choice.reason is not None and "the guest is EM_" in choice.reason


def test_an_extension_module_whose_library_exists_nowhere_is_left_out(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    module = tmp_path / "base" / "lib" / "python3.x" / "lib-dynload" / _module("zlib").name
    _patch(module, b"libz.so.1", b"libq.so.1")
    choice = choose(layout, FACTS)
    files = _carried(choice)
    assert str(module) not in files
    assert str(tmp_path / "base" / "lib" / "python3.x" / "os.py") in files
    assert choice.interpreter is not None
    (note,) = choice.interpreter.notes
    assert module.name in note and "libq.so.1" in note and "the host has none" in note


def test_a_library_the_guest_lacks_is_carried_from_the_host(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path)
    choice = choose(layout, replace(FACTS, libraries=FACTS.libraries - {"libz.so.1"}))
    files = _carried(choice)
    carried = [p for p in files if os.path.basename(p) == "libz.so.1"]
    assert carried, "libz.so.1 should be carried from the host"
    (libz,) = carried
    assert os.path.dirname(libz) in FACTS.default_dirs() + read_runpath(layout)
    assert choice.interpreter is not None and choice.interpreter.notes == ()
    source = next(f.source for f in choice.interpreter.files if f.path == libz)
    assert os.path.realpath(libz) == source


def read_runpath(layout: HostLayout) -> tuple[str, ...]:
    from pytest_gondolin.sandbox.elf_checks import read_elf

    module = next(Path(layout.stdlib[0], "lib-dynload").glob("zlib.*.so"))
    return read_elf(str(module)).runpath


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"base_prefix": "/usr"}, "it is installed in /usr, where the guest's own Python lives"),
        ({"implementation": "pypy"}, "it is pypy, only CPython is carried"),
    ],
)
def test_what_is_never_carried(tmp_path: Path, change: dict[str, str], reason: str) -> None:
    choice = choose(replace(_interpreter(tmp_path), **change), FACTS)
    assert choice.interpreter is None and choice.reason == reason


# -- guest facts ----------------------------------------------------------------


def _facts_text(machine: str = "x86_64", glibc: str = "glibc 2.36", python: str = "3.11.2") -> str:
    return f"{machine}\n@@\n{glibc}\n@@\n{python}\n@@\nlibz.so.1\nlibc.so.6\nld-linux.so\nREADME\n"


def test_parse_facts() -> None:
    facts = gf.parse_facts(_facts_text())
    assert facts == gf.GuestFacts(
        "x86_64", (2, 36), "3.11.2", frozenset({"libz.so.1", "libc.so.6", "ld-linux.so"})
    )
    assert gf.parse_facts(_facts_text(python="")).python == ""


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_facts_text(machine="vax"), "unknown machine 'vax'"),
        (_facts_text(glibc="musl 1.2"), "bad glibc version 'musl 1.2'"),
        (_facts_text(python="3.11.2; rm -rf /"), "bad Python version"),
        (_facts_text() + "@@\nmore\n", "5 sections, expected 4"),
        ("x" * (gf.MAX_FACTS_BYTES + 1), "over"),
        ("x86_64\n@@\nglibc 2.36\n@@\n3.11.2\n@@\n" + "libx.so.1\n" * 2, None),
    ],
)
def test_parse_facts_refuses_what_is_not_facts(text: str, match: str | None) -> None:
    if match is None:
        assert gf.parse_facts(text).libraries == {"libx.so.1"}
        return
    with pytest.raises(ValueError, match=re.escape(match)):
        gf.parse_facts(text)


class _Guest:
    """Answers :data:`FACTS_SCRIPT` like a guest would (counting how often it is asked)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked = 0

    def exec(self, cmd: str, *, timeout: float | None = None, check: bool = False) -> _Guest:
        assert cmd == gf.FACTS_SCRIPT
        self.asked += 1
        return self

    @property
    def stdout(self) -> str:
        return self.answer


def test_guest_facts_are_asked_once_per_image(tmp_path: Path) -> None:
    guest = _Guest(_facts_text())
    first = gf.guest_facts(guest, "bookworm-1", tmp_path)
    assert gf.guest_facts(guest, "bookworm-1", tmp_path) == first
    assert guest.asked == 1
    gf.guest_facts(guest, "bookworm-2", tmp_path)
    assert guest.asked == 2


def test_a_bad_answer_is_not_cached(tmp_path: Path) -> None:
    guest = _Guest(_facts_text(machine="vax"))
    with pytest.raises(ImageError, match=r"image img does not say .* unknown machine 'vax'"):
        gf.guest_facts(guest, "img", tmp_path)
    assert not list(tmp_path.glob("guest-*"))
    with pytest.raises(ValueError, match="bad image id"):
        gf.guest_facts(guest, "../../etc", tmp_path)


# -- packs ----------------------------------------------------------------------


def test_packs_hold_files_and_links_at_their_paths_and_are_cached(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path / "host")
    interpreter = choose(layout, FACTS).interpreter
    assert interpreter is not None
    cache = tmp_path / "cache"
    chunks = interpreter_pack.pack_chunks(interpreter, cache, chunk=1 << 20)
    assert len(chunks) >= 1
    members: dict[str, tarfile.TarInfo] = {}
    for data in chunks:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members.update((m.name, m) for m in tar.getmembers())
    assert len(members) == len(interpreter.files)
    with tarfile.open(fileobj=io.BytesIO(interpreter_pack.pack_venv(interpreter))) as tar:
        members.update((m.name, m) for m in tar.getmembers())
    link = members[layout.executable.lstrip("/")]
    assert link.issym() and link.linkname == str(tmp_path / "host" / "base" / "bin" / "python3")
    os_py = members[str(Path(layout.stdlib[0], "os.py")).lstrip("/")]
    assert os_py.isreg() and os_py.size == 5
    # Cached: the same packs come back without reading the host's files again.
    Path(layout.stdlib[0], "os.py").unlink()
    assert interpreter_pack.pack_chunks(interpreter, cache, chunk=1 << 20) == chunks
    items = interpreter_pack.layer_items(interpreter, cache)
    assert all(item.key.startswith(f"host-python:{interpreter.key}:") for item in items)


def test_packs_of_few_interpreters_are_kept(tmp_path: Path) -> None:
    layout = _interpreter(tmp_path / "host")
    interpreter = choose(layout, FACTS).interpreter
    assert interpreter is not None
    cache = tmp_path / "cache"
    keys = []
    for i in range(interpreter_pack.MAX_CACHED_INTERPRETERS + 2):
        os.utime(Path(layout.stdlib[0], "os.py"), ns=(0, (i + 1) * 10**9))
        fresh = choose(layout, FACTS).interpreter
        assert fresh is not None
        interpreter_pack.pack_chunks(fresh, cache)
        keys.append(fresh.key)
        os.utime(cache / f"{fresh.key}.json", ns=(0, (i + 1) * 10**9))
    kept = {p.stem for p in cache.glob("*.json")}
    assert kept == set(keys[-interpreter_pack.MAX_CACHED_INTERPRETERS :])
    assert {p.name.split(".")[0] for p in cache.glob("*.tar")} == kept


# -- the worker's sys.path --------------------------------------------------------


def test_site_folders_the_interpreter_set_up_are_not_added_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the host's own interpreter, ``site`` already ran the venv's .pth files."""
    own = tmp_path / "venv" / "site-packages"
    other = tmp_path / "user" / "site-packages"
    for folder in (own, other):
        folder.mkdir(parents=True)
        (folder / "count.pth").write_text(
            "import sys; sys.gondolin_pth_runs = getattr(sys, 'gondolin_pth_runs', 0) + 1\n"
        )
    monkeypatch.setattr(sys, "path", ["/stdlib", str(own), "/after"])
    monkeypatch.setattr(sys, "gondolin_pth_runs", 0, raising=False)
    hostpath.install([(hostpath.SITE, str(other)), (hostpath.SITE, str(own))])
    assert sys.gondolin_pth_runs == 1  # type: ignore[attr-defined]  # only the new folder's
    assert sys.path == ["/stdlib", str(other), str(own), "/after"]


def test_the_executable_is_named_without_dot_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    # `../venv/bin/python -m pytest` run from the project: the guest's worker
    # starts before the project folder exists there, so `..` must not be in it.
    real = sys.executable
    detour = os.path.join(os.path.dirname(real), "nowhere", "..", os.path.basename(real))
    monkeypatch.setattr(sys, "executable", detour)
    layout = HostLayout.current()
    assert layout.executable == real
    assert ".." not in layout.executable.split(os.sep)
