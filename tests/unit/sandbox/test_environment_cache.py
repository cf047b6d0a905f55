"""The host environment's scan is reused across sessions only while nothing it read changed."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from pytest_gondolin.sandbox import environment_cache
from pytest_gondolin.sandbox import host_environment as he

SOABI = he.GUEST_SOABI


def _dist(site: Path, name: str, version: str, files: dict[str, str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def _age(folder: Path) -> None:
    """Every path under ``folder`` changed a minute ago (past the racy window)."""
    past = time.time() - 60
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (past, past))
    os.utime(folder, (past, past))


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A rootdir, a site folder outside it holding one distribution, and a cache folder."""
    root, site = tmp_path / "project", tmp_path / "venv" / "site-packages"
    root.mkdir()
    site.mkdir(parents=True)
    _dist(site, "pure", "1.0", {"pure/__init__.py": "A = 1\n"})
    _age(tmp_path / "venv")
    return root, site, tmp_path / "cache"


def _scan(root: Path, site: Path, cache: Path) -> he.HostEnvironment:
    return he.scan(
        root,
        sys_path=[str(site)],
        site_folders=frozenset({str(site)}),
        host_soabi=SOABI,
        cache=cache,
    )


def _no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan that walks the environment now fails: the answer must come from the cache."""

    def refuse(**kw: object) -> object:
        raise AssertionError(f"the environment was walked again ({kw})")

    monkeypatch.setattr(importlib.metadata, "distributions", refuse)


def _names(env: he.HostEnvironment) -> list[str]:
    return sorted(d.name for d in env.carried)


def test_nothing_changed_reuses_the_answer(
    layout: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, site, cache = layout
    first = _scan(root, site, cache)
    assert len(list(cache.glob("scan-*.json"))) == 1
    _no_walk(monkeypatch)
    assert _scan(root, site, cache) == first


def test_a_distribution_installed_between_runs_is_seen(
    layout: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, site, cache = layout
    assert _names(_scan(root, site, cache)) == ["pure"]
    _dist(site, "added", "2.0", {"added.py": ""})
    assert _names(_scan(root, site, cache)) == ["added", "pure"]
    _age(site)
    assert _names(_scan(root, site, cache)) == ["added", "pure"]  # saved again, once aged
    _no_walk(monkeypatch)
    assert _names(_scan(root, site, cache)) == ["added", "pure"]


def test_a_distribution_removed_between_runs_is_gone(layout: tuple[Path, Path, Path]) -> None:
    root, site, cache = layout
    _scan(root, site, cache)
    for path in sorted(site.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    assert _names(_scan(root, site, cache)) == []


def test_a_file_edited_in_place_changes_the_distribution_key(
    layout: tuple[Path, Path, Path],
) -> None:
    root, site, cache = layout
    before = _scan(root, site, cache).carried[0].key
    folder_mtime = os.stat(site / "pure").st_mtime_ns
    (site / "pure" / "__init__.py").write_text("A = 2\n")  # rewritten: no folder changes
    assert os.stat(site / "pure").st_mtime_ns == folder_mtime
    assert _scan(root, site, cache).carried[0].key != before


def test_a_new_pth_file_is_seen(layout: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, site, cache = layout
    assert _scan(root, site, cache).loose_files == ()
    (tmp_path / "elsewhere").mkdir()
    (site / "handmade.pth").write_text(f"{tmp_path / 'elsewhere'}\n")
    env = _scan(root, site, cache)
    assert env.loose_files == (str(site / "handmade.pth"),)
    assert env.sources == (str(tmp_path / "elsewhere"),)


def test_an_answer_read_while_files_are_fresh_is_not_saved(
    layout: tuple[Path, Path, Path],
) -> None:
    root, site, cache = layout
    _dist(site, "fresh", "1.0", {"fresh.py": ""})  # mtime: now, inside the racy window
    assert _names(_scan(root, site, cache)) == ["fresh", "pure"]
    assert list(cache.glob("scan-*.json")) == []


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "{",
        "[]",
        '{"stamp": 1}',
        '{"witnesses": [1]}',
        '{"stamp": "", "witnesses": ["/a", 1], "answer": {}}',
        '{"stamp": "", "witnesses": {"/a": 1}, "answer": {}}',
    ],
)
def test_a_broken_cache_entry_means_a_new_scan(
    layout: tuple[Path, Path, Path], garbage: str
) -> None:
    root, site, cache = layout
    first = _scan(root, site, cache)
    (entry,) = cache.glob("scan-*.json")
    entry.write_text(garbage)
    assert _scan(root, site, cache) == first


def test_a_stale_answer_with_a_matching_stamp_is_refused_as_malformed(
    layout: tuple[Path, Path, Path],
) -> None:
    root, site, cache = layout
    _scan(root, site, cache)
    (entry,) = cache.glob("scan-*.json")
    saved = json.loads(entry.read_text())
    saved["answer"] = {"entries": "not a list of entries"}
    entry.write_text(json.dumps(saved))
    assert _names(_scan(root, site, cache)) == ["pure"]


def test_pip_installing_a_wheel_between_runs_is_seen(
    layout: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real thing: pip installs into the site folder between two sessions."""
    root, site, cache = layout
    assert _names(_scan(root, site, cache)) == ["pure"]
    assert len(list(cache.glob("scan-*.json"))) == 1  # saved: a stale answer would be reused
    wheel = tmp_path / "tinydist-0.1-py3-none-any.whl"
    info = "tinydist-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tinydist.py", "VALUE = 1\n")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinydist\nVersion: 0.1\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(
            f"{info}/RECORD", f"tinydist.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n"
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, "--target", str(site), "--upgrade", str(wheel)], check=True, timeout=120)
    env = _scan(root, site, cache)
    assert _names(env) == ["pure", "tinydist"]
    assert str(site / "tinydist.py") in next(d for d in env.carried if d.name == "tinydist").files


def test_save_refuses_a_witness_changed_just_now(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.write_text("x")
    entry = tmp_path / "cache" / "scan-x.json"
    assert not environment_cache.save_scan(entry, [str(fresh)], {"a": 1})
    past = time.time() - 60
    os.utime(fresh, (past, past))
    assert environment_cache.save_scan(entry, [str(fresh)], {"a": 1})
    assert environment_cache.load_scan(entry) == {"a": 1}
    fresh.write_text("y")
    assert environment_cache.load_scan(entry) is None


def test_packs_past_the_limit_go_least_recently_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "packs"
    cache.mkdir()
    source = tmp_path / "mod.py"
    source.write_text("X = 1\n" * 100)
    now = time.time()
    for age, name in enumerate(["newest", "middle", "oldest"]):
        pack = cache / f"{name}.tar"
        pack.write_bytes(b"\0" * 4096)
        os.utime(pack, (now - 100 * (age + 1), now - 100 * (age + 1)))
    # Reading a pack marks it used: "oldest" is then the most recent of the three.
    assert environment_cache.cached_pack("oldest", [str(source)], cache) == b"\0" * 4096
    new_size = len(environment_cache.tar_files([str(source)]))
    monkeypatch.setattr(environment_cache, "MAX_PACKS_BYTES", new_size + 4096)
    data = environment_cache.cached_pack("new", [str(source)], cache)
    assert data == (cache / "new.tar").read_bytes()
    # Room for the new pack and one more: the one read last stays.
    assert {p.stem for p in cache.glob("*.tar")} == {"new", "oldest"}


def test_packs_within_the_limit_all_stay(tmp_path: Path) -> None:
    cache = tmp_path / "packs"
    cache.mkdir()
    (cache / "old.tar").write_bytes(b"x" * 10)
    source = tmp_path / "mod.py"
    source.write_text("X = 1\n")
    environment_cache.cached_pack("new", [str(source)], cache)
    assert {p.stem for p in cache.glob("*.tar")} == {"old", "new"}


def test_a_layers_packs_evict_once_after_the_last_and_keep_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "packs"
    cache.mkdir()
    now = time.time()
    for age in range(3):
        old = cache / f"old{age}.tar"
        old.write_bytes(b"\0" * 4096)
        os.utime(old, (now - 100 * (age + 1), now - 100 * (age + 1)))
    sources = []
    for n in range(3):
        source = tmp_path / f"mod{n}.py"
        source.write_text(f"X = {n}\n" * 100)
        sources.append(str(source))
    # Room for two of the layer's three packs: it keeps all three, nothing else.
    monkeypatch.setattr(environment_cache, "MAX_PACKS_BYTES", 2 * 10240 + 1)
    packs = environment_cache.layer_packs([(f"new{n}", [s]) for n, s in enumerate(sources)], cache)
    olds = {"old0", "old1", "old2"}
    assert packs[0]() == environment_cache.tar_files([sources[0]])
    packs[1]()
    assert {p.stem for p in cache.glob("*.tar")} == {"new0", "new1", *olds}  # not yet
    packs[2]()
    assert {p.stem for p in cache.glob("*.tar")} == {"new0", "new1", "new2"}
    # Read again (all cached), the last one evicts again: an older pack goes.
    (cache / "old9.tar").write_bytes(b"\0" * 4096)
    os.utime(cache / "old9.tar", (now - 900, now - 900))
    for pack in packs:
        pack()
    assert {p.stem for p in cache.glob("*.tar")} == {"new0", "new1", "new2"}
