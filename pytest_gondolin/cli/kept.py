"""``gondolin ps|attach|kill``: the VMs ``pytest --gondolin-keep-vm`` left up.

Listing, entering and stopping them; the kept VMs' folders and their
control socket are :mod:`pytest_gondolin.vm.kept`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pytest_gondolin import paths
from pytest_gondolin.cli.console import shell_loop

__all__ = ["cmd_attach", "cmd_kill", "cmd_ps"]


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_ps(args: argparse.Namespace) -> int:
    from pytest_gondolin.vm.kept import list_folders

    folders = list_folders(kept_only=not args.all)
    now = time.time()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": f.id,
                        "rundir": str(f.rundir),
                        "qemu_pid": f.qemu_pid,
                        "owner_pid": f.owner_pid,
                        "running": f.running,
                        "kept": f.kept.to_json() if f.kept else None,
                    }
                    for f in folders
                ],
                indent=2,
            )
        )
        return 0
    if not folders:
        what = "VMs" if args.all else "kept VMs (pytest --gondolin-keep-vm keeps failing ones)"
        print(f"no {what} in {paths.runtime_dir()}")
        return 0
    print(f"{'ID':<10}{'PID':>8}  {'AGE':>5}  {'STATE':<12}{'TEST / OWNER'}")
    for f in folders:
        state = "running" if f.running else "dead"
        if f.kept is not None:
            what = f.kept.nodeid
            age = _age(now - f.kept.created)
        else:
            what = f"in use by pid {f.owner_pid}" if f.owner_alive else "orphan (reaped next run)"
            age = "-"
        print(f"{f.id:<10}{f.qemu_pid or '-':>8}  {age:>5}  {state:<12}{what}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from pytest_gondolin.vm.kept import find, kill, list_folders

    if args.all == bool(args.ids):
        args.parser.error("give one or more VM ids, or --all")
    folders = list_folders() if args.all else [find(i) for i in args.ids]
    for folder in folders:
        was_running = kill(folder)
        print(f"{folder.id}: {'killed' if was_running else 'was not running'}; folder removed")
    if args.all and not folders:
        print("no kept VMs")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from pytest_gondolin.vm.kept import connect, find

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    folder = find(args.id)
    channel = connect(folder)
    try:
        if command:
            r = channel.exec(command, timeout=args.timeout)
            sys.stdout.buffer.write(r.stdout)
            sys.stderr.buffer.write(r.stderr)
            return r.returncode

        def run(line: str) -> tuple[int, bytes, bytes]:
            r = channel.exec(["/bin/sh", "-c", line])
            return r.returncode, r.stdout, r.stderr

        test = folder.kept.nodeid if folder.kept else "?"
        return shell_loop(
            run,
            f"gondolin: attached to kept VM {folder.id} (failed test: {test}); each line runs "
            f"in the guest with /bin/sh -c; Ctrl-D detaches, the VM keeps running "
            f"(`gondolin kill {folder.id}` stops it)",
        )
    finally:
        channel.close()
