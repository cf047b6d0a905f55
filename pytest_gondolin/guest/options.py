"""The plugin's option and marker declarations, shared by the host and the guest.

Both sides register the same ``gondolin`` option group and ``sandboxed``
marker (the guest so that a project's ``addopts`` and ``--strict-markers``
work there too), so the declarations live here, on the guest side of the
package: stdlib and pytest only. Reading and validating the values is the
host's business (:mod:`pytest_gondolin.config`).

Naming: kebab-case flags ``--gondolin-<name>``, snake_case ini keys
``gondolin_<name>``, environment variables ``GONDOLIN_<NAME>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

#: Cassette record modes, in the order the option's help lists them.
RECORD_MODES = ("none", "once", "new_episodes", "all")
#: How sandboxed tests are kept apart (docs/isolation.md).
ISOLATION_MODES = ("vm", "process")

MARKER_DOC = (
    "sandboxed(*, allow_hosts=(), resolve={}, secrets={}, timeout=None, memory=None, image=None, "
    "cassette=None, block_internal=True, upstream_ca=None, isolation=None, system_packages=()): "
    "run this test "
    "(fixtures included) inside a fresh QEMU guest restored from a clean snapshot"
)
#: pytest-timeout's marker, registered in the guest (where that plugin is not
#: loaded) so ``--strict-markers`` holds; the host enforces it on the run.
TIMEOUT_MARKER_DOC = (
    "timeout(timeout): pytest-timeout's per-test timeout; for a sandboxed test "
    "the host enforces it on the test's run in the guest"
)
#: pytest-rerunfailures' marker, registered in the guest for the same reason:
#: the host decides about reruns of a sandboxed test.
FLAKY_MARKER_DOC = (
    "flaky(reruns=0, reruns_delay=0, condition=True, only_rerun=None, rerun_except=None): "
    "pytest-rerunfailures' marker; for a sandboxed test the host applies it"
)


@dataclass(frozen=True)
class Option:
    name: str  # snake_case, e.g. "memory"
    help: str
    default: str | None
    choices: tuple[str, ...] | None = None
    flag: bool = False
    #: The ini key's pytest type: ``"linelist"`` takes a TOML list as well as
    #: one item per line, as pytest's own ``markers`` does.
    ini_type: Literal["string", "linelist"] = "string"

    @property
    def cli(self) -> str:
        return "--gondolin-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "gondolin_" + self.name

    @property
    def env(self) -> str:
        return "GONDOLIN_" + self.name.upper()


OPTIONS = (
    Option(
        "accel",
        "accelerator: auto (KVM if it works, else TCG), kvm or tcg",
        "auto",
        ("auto", "kvm", "tcg"),
    ),
    Option(
        "image",
        "guest image: a built-in recipe name, a recipe folder or an image folder",
        "bookworm",
    ),
    Option("memory", "guest memory, e.g. 256M or 1G", "256M"),
    Option("cpus", "guest vCPUs", "1"),
    Option("boot_timeout", "seconds a guest may take to boot", "120"),
    Option("timeout", "default timeout in seconds for a sandboxed test (0: none)", "0"),
    Option("keep_vm", "leave the VM of a failing test running for debugging", None, flag=True),
    Option(
        "record_mode",
        "cassette record mode: none, once, new_episodes, all (default: none if $CI is set, else once)",
        None,
        RECORD_MODES,
    ),
    Option(
        "requirements",
        "packages to install in the guest for sandboxed tests: separated by spaces or "
        "new lines (ini: also a TOML list), e.g. 'requests==2.32.3 six'",
        None,
        ini_type="linelist",
    ),
    Option(
        "host_environment",
        "carry the host's Python environment (installed distributions, editable installs) "
        "into the guest: on or off (cached in a layered ready snapshot: a second run with "
        "nothing changed copies none of it)",
        "on",
    ),
    Option(
        "host_environment_limit",
        "largest host Python environment carried into the guest, e.g. 512M or 2G",
        "512M",
    ),
    Option(
        "system_packages",
        "extra Debian packages for every guest, installed once into a cached layer over the "
        "image: separated by commas or spaces (ini: also a TOML list), e.g. 'less,git'",
        None,
        ini_type="linelist",
    ),
    Option(
        "isolation",
        "how sandboxed tests are kept apart: vm (each test in a VM restored from the "
        "snapshot) or process (each test forked in fresh namespaces inside a warm guest; "
        "the VM is restored only after a crash, a timeout, a kernel-level change, and every "
        "gondolin_isolation_restore_every tests)",
        "vm",
        ISOLATION_MODES,
    ),
    Option(
        "isolation_restore_every",
        "with isolation=process, restore the VM after this many tests in a row without one",
        "100",
    ),
    Option(
        "tcp",
        "named raw-TCP services for sandboxed tests and vm_factory VMs, as "
        "name:port=addr:port entries separated by commas (ini: one per line), e.g. "
        "'db.test:5432=127.0.0.1:5432'; a marker's or vm_factory's tcp= adds to them and "
        "wins for the same name:port",
        None,
        ini_type="linelist",
    ),
    Option(
        "artifacts",
        "folder for failure artifacts (console log, traffic); default under pytest's basetemp",
        None,
    ),
)


def add_options(parser: pytest.Parser) -> None:
    """Register every option in one ``gondolin`` group, plus its ini key."""
    group = parser.getgroup(
        "gondolin", "sandboxed test execution in QEMU micro-VMs (pytest-gondolin)"
    )
    for opt in OPTIONS:
        if opt.flag:
            group.addoption(opt.cli, action="store_true", default=None, help=opt.help)
            parser.addini(opt.ini, opt.help, type="bool", default=False)
        else:
            group.addoption(
                opt.cli,
                default=None,
                choices=opt.choices,
                help=f"{opt.help} (default: {opt.default})",
            )
            parser.addini(opt.ini, opt.help, type=opt.ini_type, default=None)
