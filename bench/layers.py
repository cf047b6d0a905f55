"""Benchmark rows for layered ready snapshots (issue 12): the host environment, system packages.

    python bench/layers.py          # print these rows only

Runs in a private cache (the real image, CA and warm snapshot shared), so
"first run" really builds each layer. The environment is synthetic: a site
folder of ~50 distributions of ~1.2 MiB of Python source each (with
metadata and RECORD, as pip leaves them), scanned and packed the way a
sandboxed session does (``sandbox/host_environment.py``): into a file-system
image the guest mounts (``sandbox/environment_image.py``), and for comparison
in the same run the tar layer it replaced (used where no image can be built).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_gondolin import paths  # noqa: E402
from pytest_gondolin.image.store import Image  # noqa: E402
from pytest_gondolin.image.system_packages import system_packages_layer  # noqa: E402
from pytest_gondolin.sandbox import environment_image, host_environment  # noqa: E402
from pytest_gondolin.vm.identity import VMConfig, state_key  # noqa: E402
from pytest_gondolin.vm.layers import Layer, launch_layered, tar_layer  # noqa: E402

Row = tuple[str, str, str]

DISTRIBUTIONS = 50
MODULES_PER_DIST = 12
MODULE_BYTES = 100 * 1024


def _synthetic_site(folder: Path) -> int:
    """``DISTRIBUTIONS`` installed distributions in ``folder``; their total size in bytes."""
    rng = random.Random(12)
    total = 0
    for d in range(DISTRIBUTIONS):
        name = f"benchdist{d:02d}"
        pkg = folder / name
        pkg.mkdir(parents=True)
        record = []
        for m in range(MODULES_PER_DIST):
            words = " ".join(
                "".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(MODULE_BYTES // 9)
            )
            text = f'"""{words}"""\nVALUE = {m}\n'
            (pkg / f"mod{m}.py").write_text(text)
            record.append(f"{name}/mod{m}.py,,")
            total += len(text)
        (pkg / "__init__.py").write_text("")
        info = folder / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        record += [f"{name}/__init__.py,,", f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
        (info / "RECORD").write_text("\n".join(record) + "\n")
    return total


def _private_cache(tmp: Path, config: VMConfig) -> None:
    real = paths.cache_dir()
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "images").symlink_to(real / "images")
    shutil.copytree(real / "ca", cache / "ca")
    os.environ["GONDOLIN_CACHE_DIR"] = str(cache)
    (cache / "snapshots").mkdir()
    key = state_key(config)
    source = real / "snapshots" / f"{key}.qcow2"
    if source.exists():
        shutil.copyfile(source, cache / "snapshots" / f"{key}.qcow2")


def _start(config: VMConfig, layers: list[Layer]) -> float:
    started = time.monotonic()
    vm = launch_layered(config, layers, name="bench-layers")
    seconds = time.monotonic() - started
    vm.close()
    return seconds


def _paired(config: VMConfig, layers: list[Layer], n: int = 9) -> tuple[float, float, float]:
    """Starts without and with ``layers`` (cached), interleaved, as the host is noisy.

    Returns the median of each and the median of the pairwise differences.
    """
    without, with_layers = [], []
    for _ in range(n):
        without.append(_start(config, []))
        with_layers.append(_start(config, layers))
    differences = [b - a for a, b in zip(without, with_layers, strict=True)]
    return (
        statistics.median(without),
        statistics.median(with_layers),
        statistics.median(differences),
    )


def layers_section(config: VMConfig) -> list[Row]:
    rows: list[Row] = []
    saved = os.environ.get("GONDOLIN_CACHE_DIR")
    # Not under /tmp: the guest's /tmp (like /root, /var/tmp) is a tmpfs, and a
    # venv there would be guest RAM, not disk. The bench folder is on disk in both.
    with tempfile.TemporaryDirectory(prefix=".layers-", dir=ROOT / "bench") as tmp:
        try:
            _private_cache(Path(tmp), config)
            site = Path(tmp) / "site-packages"
            size = _synthetic_site(site)
            base = statistics.median(_start(config, []) for _ in range(3))
            scan_started = time.monotonic()
            env = host_environment.scan(
                Path(tmp) / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
            )
            scanned = time.monotonic() - scan_started
            # The tar layer first (old way, and the fallback), then the image: same run.
            items = host_environment.layer_items(env, Path(tmp) / "packs")
            tar_first = _start(config, [tar_layer("host-environment", items)])
            image_started = time.monotonic()
            image = environment_image.prepare(env, Path(tmp) / "host-environment")
            assert image is not None, "mkfs.ext4 missing: no image to measure"
            built = time.monotonic() - image_started
            layer = environment_image.image_layer("host-environment", image, [])
            first = _start(config, [layer]) + built
            rescan_started = time.monotonic()
            again = host_environment.scan(
                Path(tmp) / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
            )
            again_image = environment_image.prepare(again, Path(tmp) / "host-environment")
            assert again_image == image, "nothing changed: the same image"
            rescanned = time.monotonic() - rescan_started
            plain, layered, extra = _paired(config, [layer])
            what = f"{len(env.carried)} distributions, {size / 2**20:.0f} MiB"
            rows.append(
                (
                    f"host environment carried into the guest ({what}): extra start-up, first run",
                    f"{first - base + scanned:.1f} s",
                    f"scan {scanned:.2f} s + image file made {built:.2f} s + image built (while "
                    f"the VM starts), mounted, saved and cached {first - built - base:.1f} s "
                    f"(start without it: {base:.2f} s); synthetic venv",
                )
            )
            rows.append(
                (
                    "same, first run with the tar layer (no mkfs.ext4 on the host)",
                    f"{tar_first - base + scanned:.1f} s",
                    "the layer unpacked through the agent channel, measured in the same run",
                )
            )
            rows.append(
                (
                    "host environment, second run with nothing changed: extra start-up",
                    f"{extra + rescanned:.2f} s",
                    f"scan and image check {rescanned:.2f} s + median difference of 9 interleaved starts "
                    f"{extra:.2f} s (medians {layered:.2f} s vs {plain:.2f} s); nothing copied",
                )
            )
            image: Image = config.image
            packages = system_packages_layer(image, ["less", "git"])
            built = _start(config, [packages])
            plain, reused, extra = _paired(config, [packages])
            rows.append(
                (
                    "system packages `less git`: layer build, first run",
                    f"{built - base:.0f} s",
                    "apt in the guest through the archive-only policy, then cached",
                )
            )
            rows.append(
                (
                    "system packages `less git`, later runs: extra start-up",
                    f"{extra:.2f} s",
                    f"median difference of 9 interleaved starts (medians {reused:.2f} s "
                    f"vs {plain:.2f} s)",
                )
            )
        finally:
            if saved is None:
                os.environ.pop("GONDOLIN_CACHE_DIR", None)
            else:
                os.environ["GONDOLIN_CACHE_DIR"] = saved
    return rows


def main() -> int:
    from pytest_gondolin.image.store import ensure_image
    from pytest_gondolin.vm.accel import choose_accel

    accel = choose_accel(os.environ.get("GONDOLIN_ACCEL", "auto")).name
    config = VMConfig(image=ensure_image(), accel=accel)
    for what, result, notes in layers_section(config):
        print(f"| {what} | {result} | {notes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
