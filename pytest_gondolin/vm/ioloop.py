"""One background asyncio loop for the async libraries we drive (qemu.qmp).

Our public API is synchronous (pytest fixtures); qemu.qmp is asyncio. A
single daemon thread runs the loop; :func:`run` submits a coroutine and
waits for it with a bound, so pytest's thread never blocks on the loop's
internals and never nests event loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """Return the shared loop, starting its thread on first use."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            new = asyncio.new_event_loop()
            thread = threading.Thread(target=new.run_forever, name="gondolin-io", daemon=True)
            thread.start()
            _loop = new
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on the shared loop and return its result within ``timeout`` seconds.

    Raises :class:`TimeoutError` (after cancelling the coroutine) when it takes longer.
    """
    future = asyncio.run_coroutine_threadsafe(coro, loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"operation did not finish within {timeout} s") from None
