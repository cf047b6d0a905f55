"""Where a test's cassette lives: the ``cassette=`` option as a file path.

``cassette=True`` stands for :func:`default_cassette_path` (like
pytest-recording: ``<test dir>/cassettes/<module>/<test>.yaml``); a path is
resolved against the test's folder. File names derived from test names
are portable and never collide.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pytest_gondolin.errors import ConfigError

if TYPE_CHECKING:
    import pytest

__all__ = ["default_cassette_path", "resolve_cassette_option"]

# Longest file-name stem derived from a test name (most filesystems allow 255 bytes).
_MAX_STEM: Final = 120
_UNSAFE_CHARS: Final = re.compile(r"[^A-Za-z0-9._\-\[\]=+,@]")
# Device names Windows refuses as file names, whatever the extension.
_WINDOWS_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)


def _safe_stem(name: str) -> str:
    """A portable file-name stem for ``name``; distinct names give distinct stems.

    Characters outside ``[A-Za-z0-9._-[]=+,@]`` become ``_``; whenever
    anything was changed (or shortened) a hash of the original is appended,
    so ``test[a b]`` and ``test[a/b]`` do not collide.
    """
    safe = _UNSAFE_CHARS.sub("_", name).strip(".")
    changed = (
        safe != name
        or not safe
        or len(safe) > _MAX_STEM
        or safe.split(".", 1)[0].upper() in _WINDOWS_RESERVED
    )
    if changed:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[:_MAX_STEM].rstrip('.')}-{digest}" if safe else digest
    return safe


def default_cassette_path(item: pytest.Item) -> Path:
    """``<test dir>/cassettes/<module>/<Class.>test_name[id].yaml``, like pytest-recording.

    Parametrize ids are kept when they are portable file-name characters,
    else sanitised with a short hash (see :func:`_safe_stem`).
    """
    import pytest

    classes = [node.name for node in item.listchain() if isinstance(node, pytest.Class)]
    name = ".".join([*classes, item.name])
    module = Path(item.path)
    return module.parent / "cassettes" / _safe_stem(module.stem) / f"{_safe_stem(name)}.yaml"


def resolve_cassette_option(
    value: object,
    *,
    where: str,
    item: pytest.Item | None = None,
    base_dir: Path | None = None,
) -> Path | None:
    """The cassette path a ``cassette=`` marker / ``vm_factory`` argument stands for.

    ``None``/``False``: no cassette. ``True``: :func:`default_cassette_path`
    (needs ``item``). A path: relative ones are resolved against
    ``base_dir``, else the test file's folder, else the working directory;
    ``.yaml`` is added when there is no suffix. Raises :class:`ConfigError`
    naming ``where`` for anything else.
    """
    if value is None or value is False:
        return None
    if value is True:
        if item is None:
            raise ConfigError(f"{where}: cassette=True needs a test; pass a file path instead")
        return default_cassette_path(item)
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{where}: cassette must be True or a file path, got {value!r:.80}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConfigError(f"{where}: cassette path must be text, got {value!r:.80}")
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base_dir is None and item is not None:
            base_dir = Path(item.path).parent
        path = (base_dir or Path.cwd()) / path
    if not path.suffix:
        path = path.with_suffix(".yaml")
    return path
