"""``gondolin exec`` and ``gondolin shell`` (a fresh guest), and ``gondolin version``.

A one-off guest is booted as ``vm_factory(allow_hosts=...)`` boots one and
closed with everything it owns when the command ends; ``version`` reports
what such a guest would run on (QEMU, the accelerator pytest would choose,
the cache folder).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_gondolin import __version__, paths
from pytest_gondolin.cli.console import progress, shell_loop
from pytest_gondolin.errors import ConfigError, GondolinError

if TYPE_CHECKING:  # imported lazily: `gondolin --help` stays fast
    from pytest_gondolin.fixtures import VMFactory
    from pytest_gondolin.vm.machine import VM

__all__ = ["cmd_exec", "cmd_shell", "cmd_version"]


def _factory(args: argparse.Namespace) -> VMFactory:
    """A VMFactory for the CLI's options, validated before anything boots."""
    import pytest_gondolin.config as cfg
    from pytest_gondolin.fixtures import VMFactory
    from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
    from pytest_gondolin.vm.identity import BOOT_TIMEOUT
    from pytest_gondolin.vm.reaper import reap_orphans

    memory = cfg.parse_memory(args.memory, "--memory")
    try:
        NetworkPolicy.from_options(allow_hosts=args.allow_host)
    except GondolinError as exc:
        raise ConfigError(f"--allow-host: {exc}") from None
    reap_orphans(spare_kept=True)
    settings = cfg.Settings(
        accel=args.accel,
        image=args.image,
        memory_mib=memory,
        cpus=1,
        boot_timeout=BOOT_TIMEOUT,
        timeout=None,
        keep_vm=False,
        record_mode="none",
        artifacts=None,
    )
    return VMFactory(settings, progress=progress)


def _with_vm(args: argparse.Namespace, body: Callable[[VM], int]) -> int:
    """Boot a VM the way ``vm_factory(allow_hosts=...)`` does, run ``body``, close everything."""
    factory = _factory(args)
    try:
        return body(factory(allow_hosts=list(args.allow_host)))
    finally:
        factory.close_all()


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        args.parser.error("give a command after --, e.g. gondolin exec -- uname -a")

    def body(vm: VM) -> int:
        result = vm.exec(command, timeout=args.timeout)
        sys.stdout.buffer.write(result.stdout_bytes)
        sys.stderr.buffer.write(result.stderr_bytes)
        return result.returncode

    return _with_vm(args, body)


def cmd_shell(args: argparse.Namespace) -> int:
    def body(vm: VM) -> int:
        def run(line: str) -> tuple[int, bytes, bytes]:
            r = vm.exec(line)
            return r.returncode, r.stdout_bytes, r.stderr_bytes

        return shell_loop(
            run, "gondolin shell: each line runs in the guest with /bin/sh -c; Ctrl-D exits"
        )

    return _with_vm(args, body)


def _qemu_version() -> str:
    from pytest_gondolin.hosttools import TOOLS
    from pytest_gondolin.vm.accel import qemu_version

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return f"not found (install it: sudo apt-get install {TOOLS['qemu-system-x86_64'][0]})"
    try:
        version = qemu_version(qemu)
    except GondolinError as exc:
        return f"{qemu}: cannot run it ({exc})"
    return f"{version} [{qemu}]"


def cmd_version(args: argparse.Namespace) -> int:
    import pytest

    from pytest_gondolin.vm.accel import choose_accel

    print(f"pytest-gondolin {__version__}")
    print(f"python:  {platform.python_version()} [{sys.executable}]")
    print(f"pytest:  {pytest.__version__}")
    print(f"qemu:    {_qemu_version()}")
    try:
        accel = choose_accel(args.accel)
        print(f"accel:   {accel.name} ({args.accel}: {accel.reason})")
    except GondolinError as exc:
        print(f"accel:   unusable ({exc})")
    cache = paths.cache_root()
    notes = [n for n in (paths.cache_write_problem(cache), paths.cache_trust_problem(cache)) if n]
    print(f"cache:   {cache}" + (f" ({'; '.join(notes)})" if notes else ""))
    print(f"runtime: {paths.runtime_dir()}")
    return 0
