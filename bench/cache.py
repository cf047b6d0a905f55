"""Cache archive benchmarks: export, import into an empty cache, the first VM after it.

The source cache holds the real image (hard links) and the CA, plus one
warm snapshot made there by one cold boot: what a CI job caches. Each
import goes into a fresh empty ``GONDOLIN_CACHE_DIR`` (another path, as on
another machine); the first VM there must restore, not boot.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pytest_gondolin.image.archive import export_cache, host_facts
from pytest_gondolin.image.archive_import import import_cache
from pytest_gondolin.image.store import ensure_image
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.warm import launch_clean

Row = tuple[str, str, str]


def _quiet(msg: str) -> None:
    pass


def cache_section(config: VMConfig, n: int) -> list[Row]:
    saved = os.environ.get("GONDOLIN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-cache-") as tmp:
        src, archive = Path(tmp) / "a", Path(tmp) / "cache.tar"
        image = src / "images" / config.image.path.name
        image.mkdir(parents=True)
        for f in config.image.path.iterdir():
            os.link(f, image / f.name)
        try:
            os.environ["GONDOLIN_CACHE_DIR"] = str(src)
            local = VMConfig(image=ensure_image(str(image)), accel=config.accel)
            launch_clean(local, name="bench-seed", progress=_quiet).close()  # one cold boot
            started = time.perf_counter()
            done = export_cache(archive, progress=_quiet, facts=host_facts(config.accel))
            export_s = time.perf_counter() - started
            imports, firsts = [], []
            for i in range(max(3, n // 5)):
                dest = Path(tmp) / f"b{i}"
                os.environ["GONDOLIN_CACHE_DIR"] = str(dest)
                started = time.perf_counter()
                import_cache(archive, progress=_quiet, here=host_facts(config.accel))
                imports.append(time.perf_counter() - started)
                said: list[str] = []
                imported = VMConfig(image=ensure_image(), accel=config.accel)
                started = time.perf_counter()
                launch_clean(imported, name="bench-first", progress=said.append).close()
                firsts.append(time.perf_counter() - started)
                if not any("restored from the cached ready snapshot" in m for m in said):
                    raise SystemExit(f"the imported cache booted cold: {said}")
                shutil.rmtree(dest)
        finally:
            if saved is None:
                os.environ.pop("GONDOLIN_CACHE_DIR", None)
            else:
                os.environ["GONDOLIN_CACHE_DIR"] = saved
    size = f"{done.bytes / 2**20:.0f} MiB, {done.files} files (image + CA + 1 warm snapshot)"
    return [
        ("`gondolin cache export` (plain tar)", f"{export_s:.1f} s", f"one run; {size}"),
        (
            "`gondolin cache import` into an empty cache",
            f"{statistics.median(imports):.1f} s",
            f"median of {len(imports)}; every file hashed, staged, renamed into place",
        ),
        (
            "first VM after the import (restores the imported snapshot, no build, no boot)",
            f"{statistics.median(firsts):.2f} s",
            f"median of {len(firsts)}",
        ),
    ]
