"""Installed distributions written by hand into a site folder, for tests of the environment scan."""

from __future__ import annotations

from pathlib import Path


def install_distribution(
    site: Path,
    name: str,
    files: dict[str, str],
    *,
    version: str = "1.0",
    record: bool = True,
    entry_points: str = "",
) -> Path:
    """Write ``files`` (relative path -> text) into ``site`` with ``name``'s dist-info; return it.

    ``record=False``: no RECORD (a distribution whose file list is unknown).
    ``entry_points``: the text of its ``entry_points.txt`` (none when empty).
    """
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"  # as wheels name it
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (info / "entry_points.txt").write_text(entry_points)
    if record:
        listed = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
        (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in listed))
    return info


def install_plugin_distribution(site: Path, name: str, entry_points: str) -> Path:
    """An installed distribution ``name`` in ``site`` with a plugin module of its own (no RECORD)."""
    module = f"{name.replace('-', '_')}.py"
    files = {module: "def pytest_configure(config):\n    pass\n"}
    return install_distribution(site, name, files, record=False, entry_points=entry_points)
