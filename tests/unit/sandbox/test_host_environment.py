"""What of the host's environment goes to the guest, and how the guest puts it on sys.path."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.guest import hostpath
from pytest_gondolin.sandbox import host_environment as he

SOABI = he.GUEST_SOABI


def _dist(
    site: Path, name: str, version: str, files: dict[str, str], meta: dict[str, str] | None = None
) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for fname, text in (meta or {}).items():
        (info / fname).write_text(text)
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A rootdir and a site folder outside it."""
    root, site = tmp_path / "project", tmp_path / "venv" / "site-packages"
    root.mkdir()
    site.mkdir(parents=True)
    return root, site


def _scan(root: Path, site: Path, **kw: object) -> he.HostEnvironment:
    return he.scan(
        root,
        sys_path=[str(site), *kw.pop("extra", [])],  # type: ignore[list-item]
        site_folders=frozenset({str(site)}),
        host_soabi=str(kw.pop("soabi", SOABI)),
        **kw,  # type: ignore[arg-type]
    )


def test_pure_and_binary_distributions_are_carried_with_metadata(layout: tuple[Path, Path]) -> None:
    root, site = layout
    _dist(site, "pure", "1.0", {"pure/__init__.py": "", "../../bin/pure": "script"})
    _dist(site, "binary", "2.0", {f"binary/_c.{SOABI}.so": "elf"})
    env = _scan(root, site)
    assert sorted((d.name, d.version) for d in env.carried) == [("binary", "2.0"), ("pure", "1.0")]
    pure = next(d for d in env.carried if d.name == "pure")
    assert str(site / "pure/__init__.py") in pure.files
    assert str(site / "pure-1.0.dist-info/METADATA") in pure.files
    assert not any("bin/pure" in f for f in pure.files)  # scripts stay on the host
    assert env.entries == (he.PathEntry(hostpath.SITE, str(site)),)
    assert env.missing == ()


def test_a_binary_for_another_abi_is_missing_with_the_reason(layout: tuple[Path, Path]) -> None:
    root, site = layout
    _dist(site, "binary", "2.0", {"binary/_c.cpython-313-x86_64-linux-gnu.so": "elf"})
    _dist(site, "pure", "1.0", {"pure/__init__.py": ""})
    env = _scan(root, site, soabi="cpython-313-x86_64-linux-gnu")
    assert [d.name for d in env.carried] == ["pure"]
    assert env.missing == (
        he.MissingDistribution(
            "binary",
            "2.0",
            f"binary for cpython-313-x86_64-linux-gnu, the guest's Python is {SOABI}",
        ),
    )
    assert env.missing[0].pin == "binary==2.0"


def test_a_wheel_for_a_newer_glibc_is_missing(layout: tuple[Path, Path]) -> None:
    root, site = layout
    _dist(
        site,
        "new",
        "1.0",
        {f"new/_c.{SOABI}.so": "elf"},
        {"WHEEL": "Wheel-Version: 1.0\nTag: cp311-cp311-manylinux_2_39_x86_64\n"},
    )
    env = _scan(root, site)
    assert [m.reason for m in env.missing] == ["needs glibc 2.39, the guest has 2.36"]


def test_pytest_gondolin_is_not_carried(layout: tuple[Path, Path]) -> None:
    root, site = layout
    _dist(site, "pytest-gondolin", "0.1", {"_editable_impl_pytest_gondolin.pth": "/elsewhere\n"})
    env = _scan(root, site)
    assert env.carried == () and env.loose_files == () and env.sources == ()


def test_editable_sources_outside_the_rootdir_are_carried(
    layout: tuple[Path, Path], tmp_path: Path
) -> None:
    root, site = layout
    other = tmp_path / "other"
    (other / "lib" / "mypkg").mkdir(parents=True)
    (root / "src").mkdir()
    _dist(
        site,
        "mypkg",
        "0.4",
        {"__editable__.mypkg.pth": "import finder\n"},
        {"direct_url.json": json.dumps({"url": other.as_uri(), "dir_info": {"editable": True}})},
    )
    _dist(site, "inroot", "1.0", {"__editable__.inroot.pth": f"{root / 'src'}\n"})
    (site / "handmade.pth").write_text(f"{other / 'lib'}\n")
    env = _scan(root, site)
    # the project folder covers lib/; the rootdir's src is the project copy
    assert env.sources == (str(other),)
    assert env.loose_files == (str(site / "handmade.pth"),)


def test_over_the_limit_names_the_largest(layout: tuple[Path, Path]) -> None:
    root, site = layout
    _dist(site, "big", "1.0", {"big/data.bin": "x" * 4096})
    with pytest.raises(ConfigError, match=r"largest distributions: big \(0\.0 MiB\).*limit"):
        _scan(root, site, limit=1024)


def test_packs_are_cached_by_content(layout: tuple[Path, Path], tmp_path: Path) -> None:
    root, site = layout
    _dist(site, "pure", "1.0", {"pure/__init__.py": "A = 1\n"})
    cache = tmp_path / "cache"
    first = [item.pack() for item in he.layer_items(_scan(root, site), cache)]
    assert [item.pack() for item in he.layer_items(_scan(root, site), cache)] == first
    assert len(list(cache.glob("*.tar"))) == 1
    (site / "pure" / "__init__.py").write_text("A = 22\n")
    changed = [item.pack() for item in he.layer_items(_scan(root, site), cache)]
    assert len(list(cache.glob("*.tar"))) == 2
    with tarfile.open(fileobj=io.BytesIO(changed[-1])) as tar:
        member = tar.extractfile(str(site / "pure/__init__.py").lstrip("/"))
        assert member is not None and member.read() == b"A = 22\n"


def test_the_guest_puts_site_folders_after_its_stdlib_in_host_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "target"
    for folder in (a, b, target):
        folder.mkdir()
    (a / "x.pth").write_text(f"{target}\n{tmp_path / 'absent'}\n")
    monkeypatch.setattr(
        sys, "path", ["/run/py", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"]
    )
    hostpath.install([(hostpath.SITE, str(a)), (hostpath.PLAIN, str(b))])
    assert sys.path == [
        "/run/py",
        "/usr/lib/python3.11",
        str(a),
        str(target),
        str(b),
        "/usr/lib/python3/dist-packages",
    ]


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', '[["site"]]', '[["other", "/x"]]', '[["site", "relative"]]', "[[1, 2]]"],
)
def test_bad_host_path_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        hostpath.parse_entries(text)


def test_a_distribution_without_record_carries_its_metadata_with_a_note(
    layout: tuple[Path, Path],
) -> None:
    root, site = layout
    _dist(site, "norecord", "1.0", {"norecord.py": "A = 1\n"})
    (site / "norecord-1.0.dist-info" / "RECORD").unlink()
    _dist(site, "whole", "2.0", {"whole.py": ""})
    env = _scan(root, site)
    carried = {d.name: d for d in env.carried}
    assert set(carried) == {"norecord", "whole"}
    assert str(site / "norecord-1.0.dist-info/METADATA") in carried["norecord"].files
    assert env.notes == ("norecord 1.0 has no RECORD: only its metadata is carried",)


def test_a_broken_pth_file_is_carried_as_the_host_has_it(layout: tuple[Path, Path]) -> None:
    """Python's site reports a bad .pth line and goes on; the guest's does the same with the copy."""
    root, site = layout
    (site / "broken.pth").write_text(
        "import no_such_module_anywhere\n/no/such/folder\n\x00garbage\n"
    )
    _dist(site, "pure", "1.0", {"pure/__init__.py": ""})
    env = _scan(root, site)
    assert [d.name for d in env.carried] == ["pure"]
    assert env.loose_files == (str(site / "broken.pth"),)
    assert env.sources == ()  # a folder it names that does not exist is not carried
