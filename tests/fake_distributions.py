"""Installed distributions written by hand into a site folder, for tests of the environment scan."""

from __future__ import annotations

from pathlib import Path


def install_distribution(
    site: Path, name: str, files: dict[str, str], *, version: str = "1.0", record: bool = True
) -> None:
    """Write ``files`` (relative path -> text) into ``site`` with ``name``'s dist-info.

    ``record=False``: no RECORD (a distribution whose file list is unknown).
    """
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if record:
        listed = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
        (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in listed))
