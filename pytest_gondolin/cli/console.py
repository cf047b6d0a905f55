"""What the ``gondolin`` commands share: progress lines, sizes, the interactive line loop."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["mib", "progress", "shell_loop"]


def progress(msg: str) -> None:
    """One ``gondolin: ...`` line on stderr, flushed (stdout stays for results)."""
    print(f"gondolin: {msg}", file=sys.stderr, flush=True)


def mib(size: int) -> str:
    """``size`` bytes in whole MiB, as the listings show it."""
    return f"{size / 2**20:.0f} MiB"


def shell_loop(run: Callable[[str], tuple[int, bytes, bytes]], banner: str) -> int:
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
