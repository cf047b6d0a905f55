"""Plugin settings: one place that reads options, with one precedence rule.

Precedence (lowest to highest): ini key ``gondolin_<name>`` < environment
variable ``GONDOLIN_<NAME>`` < command-line flag ``--gondolin-<name>`` <
marker / ``vm_factory`` argument. Every bad value is reported with the
place it came from.

The declarations (:class:`Option`, :data:`OPTIONS`, :data:`MARKER_DOC`,
:func:`add_options`) live in :mod:`pytest_gondolin.guest.options`, because
the guest registers them too; they are re-exported here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.guest.options import ISOLATION_MODES as ISOLATION_MODES
from pytest_gondolin.guest.options import MARKER_DOC as MARKER_DOC
from pytest_gondolin.guest.options import OPTIONS as OPTIONS
from pytest_gondolin.guest.options import RECORD_MODES as RECORD_MODES
from pytest_gondolin.guest.options import Option as Option
from pytest_gondolin.guest.options import add_options as add_options

T = TypeVar("T")

_BY_NAME = {o.name: o for o in OPTIONS}


def raw_value(config: pytest.Config, name: str) -> tuple[Any, str]:
    """Return ``(value, source)`` for option ``name`` following the precedence rule."""
    opt = _BY_NAME[name]
    cli = config.getoption(opt.cli)
    if cli is not None:
        return cli, opt.cli
    env = os.environ.get(opt.env)
    if env is not None and env != "":
        if opt.flag:
            return env.lower() in ("1", "true", "yes", "on"), f"${opt.env}"
        return env, f"${opt.env}"
    ini = config.getini(opt.ini)
    if ini not in (None, "", []):
        return ini, f"ini {opt.ini}"
    if opt.flag:
        return False, "default"
    return opt.default, "default"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_memory(value: object, source: str) -> int:
    """Return a memory size in MiB from ``256``, ``"256M"``, ``"1G"``, ``"1GiB"``.

    A bare number means MiB. Guests need 128 MiB to 64 GiB.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{source}: memory must be a size like '256M' or '1G', got {value!r}")
    if isinstance(value, int):
        mib = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(f"{source}: memory must be a size like '256M' or '1G', got {value!r}")
        n, unit = int(m.group(1)), m.group(2).upper()
        mib = {"": n, "K": n // 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]
    if not 128 <= mib <= 64 * 1024:
        raise ConfigError(f"{source}: memory must be between 128M and 64G, got {value!r}")
    return mib


def parse_number(
    value: object, source: str, *, kind: Callable[[Any], T], low: float, high: float, what: str
) -> T:
    """Parse ``value`` with ``kind`` (int/float) and check ``low <= value <= high``."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {what} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {what} must be a number, got {value!r}") from exc
    if not low <= number <= high:  # type: ignore[operator]
        raise ConfigError(f"{source}: {what} must be between {low:g} and {high:g}, got {value!r}")
    return number


def _string_items(value: object, source: str, expected: str) -> list[str]:
    """``value`` as a list of strings: a list/tuple of strings as is, a string as one item.

    Raises :class:`ConfigError` naming ``source`` and ``expected`` for anything else.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{source}: expected {expected}, got {value!r}")


def parse_requirements(value: object, source: str) -> tuple[str, ...]:
    """Requirement specifiers from a list (a TOML list, an ini key's lines) or a string.

    One rule for every source: each list item or line of text is one
    requirement if it parses as one (``requests >= 2.32``, ``attrs [tests]``),
    else whitespace-separated requirements (``requests==2.32.3 six``). Blank
    items and ``#`` comments are skipped. Raises :class:`ConfigError` naming
    ``source`` and the item that is not a requirement.
    """
    if value is None:
        return ()
    lines = (
        value.splitlines()
        if isinstance(value, str)
        else _string_items(value, source, "requirements as a list of strings or a string")
    )
    out: list[str] = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        if _requirement_error(line) is None:
            out.append(line)
            continue
        for word in line.split():
            problem = _requirement_error(word)
            if problem is not None:
                raise ConfigError(f"{source}: {word!r} is not a valid requirement ({problem})")
            out.append(word)
    return tuple(out)


def _requirement_error(text: str) -> str | None:
    """Why ``text`` is not one PEP 508 requirement, or ``None`` if it is one."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(text)
    except InvalidRequirement as exc:
        return str(exc)
    return None


#: Debian policy §5.6.7: lower case letters, digits, ``+ - .``; at least two
#: characters, starting with a letter or digit.
_DEBIAN_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def parse_system_packages(value: object, source: str) -> tuple[str, ...]:
    """Debian package names from ``"less,git"``, ``"less git"``, lines or a list; sorted, unique.

    Raises :class:`ConfigError` naming ``source`` and the first name that is
    not a Debian package name (an option such as ``-o...`` never reaches apt).
    """
    if value is None:
        return ()
    items = _string_items(value, source, "Debian package names as a list or a string")
    names: set[str] = set()
    for item in items:
        for word in item.replace(",", " ").split():
            if not _DEBIAN_PACKAGE_RE.match(word):
                raise ConfigError(f"{source}: {word!r} is not a Debian package name")
            names.add(word)
    return tuple(sorted(names))


def parse_tcp(value: object, source: str) -> tuple[tuple[str, str], ...]:
    """``tcp`` services from ``name:port=addr:port`` entries, in order.

    Entries are list items (an ini key's lines, a TOML list) or text split
    at commas and new lines; blank ones and ``#`` comments are skipped.
    Each is validated as the ``tcp=`` option's entries are
    (:func:`~pytest_gondolin.netpolicy.http.tcp_services.parse_tcp_services`);
    raises :class:`ConfigError` naming ``source`` and the bad entry.
    """
    if value is None:
        return ()
    items = _string_items(value, source, "tcp services as 'name:port=addr:port' entries")
    # Imported here: a session without tcp services never loads the network code.
    from pytest_gondolin.netpolicy.http.tcp_services import parse_tcp_services

    entries: dict[str, str] = {}
    for item in items:
        for raw in item.replace("\n", ",").split(","):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            key, sep, target = entry.partition("=")
            if not sep or "=" in target or not key.strip() or not target.strip():
                raise ConfigError(
                    f"{source}: tcp entry {entry!r} must look like "
                    "'name:port=addr:port' (e.g. 'db.test:5432=127.0.0.1:5432')"
                )
            key, target = key.strip(), target.strip()
            try:
                parse_tcp_services({**entries, key: target})
            except ConfigError as exc:
                raise ConfigError(f"{source}: tcp entry {entry!r}: {exc}") from None
            entries[key] = target
    return tuple(entries.items())


_SWITCH = {
    "on": True,
    "true": True,
    "yes": True,
    "1": True,
    "off": False,
    "false": False,
    "no": False,
    "0": False,
}


def parse_switch(value: object, source: str, what: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0, any case) as a bool."""
    if isinstance(value, bool):
        return value
    switch = _SWITCH.get(str(value).strip().lower())
    if switch is None:
        raise ConfigError(f"{source}: {what} must be on or off, got {value!r}")
    return switch


def parse_size(value: object, source: str, what: str) -> int:
    """A size in bytes from ``512``, ``"512M"``, ``"2G"``, ``"2GiB"`` (a bare number means MiB)."""
    m = _SIZE_RE.match(str(value)) if not isinstance(value, bool) else None
    if not m:
        raise ConfigError(f"{source}: {what} must be a size like '512M' or '2G', got {value!r}")
    n, unit = int(m.group(1)), m.group(2).upper()
    return n * {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def parse_choice(value: object, source: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{source}: {what} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Settings:
    """The session-wide settings, resolved and validated once at configure time."""

    accel: str
    image: str
    memory_mib: int
    cpus: int
    boot_timeout: float
    timeout: float | None
    keep_vm: bool
    record_mode: str
    artifacts: str | None
    requirements: tuple[str, ...] = ()
    #: Carry the host's Python environment into the guest (sandbox/host_environment.py).
    host_environment: bool = True
    #: Bytes of host environment carried at most.
    host_environment_limit: int = 512 * 2**20
    #: Extra Debian packages in a cached layer over the image (image/system_packages.py), sorted.
    system_packages: tuple[str, ...] = ()
    #: Named raw-TCP services from ini/env/CLI (``name:port``, ``addr:port``), under every
    #: sandboxed test's and vm_factory VM's own ``tcp=`` (netpolicy/http/tcp_services.py).
    tcp: tuple[tuple[str, str], ...] = ()
    #: How sandboxed tests are kept apart: "vm" or "process" (docs/isolation.md).
    isolation: str = "vm"
    #: With process isolation, the VM is restored after this many tests without a restore.
    isolation_restore_every: int = 100


def load_settings(config: pytest.Config) -> Settings:
    """Resolve and validate every option; raise ``pytest.UsageError`` naming the bad one."""
    try:
        accel, src = raw_value(config, "accel")
        accel = parse_choice(accel, src, ("auto", "kvm", "tcg"), "accel")
        image, _ = raw_value(config, "image")
        memory = parse_memory(*raw_value(config, "memory"))
        cpus_raw, src = raw_value(config, "cpus")
        cpus = parse_number(cpus_raw, src, kind=int, low=1, high=64, what="cpus")
        bt_raw, src = raw_value(config, "boot_timeout")
        boot_timeout = parse_number(bt_raw, src, kind=float, low=1, high=3600, what="boot timeout")
        to_raw, src = raw_value(config, "timeout")
        timeout = parse_number(to_raw, src, kind=float, low=0, high=24 * 3600, what="timeout")
        keep_vm, _ = raw_value(config, "keep_vm")
        mode, src = raw_value(config, "record_mode")
        if mode is None:
            mode = "none" if os.environ.get("CI") else "once"
        mode = parse_choice(mode, src, RECORD_MODES, "record mode")
        artifacts, _ = raw_value(config, "artifacts")
        requirements = parse_requirements(*raw_value(config, "requirements"))
        host_env, src = raw_value(config, "host_environment")
        host_environment = parse_switch(host_env, src, "host environment")
        env_limit, src = raw_value(config, "host_environment_limit")
        host_environment_limit = parse_size(env_limit, src, "host environment limit")
        system_packages = parse_system_packages(*raw_value(config, "system_packages"))
        tcp = parse_tcp(*raw_value(config, "tcp"))
        iso_raw, src = raw_value(config, "isolation")
        isolation = parse_choice(iso_raw, src, ISOLATION_MODES, "isolation")
        every_raw, src = raw_value(config, "isolation_restore_every")
        restore_every = parse_number(
            every_raw, src, kind=int, low=1, high=10**9, what="isolation restore every"
        )
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-gondolin: {exc}") from exc
    return Settings(
        accel=accel,
        image=str(image),
        memory_mib=memory,
        cpus=cpus,
        boot_timeout=boot_timeout,
        timeout=timeout or None,
        keep_vm=bool(keep_vm),
        record_mode=mode,
        artifacts=str(artifacts) if artifacts else None,
        requirements=requirements,
        host_environment=host_environment,
        host_environment_limit=host_environment_limit,
        system_packages=system_packages,
        tcp=tcp,
        isolation=isolation,
        isolation_restore_every=restore_every,
    )
