"""The ``gondolin`` command: images, one-off guests, shells, and VMs kept for debugging.

Parser and entry point here; the commands are in :mod:`.images` (images
and the cache archive), :mod:`.guests` (``exec``, ``shell``, ``version``)
and :mod:`.kept` (``ps``, ``attach``, ``kill``).

Exit codes: 0 success (``exec`` and ``attach -- CMD`` pass the guest
command's code through), 1 a negative answer (``image inspect`` of an image
not built yet), 2 a usage or runtime error, reported as ``gondolin: error:
...`` on stderr, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pytest_gondolin.cli.guests import cmd_exec, cmd_shell, cmd_version
from pytest_gondolin.cli.images import (
    cmd_cache_export,
    cmd_cache_import,
    cmd_image_build,
    cmd_image_inspect,
    cmd_image_list,
    cmd_image_prune,
)
from pytest_gondolin.cli.kept import cmd_attach, cmd_kill, cmd_ps
from pytest_gondolin.errors import GondolinError

__all__ = ["build_parser", "main"]

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
        cmd_image_build,
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
        cmd_image_list,
        "list cached images",
        "One line per image folder in the cache, with its size and warm snapshot count.",
    )
    inspect = command(
        isub,
        "inspect",
        cmd_image_inspect,
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
        cmd_image_prune,
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
            cmd_cache_export,
            "write the cached images, CA and warm snapshots to one archive FILE",
            "FILE.tar.gz / .tgz / .tar.xz are compressed, anything else is a plain tar.\n"
            "The archive holds the CA key the guests trust: keep it as private as the cache.",
        ),
        (
            "import",
            cmd_cache_import,
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
            cmd_exec,
            "run one command in a fresh guest",
            "The command's exit code, stdout and stderr are passed through.\n"
            "example: gondolin exec --allow-host example.org -- curl -sI https://example.org/",
        ),
        (
            "shell",
            cmd_shell,
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
        cmd_ps,
        "list VMs kept by pytest --gondolin-keep-vm",
        "A kept VM stays up after its failing test until `gondolin kill ID` or the next pytest run.",
    )
    ps.add_argument("--all", action="store_true", help="also list VMs of running sessions")
    ps.add_argument("--json", action="store_true", help="print JSON")

    attach = command(
        sub,
        "attach",
        cmd_attach,
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
        cmd_kill,
        "stop kept VMs and remove their files",
        "The next pytest run removes kept VMs anyway.",
    )
    kill.add_argument("ids", nargs="*", metavar="ID", help="VM ids as `gondolin ps` shows them")
    kill.add_argument("--all", action="store_true", help="every kept VM")

    version = command(
        sub,
        "version",
        cmd_version,
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
