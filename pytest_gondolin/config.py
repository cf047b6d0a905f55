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


def parse_requirements(value: object, source: str) -> tuple[str, ...]:
    """Requirement specifiers: one per line in ini files, space-separated elsewhere."""
    if value is None:
        return ()
    text = str(value)
    items = text.splitlines() if source.startswith("ini") else text.split()
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item or item.startswith("#"):
            continue
        from packaging.requirements import InvalidRequirement, Requirement

        try:
            Requirement(item)
        except InvalidRequirement as exc:
            raise ConfigError(f"{source}: {item!r} is not a valid requirement ({exc})") from exc
        out.append(item)
    return tuple(out)


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
    )
