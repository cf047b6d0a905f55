"""The ``gondolin`` command: images, one-off guests, shells, and VMs kept for debugging.

Exit codes: 0 success (``exec`` and ``attach -- CMD`` pass the guest
command's code through), 1 a negative answer (``image inspect`` of an image
not built yet), 2 a usage or runtime error, reported as ``gondolin: error:
...`` on stderr, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pytest_gondolin import __version__, paths
from pytest_gondolin.errors import ConfigError, GondolinError

if TYPE_CHECKING:  # imported lazily: `gondolin --help` stays fast
    from pytest_gondolin.fixtures import VMFactory
    from pytest_gondolin.vm.machine import VM

EXAMPLES = """\
examples:
  gondolin image build                 build (or find) the default guest image
  gondolin image inspect               manifest, sizes and warm snapshots of it
  gondolin exec -- uname -a            run one command in a fresh guest
  gondolin shell --allow-host pypi.org an interactive shell that may reach pypi.org
  gondolin ps                          VMs kept by pytest --gondolin-keep-vm
  gondolin attach 8e3f6b9c             a shell in one of them
  gondolin cache export cache.tar      images and warm snapshots in one file (CI caches)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: ``gondolin: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"gondolin: error: {message} (see `{self.prog} --help`)\n")


def _progress(msg: str) -> None:
    print(f"gondolin: {msg}", file=sys.stderr, flush=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


# -- image ---------------------------------------------------------------------


def _cmd_image_build(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.store import ensure_image

    started = time.monotonic()
    image = ensure_image(args.recipe, progress=_progress, rebuild=args.rebuild)
    print(
        f"{image.name}-{image.build_id}  {image.path}  ({_mib(image.size_bytes())}, "
        f"{time.monotonic() - started:.1f} s)"
    )
    return 0


def _cmd_image_list(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.info import warm_snapshots
    from pytest_gondolin.image.store import Image, images_root, list_images

    entries = list_images()
    if not entries:
        print(f"no images in {images_root()}")
    for entry in entries:
        if isinstance(entry, Image):
            m = entry.manifest
            warm = len(warm_snapshots(entry.path.name))
            print(
                f"{entry.path.name}  kernel {m.get('kernel_version')}  built {m.get('created')}  "
                f"{_mib(entry.size_bytes())}  warm snapshots: {warm}"
            )
        else:
            print(
                f"{entry.name}  INCOMPLETE (will be rebuilt on use; `gondolin image prune` removes it)"
            )
    return 0


def _cmd_image_inspect(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.info import image_status

    status = image_status(args.name)
    data = status.to_json()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if status.built else 1
    print(f"image:      {status.key}")
    print(f"build id:   {status.build_id}")
    if status.recipe is not None:
        print(f"recipe:     {status.recipe.directory}")
    print(f"path:       {status.path}")
    if not status.built:
        print(f"status:     not built yet (`gondolin image build {args.name}` builds it)")
        return 1
    manifest = data["manifest"]
    print("status:     built")
    print(f"created:    {manifest.get('created')}")
    print(f"kernel:     {manifest.get('kernel_version')}")
    print(f"suite:      {manifest.get('suite')}")
    print(f"packages:   {' '.join(str(p) for p in manifest.get('packages', []))}")
    print("files:")
    for name, size in data["files"].items():
        print(f"  {name:<16}{size:>13,} bytes  {status.path / name}")
    print(f"  {'total':<16}{data['size_bytes']:>13,} bytes")
    snaps = data["warm_snapshots"]
    if snaps:
        print(f"warm snapshots: {len(snaps)} (newest first; a VM restores one instead of booting)")
        for snap in snaps:
            print(f"  {snap['path']}  {_mib(snap['size_bytes'])}")
    else:
        print("warm snapshots: none (the first VM boots cold and saves one)")
    return 0


def _cmd_image_prune(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.info import qcow2_backing_file
    from pytest_gondolin.image.recipe import RECIPES_DIR, load_recipe
    from pytest_gondolin.image.store import prune_images
    from pytest_gondolin.vm.snapshot_paths import snapshots_dir

    keep = (
        set()
        if args.all
        else {load_recipe(p.name).image_key for p in RECIPES_DIR.iterdir() if p.is_dir()}
    )
    removed = prune_images(keep)
    # Warm snapshots whose image is gone can never be restored again.
    for snap in sorted(snapshots_dir().glob("*.qcow2")) if snapshots_dir().is_dir() else []:
        try:
            backing = qcow2_backing_file(snap)
        except GondolinError:
            backing = None
        if args.snapshots or backing is None or not os.path.exists(backing):
            snap.unlink(missing_ok=True)
            removed.append(snap)
    if args.snapshots:
        boot = paths.cache_root() / "boot"
        for initrd in sorted(boot.glob("initrd-*.img")) if boot.is_dir() else []:
            initrd.unlink(missing_ok=True)
            removed.append(initrd)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} removed")
    return 0


def _cmd_cache_export(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.archive import export_cache, host_facts

    started = time.monotonic()
    done = export_cache(args.file, progress=_progress, facts=host_facts(args.accel))
    for line in done.skipped:
        _progress(f"left out {line}")
    print(
        f"{done.path}: {done.files} files, {_mib(done.bytes)} ({time.monotonic() - started:.1f} s)"
    )
    return 0


def _cmd_cache_import(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.archive import host_facts
    from pytest_gondolin.image.archive_import import import_cache

    started = time.monotonic()
    try:
        here = host_facts(args.accel)
    except GondolinError as exc:  # no QEMU: images still come in, snapshots cannot be used
        _progress(f"snapshots will be skipped: {exc}")
        here = None
    done = import_cache(args.file, progress=_progress, here=here)
    for line in done.skipped:
        print(line)
    print(
        f"{len(done.installed)} imported, {len(done.present)} already in the cache, "
        f"{len(done.skipped)} skipped ({time.monotonic() - started:.1f} s)"
    )
    return 0


# -- guests ----------------------------------------------------------------------


def _shell_loop(run: Callable[[str], tuple[int, bytes, bytes]], banner: str) -> int:
    """Read lines from stdin and run each in the guest until EOF; returns 0."""
    print(banner, file=sys.stderr)
    while True:
        try:
            line = input("gondolin# ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        code, out, err = run(line)
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        sys.stderr.buffer.write(err)
        sys.stderr.flush()
        if code:
            print(f"[exit {code}]", file=sys.stderr)


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
    return VMFactory(settings, progress=_progress)


def _with_vm(args: argparse.Namespace, body: Callable[[VM], int]) -> int:
    """Boot a VM the way ``vm_factory(allow_hosts=...)`` does, run ``body``, close everything."""
    factory = _factory(args)
    try:
        return body(factory(allow_hosts=list(args.allow_host)))
    finally:
        factory.close_all()


def _cmd_exec(args: argparse.Namespace) -> int:
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


def _cmd_shell(args: argparse.Namespace) -> int:
    def body(vm: VM) -> int:
        def run(line: str) -> tuple[int, bytes, bytes]:
            r = vm.exec(line)
            return r.returncode, r.stdout_bytes, r.stderr_bytes

        return _shell_loop(
            run, "gondolin shell: each line runs in the guest with /bin/sh -c; Ctrl-D exits"
        )

    return _with_vm(args, body)


# -- kept VMs ---------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _cmd_ps(args: argparse.Namespace) -> int:
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


def _cmd_kill(args: argparse.Namespace) -> int:
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


def _cmd_attach(args: argparse.Namespace) -> int:
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
        return _shell_loop(
            run,
            f"gondolin: attached to kept VM {folder.id} (failed test: {test}); each line runs "
            f"in the guest with /bin/sh -c; Ctrl-D detaches, the VM keeps running "
            f"(`gondolin kill {folder.id}` stops it)",
        )
    finally:
        channel.close()


# -- version -----------------------------------------------------------------------


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


def _cmd_version(args: argparse.Namespace) -> int:
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


# -- parser --------------------------------------------------------------------------


def _env_default(name: str, fallback: str) -> str:
    """``$GONDOLIN_<NAME>`` if set (the plugin's precedence: env < command line), else ``fallback``."""
    return os.environ.get(f"GONDOLIN_{name.upper()}") or fallback


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gondolin",
        description="Sandboxed test execution in QEMU micro-VMs (pytest-gondolin).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[_Parser],
        name: str,
        func: Callable[[argparse.Namespace], int],
        summary: str,
        description: str,
    ) -> _Parser:
        p = parent.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}.\n\n{description}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func, parser=p)
        return p

    image = sub.add_parser(
        "image",
        help="build, list, inspect and prune cached guest images",
        description="Build, list, inspect and prune cached guest images.",
    )
    isub = image.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")
    build = command(
        isub,
        "build",
        _cmd_image_build,
        "build the guest image, or find it in the cache",
        "The image is cached by the hash of its recipe; building needs root (mmdebstrap).",
    )
    build.add_argument(
        "recipe", nargs="?", default="bookworm", help="recipe name or folder (default: bookworm)"
    )
    build.add_argument("--rebuild", action="store_true", help="build even if a cached image exists")
    command(
        isub,
        "list",
        _cmd_image_list,
        "list cached images",
        "One line per image folder in the cache, with its size and warm snapshot count.",
    )
    inspect = command(
        isub,
        "inspect",
        _cmd_image_inspect,
        "show an image's manifest, files, sizes and warm snapshots",
        "Never builds. Exit code 1 if the image is not built yet.",
    )
    inspect.add_argument(
        "name",
        nargs="?",
        default=_env_default("image", "bookworm"),
        help="recipe name or folder, image folder, or a cached NAME-BUILDID "
        "(default: $GONDOLIN_IMAGE or bookworm)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    prune = command(
        isub,
        "prune",
        _cmd_image_prune,
        "remove images no current recipe produces, and abandoned builds",
        "Also removes warm snapshots whose image is gone.",
    )
    prune.add_argument("--all", action="store_true", help="remove every cached image")
    prune.add_argument(
        "--snapshots",
        action="store_true",
        help="also remove every warm snapshot and cached boot payload (rebuilt on next use)",
    )

    cache = sub.add_parser(
        "cache",
        help="move the cache between machines as one archive",
        description="Move images, warm snapshots and the guests' CA between machines.",
    )
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    for name, func, summary, description in (
        (
            "export",
            _cmd_cache_export,
            "write the cached images, CA and warm snapshots to one archive FILE",
            "FILE.tar.gz / .tgz / .tar.xz are compressed, anything else is a plain tar.\n"
            "The archive holds the CA key the guests trust: keep it as private as the cache.",
        ),
        (
            "import",
            _cmd_cache_import,
            "check an archive FILE and add what it holds to the cache",
            "Sizes and SHA-256 of every file are checked before anything is added; snapshots\n"
            "of another QEMU version, machine type or accelerator are skipped with a message.",
        ),
    ):
        p = command(csub, name, func, summary, description)
        p.add_argument("file", type=Path, metavar="FILE", help="the archive")
        p.add_argument(
            "--accel",
            default=_env_default("accel", "auto"),
            choices=("auto", "kvm", "tcg"),
            help="the accelerator snapshots are for (default: $GONDOLIN_ACCEL or auto)",
        )

    for name, func, summary, description in (
        (
            "exec",
            _cmd_exec,
            "run one command in a fresh guest",
            "The command's exit code, stdout and stderr are passed through.\n"
            "example: gondolin exec --allow-host example.org -- curl -sI https://example.org/",
        ),
        (
            "shell",
            _cmd_shell,
            "an interactive shell in a fresh guest",
            "Each line runs in the guest with /bin/sh -c; Ctrl-D exits and removes the guest.",
        ),
    ):
        p = command(sub, name, func, summary, description)
        p.add_argument(
            "--image",
            default=_env_default("image", "bookworm"),
            help="recipe name, recipe folder or image folder (default: $GONDOLIN_IMAGE or bookworm)",
        )
        p.add_argument(
            "--memory",
            default=_env_default("memory", "256M"),
            help="guest memory, e.g. 512M or 1G (default: $GONDOLIN_MEMORY or 256M)",
        )
        p.add_argument(
            "--accel",
            default=_env_default("accel", "auto"),
            choices=("auto", "kvm", "tcg"),
            help="accelerator (default: $GONDOLIN_ACCEL or auto: KVM if it works, else TCG)",
        )
        p.add_argument(
            "--allow-host",
            action="append",
            default=[],
            metavar="HOST",
            help="let the guest reach HOST (name, *.wildcard, optional :port); repeatable; "
            "default: deny all egress",
        )
        if name == "exec":
            p.add_argument(
                "--timeout", type=float, default=None, help="seconds before the command is killed"
            )
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    ps = command(
        sub,
        "ps",
        _cmd_ps,
        "list VMs kept by pytest --gondolin-keep-vm",
        "A kept VM stays up after its failing test until `gondolin kill ID` or the next pytest run.",
    )
    ps.add_argument("--all", action="store_true", help="also list VMs of running sessions")
    ps.add_argument("--json", action="store_true", help="print JSON")

    attach = command(
        sub,
        "attach",
        _cmd_attach,
        "a shell (or one command) in a kept VM",
        "The VM is in the state its failing test left it in; detaching leaves it running.",
    )
    attach.add_argument("id", help="the VM id `gondolin ps` shows (a unique prefix will do)")
    attach.add_argument(
        "--timeout", type=float, default=None, help="with a command: seconds before it is killed"
    )
    attach.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] (default: a shell)"
    )

    kill = command(
        sub,
        "kill",
        _cmd_kill,
        "stop kept VMs and remove their files",
        "The next pytest run removes kept VMs anyway.",
    )
    kill.add_argument("ids", nargs="*", metavar="ID", help="VM ids as `gondolin ps` shows them")
    kill.add_argument("--all", action="store_true", help="every kept VM")

    version = command(
        sub,
        "version",
        _cmd_version,
        "print versions, the accelerator choice and the cache folder",
        "The accelerator is probed as pytest would: KVM only if a functional check passes.",
    )
    version.add_argument(
        "--accel",
        default=_env_default("accel", "auto"),
        choices=("auto", "kvm", "tcg"),
        help="accelerator request to resolve (default: $GONDOLIN_ACCEL or auto)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except GondolinError as exc:
        print(f"gondolin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gondolin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gondolin image inspect | head`): no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
