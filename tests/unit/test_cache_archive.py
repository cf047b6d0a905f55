"""``gondolin cache export`` / ``import`` on small real caches (real tar files, real qemu-img).

The caches here hold a tiny image (a 1 MiB qcow2 root disk), a CA and qcow2
snapshots on it, so every test runs in well under a second; booting from an
imported cache is in ``tests/integration/test_cache_archive.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_gondolin.errors import ImageError
from pytest_gondolin.image.archive import export_cache, host_facts
from pytest_gondolin.image.archive_import import import_cache
from pytest_gondolin.image.archive_manifest import (
    MANIFEST_MEMBER,
    HostFacts,
    check_path,
    parse_manifest,
)
from pytest_gondolin.image.info import qcow2_backing_file
from pytest_gondolin.image.manifest import write_manifest
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.vm import payload

FACTS = HostFacts("QEMU emulator version 7.2.22", "pc-q35-7.2", "tcg")
IMAGE = "tiny-0123456789abcdef"
KEY = "0123456789abcdef01234567"


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def make_cache(root: Path) -> Path:
    """A cache with one image, its CA, a warm snapshot, a layer on it and a plain data file."""
    image = root / "images" / IMAGE
    image.mkdir(parents=True)
    (image / "vmlinuz").write_bytes(b"kernel" * 1000)
    (image / "initrd.img").write_bytes(b"initrd" * 1000)
    _qemu_img("create", "-q", "-f", "qcow2", str(image / "rootfs.qcow2"), "1M")
    write_manifest(image, {"name": "tiny", "build_id": "0123456789abcdef"})
    (root / "images" / ".locks").mkdir()
    CertificateAuthority.load_or_create(root / "ca")
    snaps = root / "snapshots"
    (snaps / "layers").mkdir(parents=True)
    base = image / "rootfs.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(snaps / f"{KEY}.qcow2")
    )
    layered = snaps / f"{KEY}+{'a' * 24}.qcow2"  # a layered snapshot (vm/snapshot_paths.py)
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(layered))
    (snaps / f"{KEY}.lock").touch()
    (snaps / f".{KEY}.qcow2.77.tmp").write_bytes(b"half")
    layer = snaps / "layers" / "worker.qcow2"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(snaps / f"{KEY}.qcow2"), str(layer)
    )
    (snaps / "layers" / "worker.json").write_text('{"x": 1}')
    return root


def _files(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (qcow2 headers differ after a rebase)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith((".qcow2", ".lock"))
    }


@pytest.fixture
def cache_a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_cache(tmp_path / "a")
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(root))
    return root


def _export(archive: Path, facts: HostFacts = FACTS) -> list[str]:
    lines: list[str] = []
    done = export_cache(archive, progress=lines.append, facts=facts)
    assert done.path == archive
    return lines


def _import_into(
    root: Path, archive: Path, monkeypatch: pytest.MonkeyPatch, here: HostFacts | None = FACTS
):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(root))
    return import_cache(archive, progress=lambda msg: None, here=here)


@pytest.mark.parametrize("name", ["cache.tar", "cache.tar.gz"])
def test_export_then_import_into_an_empty_cache(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    archive = tmp_path / name
    _export(archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == MANIFEST_MEMBER
    assert f"snapshots/{KEY}.lock" not in names and not any(".tmp" in n for n in names)

    b = tmp_path / "b"
    done = _import_into(b, archive, monkeypatch)
    assert done.skipped == ()
    assert f"images/{IMAGE}" in done.installed and "ca" in done.installed
    expected = {k: v for k, v in _files(cache_a).items() if not k.endswith((".lock", ".tmp"))}
    assert _files(b) == expected
    # Every snapshot now sits on this cache's files, never on the exporting cache's.
    assert qcow2_backing_file(b / "snapshots" / f"{KEY}.qcow2") == str(
        b / "images" / IMAGE / "rootfs.qcow2"
    )
    assert qcow2_backing_file(b / "snapshots" / "layers" / "worker.qcow2") == str(
        b / "snapshots" / f"{KEY}.qcow2"
    )
    assert qcow2_backing_file(b / "snapshots" / f"{KEY}+{'a' * 24}.qcow2") == str(
        b / "images" / IMAGE / "rootfs.qcow2"
    )
    assert (b / "ca" / "gondolin-ca.key").stat().st_mode & 0o777 == 0o600
    assert not list(b.glob(".import-*"))


def test_a_second_import_changes_nothing(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    _import_into(tmp_path / "b", archive, monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*")}
    again = _import_into(tmp_path / "b", archive, monkeypatch)
    assert again.installed == ()
    assert f"images/{IMAGE}" in again.present and f"snapshots/{KEY}.qcow2" in again.present
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*")} == before


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("qemu", "QEMU emulator version 9.9.0", "QEMU"),
        ("machine", "pc-q35-9.9", "machine type"),
        ("accel", "kvm", "accelerator"),
    ],
)
def test_a_snapshot_of_another_host_is_skipped_and_the_image_kept(
    cache_a: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    value: str,
    words: str,
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive, HostFacts(**{**FACTS.to_json(), field: value}))
    b = tmp_path / "b"
    done = _import_into(b, archive, monkeypatch)
    assert f"images/{IMAGE}" in done.installed
    skipped = [line for line in done.skipped if line.startswith(f"snapshots/{KEY}.qcow2")]
    assert skipped and words in skipped[0] and value in skipped[0], done.skipped
    assert not (b / "snapshots" / f"{KEY}.qcow2").exists()
    assert (b / "images" / IMAGE / "rootfs.qcow2").exists()


def test_without_qemu_here_only_snapshots_are_skipped(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    done = _import_into(tmp_path / "b", archive, monkeypatch, here=None)
    assert all("no usable QEMU" in line for line in done.skipped) and len(done.skipped) == 4
    assert f"images/{IMAGE}" in done.installed


def _member_offset(archive: Path, name: str) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember(name).offset_data


@pytest.mark.parametrize("member", [f"images/{IMAGE}/vmlinuz", f"snapshots/{KEY}.qcow2"])
def test_a_tampered_byte_is_refused_and_nothing_is_written(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    offset = _member_offset(archive, member) + 100
    with archive.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))
    b = tmp_path / "b"
    with pytest.raises(ImageError, match=f"{member} does not match its SHA-256"):
        _import_into(b, archive, monkeypatch)
    assert sorted(p.name for p in b.iterdir()) == []  # no staging left, nothing installed


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_a_truncated_archive_is_refused_and_nothing_is_written(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    with archive.open("r+b") as fh:
        fh.truncate(int(archive.stat().st_size * fraction))
    b = tmp_path / "b"
    with pytest.raises(ImageError, match="damaged or truncated"):
        _import_into(b, archive, monkeypatch)
    assert list(b.iterdir()) == []


def test_a_truncated_compressed_archive_is_refused(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cache.tar.gz"
    _export(archive)
    with archive.open("r+b") as fh:
        fh.truncate(archive.stat().st_size // 2)
    with pytest.raises(ImageError, match="damaged or truncated"):
        _import_into(tmp_path / "b", archive, monkeypatch)
    assert list((tmp_path / "b").iterdir()) == []


def _hostile(
    archive: Path, files: list[dict[str, object]], members: list[tarfile.TarInfo], data: bytes = b""
) -> None:
    doc = {
        "format": 1,
        "producer": "x",
        "created": "x",
        "cache_root": "/somewhere",
        "host": FACTS.to_json(),
        "files": files,
    }
    blob = json.dumps(doc).encode()
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(MANIFEST_MEMBER)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        for member in members:
            tar.addfile(member, io.BytesIO(data * member.size) if member.isreg() else None)


def _entry(path: str, data: bytes, kind: str = "snapshot") -> dict[str, object]:
    entry: dict[str, object] = {
        "path": path,
        "kind": kind,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if kind == "snapshot":
        entry.update(state_key="k", backing=None, host=FACTS.to_json())
    return entry


def _reg(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


HOSTILE = {
    "dot-dot in the manifest": (
        [_entry("snapshots/../../evil", b"x")],
        [_reg("snapshots/../../evil", 1)],
    ),
    "absolute path in the manifest": ([_entry("/tmp/evil", b"x")], [_reg("/tmp/evil", 1)]),
    "member not in the manifest": ([], [_reg("../evil", 1)]),
    "symlink member": (
        [_entry("snapshots/evil.qcow2", b"x")],
        [_link("snapshots/evil.qcow2", "/etc/passwd", tarfile.SYMTYPE)],
    ),
    "hard link member": (
        [_entry("snapshots/evil.qcow2", b"x")],
        [_link("snapshots/evil.qcow2", "/etc/passwd", tarfile.LNKTYPE)],
    ),
    "size other than listed": (
        [_entry("snapshots/evil.json", b"x")],
        [_reg("snapshots/evil.json", 5)],
    ),
    "member twice": (
        [_entry("snapshots/evil.json", b"x")],
        [_reg("snapshots/evil.json", 1), _reg("snapshots/evil.json", 1)],
    ),
    "wrong place for the kind": (
        [_entry("ca/evil.pem", b"x", kind="image")],
        [_reg("ca/evil.pem", 1)],
    ),
    "hidden file": ([_entry("snapshots/.bashrc", b"x")], [_reg("snapshots/.bashrc", 1)]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_writes_nothing_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    files, members = HOSTILE[case]
    archive = tmp_path / "evil.tar"
    _hostile(archive, files, members, b"x")
    b = tmp_path / "deep" / "er" / "b"
    with pytest.raises(ImageError) as info:
        _import_into(b, archive, monkeypatch)
    assert "evil" in str(info.value) or "bashrc" in str(info.value) or "manifest" in str(info.value)
    assert list(b.iterdir()) == []
    assert not list(tmp_path.rglob("evil")) and not Path("/tmp/evil").exists()


def test_a_disk_that_names_a_host_file_is_refused(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root disk whose qcow2 header points at a host file would hand that file to the guest."""
    rootfs = cache_a / "images" / IMAGE / "rootfs.qcow2"
    rootfs.unlink()
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/hostname", str(rootfs), "1M"
    )
    write_manifest(cache_a / "images" / IMAGE, {"name": "tiny", "build_id": "0123456789abcdef"})
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    with pytest.raises(ImageError, match="sits on '/etc/hostname'"):
        _import_into(b, archive, monkeypatch)
    assert list(b.iterdir()) == []


def test_export_leaves_out_snapshots_that_cannot_travel(cache_a: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(outside), "1M")
    stray = cache_a / "snapshots" / "stray.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(outside), str(stray))
    archive = tmp_path / "cache.tar"
    done = export_cache(archive, progress=lambda msg: None, facts=FACTS)
    assert any(
        line.startswith(f"{stray}: sits on {outside}, outside the cache") for line in done.skipped
    )
    with tarfile.open(archive) as tar:
        assert "snapshots/stray.qcow2" not in tar.getnames()


def test_export_of_a_cache_without_an_image_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(ImageError, match=r"no complete image in .*empty/images"):
        export_cache(tmp_path / "x.tar", progress=lambda msg: None, facts=FACTS)
    assert not (tmp_path / "x.tar").exists() and list(tmp_path.iterdir()) == []


def test_an_existing_ca_is_kept_and_snapshots_for_another_are_skipped(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    own = CertificateAuthority.load_or_create(b / "ca").ca_pem
    done = _import_into(b, archive, monkeypatch)
    assert (b / "ca" / "gondolin-ca.pem").read_bytes() == own
    assert any("this cache has a CA of its own" in line for line in done.skipped)
    assert not (b / "snapshots").exists()
    assert f"images/{IMAGE}" in done.installed


def test_two_imports_at_once_install_everything_once(cache_a: Path, tmp_path: Path) -> None:
    """Two real ``gondolin cache import`` processes into one empty cache: both succeed."""
    archive = tmp_path / "cache.tar"
    _export(archive, host_facts("tcg"))  # what the importing processes find here
    b = tmp_path / "b"
    env = {**os.environ, "GONDOLIN_CACHE_DIR": str(b), "GONDOLIN_ACCEL": "tcg"}
    cmd = [sys.executable, "-m", "pytest_gondolin.cli", "cache", "import", str(archive)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    expected = {k: v for k, v in _files(cache_a).items() if not k.endswith((".lock", ".tmp"))}
    assert {k: v for k, v in _files(b).items() if not k.endswith(".lock")} == expected
    assert (b / "snapshots" / f"{KEY}.qcow2").exists()
    assert not list(b.glob(".import-*")) and not list((b / "images").glob(".tmp-*"))


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def test_a_read_only_cache_folder_is_named_and_left_alone(cache_a: Path, tmp_path: Path) -> None:
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    b.mkdir()
    env = {**os.environ, "GONDOLIN_CACHE_DIR": str(b), "GONDOLIN_ACCEL": "tcg"}
    cmd = [sys.executable, "-m", "pytest_gondolin.cli", "cache", "import", str(archive)]
    if os.geteuid() == 0:
        if not _can_unshare():
            pytest.skip(
                "root writes through mode bits, and no mount namespace for a read-only mount"
            )
        mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(b), *cmd]
    else:
        b.chmod(0o555)
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        b.chmod(0o700)
    assert res.returncode == 2, res.stderr
    assert (
        f"gondolin: error: the pytest-gondolin cache folder {b} is read-only, and the archive {archive} must be imported there"
        in res.stderr
    )
    assert "Traceback" not in res.stderr
    assert list(b.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("images/x/../../y", "image"),
        ("images/x", "image"),
        ("images/x/y/z", "image"),
        ("ca/other.pem", "ca"),
        ("snapshots/a.lock", "snapshot"),
        ("snapshots/a/b/c/d", "snapshot"),
        ("snapshots//a", "snapshot"),
        ("snapshots/a\\b", "snapshot"),
        ("snapshots/a\x00", "snapshot"),
        ("/snapshots/a", "snapshot"),
        ("snapshots/a", "image"),
        ("snapshots/a", "other"),
        ("host-environment/a.img", "environment"),
        ("host-environment/other/a.img", "environment"),
        ("host-environment/images/../a.img", "environment"),
        ("snapshots/a.img", "environment"),
        ("host-environment/images/a.img", "snapshot"),
    ],
)
def test_unsafe_paths_are_refused(path: str, kind: str) -> None:
    with pytest.raises(ImageError, match="archive"):
        check_path(path, kind)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": 2}', "format 2 is not 1"),
        (b'{"format": 1, "files": {}}', "files is not a list"),
        (b" " * (4 * 2**20 + 1), "more than"),
    ],
)
def test_a_bad_manifest_is_named(doc: bytes, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        parse_manifest(doc)


def test_a_snapshot_must_sit_on_a_file_of_the_archive() -> None:
    entry = {**_entry("snapshots/a.qcow2", b"x"), "backing": "images/x/rootfs.qcow2"}
    doc = {
        "format": 1,
        "producer": "p",
        "created": "c",
        "cache_root": "/r",
        "host": FACTS.to_json(),
        "files": [entry],
    }
    with pytest.raises(ImageError, match=r"sits on images/x/rootfs\.qcow2, which is not in it"):
        parse_manifest(json.dumps(doc).encode())


def test_the_boot_initrd_name_does_not_depend_on_the_cache_folder(tmp_path: Path) -> None:
    """The warm-snapshot key digests this name: a moved cache must find its snapshots."""
    names = []
    for folder in ("one", "two/deeper"):
        base = tmp_path / folder / "initrd.img"
        base.parent.mkdir(parents=True)
        base.write_bytes(b"BASE")
        names.append(payload.combined_initrd(base, b"P", tmp_path / folder / "boot").name)
    assert names[0] == names[1]


@pytest.mark.parametrize("content", [b"", b"root:x:0:0:root:/root:/bin/sh\n" * 40])
def test_a_file_that_is_no_archive_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    source = tmp_path / "passwd"
    source.write_bytes(content)
    with pytest.raises(ImageError, match=f"{source} is not a pytest-gondolin cache archive"):
        _import_into(tmp_path / "b", source, monkeypatch)
    assert list((tmp_path / "b").iterdir()) == []


def test_an_image_under_another_name_is_refused(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder named after one build that holds another would be booted as the first."""
    shutil.rmtree(cache_a / "snapshots")
    (cache_a / "images" / IMAGE).rename(cache_a / "images" / "tiny-ffffffffffffffff")
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    with pytest.raises(ImageError, match="holds another image's manifest"):
        _import_into(b, archive, monkeypatch)
    assert list(b.iterdir()) == []


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GONDOLIN_CACHE_DIR": str(cache), "GONDOLIN_ACCEL": "tcg"}
    return subprocess.run(
        [sys.executable, "-m", "pytest_gondolin.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["export", "import"])
def test_the_commands_have_help(tmp_path: Path, command: str) -> None:
    res = _cli("cache", command, "--help", cache=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: gondolin cache {command} ")
    parts = res.stdout.split("\n\n")
    assert len(parts) >= 3 and parts[1].strip().endswith("."), res.stdout
    assert "    cache " in _cli("--help", cache=tmp_path).stdout


def test_the_command_refuses_a_tampered_archive_in_one_line(cache_a: Path, tmp_path: Path) -> None:
    archive = tmp_path / "cache.tar"
    exported = _cli("cache", "export", str(archive), cache=cache_a)
    assert exported.returncode == 0, exported.stderr
    assert f"{archive}: 10 files" in exported.stdout
    offset = _member_offset(archive, f"images/{IMAGE}/initrd.img") + 7
    with archive.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"X")
    b = tmp_path / "b"
    res = _cli("cache", "import", str(archive), cache=b)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("gondolin: error:")]
    assert errors == [
        f"gondolin: error: the archive {archive} is damaged or truncated: "
        f"images/{IMAGE}/initrd.img does not match its SHA-256 in the manifest"
    ], res.stderr
    assert "Traceback" not in res.stderr
    assert list(b.iterdir()) == []


def test_relative_cache_folders_work_and_backing_files_are_absolute(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", "a")
    export_cache(Path("cache.tar"), progress=lambda msg: None, facts=FACTS)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", "b")
    done = import_cache(Path("cache.tar"), progress=lambda msg: None, here=FACTS)
    assert done.skipped == ()
    backing = qcow2_backing_file(tmp_path / "b" / "snapshots" / f"{KEY}.qcow2")
    assert backing == str(tmp_path / "b" / "images" / IMAGE / "rootfs.qcow2")


def test_a_snapshot_with_an_external_data_file_is_refused(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU would read (and the guest see) whatever host file a qcow2 names as its data file."""
    data = tmp_path / "secret.raw"
    snap = cache_a / "snapshots" / "feedfacefeedfacefeedface.qcow2"
    opts = f"data_file={data}"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(snap), "1M")
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    with pytest.raises(ImageError, match="names an external data file; refused"):
        _import_into(b, archive, monkeypatch)
    assert list(b.iterdir()) == []


def test_a_qcow2_name_on_other_bytes_is_refused(
    cache_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cache_a / "snapshots" / "feedfacefeedfacefeedface.qcow2").write_bytes(b"\0" * 4096)
    archive = tmp_path / "cache.tar"
    _export(archive)
    with pytest.raises(ImageError, match="is not a qcow2 file"):
        _import_into(tmp_path / "b", archive, monkeypatch)
