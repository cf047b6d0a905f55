"""Image recipes: data describing a guest image, and its content-derived id.

A recipe is a folder under ``pytest_gondolin/image/recipes/`` (or any
folder a user names) holding ``recipe.json``, the stage-1 ``init`` for the
initramfs and the ``customize.sh`` hook. The build id hashes every file in
the folder plus :data:`BUILDER_VERSION`, so any change to what goes into
an image gives a new id and a new cache entry.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pytest_gondolin.errors import ConfigError

#: Bump when the builder's own logic changes what an image contains.
BUILDER_VERSION = "1"

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "bookworm"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``build_id`` identifies the image it produces."""

    directory: Path
    name: str
    suite: str
    mirror: str
    variant: str
    packages: tuple[str, ...]
    kernel_package: str
    initramfs_modules: tuple[str, ...]
    disk_size_mib: int
    path_excludes: tuple[str, ...]
    path_includes: tuple[str, ...]
    build_id: str

    @property
    def image_key(self) -> str:
        """Directory name of this recipe's image in the cache."""
        return f"{self.name}-{self.build_id}"


def _hash_dir(directory: Path) -> str:
    digest = hashlib.sha256(f"builder={BUILDER_VERSION}\n".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _str_list(
    data: dict[str, object], key: str, where: str, pattern: re.Pattern[str] | None = None
) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    if pattern is not None:
        for v in value:
            if not pattern.match(v):
                raise ConfigError(f"{where}: {key!r} has an invalid entry {v!r}")
    return tuple(value)


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> Recipe:
    """Load a recipe by built-in name (``"bookworm"``) or folder path.

    Raises :class:`ConfigError` naming the recipe and the bad field.
    """
    candidate = Path(name_or_path)
    if (
        isinstance(name_or_path, str)
        and _NAME_RE.match(name_or_path)
        and (RECIPES_DIR / name_or_path).is_dir()
    ):
        directory = RECIPES_DIR / name_or_path
    elif candidate.is_dir():
        directory = candidate.resolve()
    else:
        known = ", ".join(sorted(p.name for p in RECIPES_DIR.iterdir() if p.is_dir()))
        raise ConfigError(
            f"image {str(name_or_path)!r} is neither a built-in recipe ({known}) nor a recipe folder"
        )
    where = str(directory / "recipe.json")
    try:
        data = json.loads((directory / "recipe.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read recipe: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must hold a JSON object")
    for required in ("init", "customize.sh"):
        if not (directory / required).is_file():
            raise ConfigError(f"{directory}: recipe is missing the file {required!r}")

    def text(key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        return value

    name = text("name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' {name!r} must match {_NAME_RE.pattern}")
    size = data.get("disk_size_mib", 4096)
    if not isinstance(size, int) or not 512 <= size <= 1024 * 1024:
        raise ConfigError(
            f"{where}: 'disk_size_mib' must be an integer in 512..1048576, got {size!r}"
        )
    return Recipe(
        directory=directory,
        name=name,
        suite=text("suite"),
        mirror=text("mirror"),
        variant=text("variant", "minbase"),
        packages=_str_list(data, "packages", where, _PACKAGE_RE),
        kernel_package=text("kernel_package"),
        initramfs_modules=_str_list(data, "initramfs_modules", where),
        disk_size_mib=size,
        path_excludes=_str_list(data, "path_excludes", where),
        path_includes=_str_list(data, "path_includes", where),
        build_id=_hash_dir(directory),
    )
