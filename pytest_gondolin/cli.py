"""The ``gondolin`` command: images, one-off guests, an interactive shell."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from pytest_gondolin import __version__, paths
from pytest_gondolin.errors import GondolinError


def _progress(msg: str) -> None:
    print(f"gondolin: {msg}", file=sys.stderr, flush=True)


def _cmd_image_build(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.store import ensure_image

    started = time.monotonic()
    image = ensure_image(args.recipe, progress=_progress, rebuild=args.rebuild)
    print(
        f"{image.name}-{image.build_id}  {image.path}  ({image.size_bytes() / 2**20:.0f} MiB, "
        f"{time.monotonic() - started:.1f} s)"
    )
    return 0


def _cmd_image_list(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.store import Image, list_images

    entries = list_images()
    if not entries:
        print(f"no images in {paths.cache_dir() / 'images'}")
    for entry in entries:
        if isinstance(entry, Image):
            m = entry.manifest
            print(
                f"{entry.path.name}  kernel {m.get('kernel_version')}  built {m.get('created')}  "
                f"{entry.size_bytes() / 2**20:.0f} MiB"
            )
        else:
            print(
                f"{entry.name}  INCOMPLETE (will be rebuilt on use; `gondolin image prune` removes it)"
            )
    return 0


def _cmd_image_prune(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.recipe import RECIPES_DIR, load_recipe
    from pytest_gondolin.image.store import prune_images

    keep = (
        set()
        if args.all
        else {load_recipe(p.name).image_key for p in RECIPES_DIR.iterdir() if p.is_dir()}
    )
    removed = prune_images(keep)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} removed")
    return 0


def _boot(args: argparse.Namespace) -> object:
    from pytest_gondolin.config import parse_memory
    from pytest_gondolin.image.store import ensure_image
    from pytest_gondolin.vm.accel import choose_accel
    from pytest_gondolin.vm.machine import VM, VMConfig
    from pytest_gondolin.vm.reaper import reap_orphans

    reap_orphans()
    accel = choose_accel(args.accel)
    image = ensure_image(args.image, progress=_progress)
    config = VMConfig(
        image=image, accel=accel.name, memory_mib=parse_memory(args.memory, "--memory")
    )
    _progress(f"booting ({accel.name}: {accel.reason})")
    return VM.launch(config, name="cli")


def _cmd_exec(args: argparse.Namespace) -> int:
    from pytest_gondolin.vm.machine import VM

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("gondolin exec: give a command after --, e.g. gondolin exec -- uname -a")
    vm = _boot(args)
    assert isinstance(vm, VM)
    with vm:
        result = vm.exec(command, timeout=args.timeout)
        sys.stdout.buffer.write(result.stdout_bytes)
        sys.stderr.buffer.write(result.stderr_bytes)
        return result.returncode


def _cmd_shell(args: argparse.Namespace) -> int:
    from pytest_gondolin.vm.machine import VM

    vm = _boot(args)
    assert isinstance(vm, VM)
    with vm:
        print(
            "gondolin shell: each line runs in the guest with /bin/sh -c; Ctrl-D exits",
            file=sys.stderr,
        )
        while True:
            try:
                line = input("gondolin# ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            result = vm.exec(line)
            sys.stdout.buffer.write(result.stdout_bytes)
            sys.stdout.flush()
            sys.stderr.buffer.write(result.stderr_bytes)
            sys.stderr.flush()
            if result.returncode:
                print(f"[exit {result.returncode}]", file=sys.stderr)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"pytest-gondolin {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gondolin", description="Sandboxed test execution in QEMU micro-VMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="build, list and prune cached guest images")
    isub = image.add_subparsers(dest="image_command", required=True)
    build = isub.add_parser("build", help="build (or find in the cache) the guest image")
    build.add_argument(
        "recipe", nargs="?", default="bookworm", help="recipe name or folder (default: bookworm)"
    )
    build.add_argument("--rebuild", action="store_true", help="build even if a cached image exists")
    build.set_defaults(func=_cmd_image_build)
    isub.add_parser("list", help="list cached images").set_defaults(func=_cmd_image_list)
    prune = isub.add_parser(
        "prune", help="remove images no current recipe produces, and abandoned builds"
    )
    prune.add_argument("--all", action="store_true", help="remove every cached image")
    prune.set_defaults(func=_cmd_image_prune)

    for name, func, helptext in (
        ("exec", _cmd_exec, "run one command in a fresh guest; exit code passed through"),
        ("shell", _cmd_shell, "an interactive shell in a fresh guest"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--image", default="bookworm", help="recipe name, recipe folder or image folder"
        )
        p.add_argument("--memory", default="256M", help="guest memory (default 256M)")
        p.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
        if name == "exec":
            p.add_argument(
                "--timeout", type=float, default=None, help="seconds before the command is killed"
            )
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
        p.set_defaults(func=func)

    sub.add_parser("version", help="print the version").set_defaults(func=_cmd_version)
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
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
