"""``gondolin image build|list|inspect|prune`` and ``gondolin cache export|import``.

The cached guest images and the cache as one archive, as the command line
shows them; the work is :mod:`pytest_gondolin.image`'s (imported when a
command runs, so ``gondolin --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pytest_gondolin import paths
from pytest_gondolin.cli.console import mib, progress
from pytest_gondolin.errors import GondolinError

__all__ = [
    "cmd_cache_export",
    "cmd_cache_import",
    "cmd_image_build",
    "cmd_image_inspect",
    "cmd_image_list",
    "cmd_image_prune",
]


def cmd_image_build(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.store import ensure_image

    started = time.monotonic()
    image = ensure_image(args.recipe, progress=progress, rebuild=args.rebuild)
    print(
        f"{image.name}-{image.build_id}  {image.path}  ({mib(image.size_bytes())}, "
        f"{time.monotonic() - started:.1f} s)"
    )
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
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
                f"{mib(entry.size_bytes())}  warm snapshots: {warm}"
            )
        else:
            print(
                f"{entry.name}  INCOMPLETE (will be rebuilt on use; `gondolin image prune` removes it)"
            )
    return 0


def cmd_image_inspect(args: argparse.Namespace) -> int:
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
            print(f"  {snap['path']}  {mib(snap['size_bytes'])}")
    else:
        print("warm snapshots: none (the first VM boots cold and saves one)")
    return 0


def cmd_image_prune(args: argparse.Namespace) -> int:
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


def cmd_cache_export(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.archive import export_cache, host_facts

    started = time.monotonic()
    done = export_cache(args.file, progress=progress, facts=host_facts(args.accel))
    for line in done.skipped:
        progress(f"left out {line}")
    print(
        f"{done.path}: {done.files} files, {mib(done.bytes)} ({time.monotonic() - started:.1f} s)"
    )
    return 0


def cmd_cache_import(args: argparse.Namespace) -> int:
    from pytest_gondolin.image.archive import host_facts
    from pytest_gondolin.image.archive_import import import_cache

    started = time.monotonic()
    try:
        here = host_facts(args.accel)
    except GondolinError as exc:  # no QEMU: images still come in, snapshots cannot be used
        progress(f"snapshots will be skipped: {exc}")
        here = None
    done = import_cache(args.file, progress=progress, here=here)
    for line in done.skipped:
        print(line)
    print(
        f"{len(done.installed)} imported, {len(done.present)} already in the cache, "
        f"{len(done.skipped)} skipped ({time.monotonic() - started:.1f} s)"
    )
    return 0
