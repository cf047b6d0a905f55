"""Benchmarks for pytest-gondolin: prints a table, optionally writes it into README.md.

    python bench/run.py                 # all sections
    python bench/run.py --write-readme  # ... and replace the table in README.md
    python bench/run.py --quick         # fewer repetitions (smoke test of the script)

Ratios are measured within one run (e.g. sandboxed vs plain tests in the same
inner pytest session), because this machine is noisy.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_gondolin.image.store import ensure_image  # noqa: E402
from pytest_gondolin.vm.accel import choose_accel  # noqa: E402
from pytest_gondolin.vm.identity import VMConfig  # noqa: E402
from pytest_gondolin.vm.machine import VM  # noqa: E402
from pytest_gondolin.vm.warm import CLEAN_TAG, launch_clean  # noqa: E402

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

Row = tuple[str, str, str]

#: The table's sections (``--only`` picks some; all by default).
SECTIONS = (
    "vm",
    "fixture",
    "sandboxed",
    "network",
    "https",
    "streams",
    "cache",
    "layers",
    "scaling",
    "isolation",
    "rerun",
)


def med_ms(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """Median and p90 of ``fn``'s wall time in ms over ``n`` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.9))]


def vm_section(config: VMConfig, n: int) -> list[Row]:
    rows: list[Row] = []
    boots = []
    for _ in range(max(3, n // 4)):
        vm = VM.launch(config, name="bench-cold")
        boots.append(vm.boot_seconds or 0)
        vm.close()
    rows.append(
        ("cold boot to agent ready", f"{statistics.median(boots):.2f} s", f"median of {len(boots)}")
    )
    template = launch_clean(config, name="bench-warm")  # makes sure the cache exists
    template.close()
    warm = []
    for _ in range(max(3, n // 4)):
        started = time.perf_counter()
        vm = launch_clean(config, name="bench-warm")
        warm.append(time.perf_counter() - started)
        vm.close()
    rows.append(
        (
            "start from the cached ready snapshot (new QEMU)",
            f"{statistics.median(warm):.2f} s",
            f"median of {len(warm)}",
        )
    )
    vm = launch_clean(config, name="bench")
    try:
        m, p90 = med_ms(lambda: vm.exec(["true"]), n * 2)
        rows.append(
            ("exec round trip (`true`)", f"{m:.1f} ms", f"median of {n * 2}, p90 {p90:.1f} ms")
        )
        m, p90 = med_ms(lambda: vm.read_file("/etc/hostname"), n * 2)
        rows.append(
            (
                "agent request round trip (read 9-byte file)",
                f"{m:.1f} ms",
                f"median of {n * 2}, p90 {p90:.1f} ms",
            )
        )
        m, p90 = med_ms(lambda: vm.load_internal(CLEAN_TAG), n * 2)
        rows.append(
            (
                "restore snapshot until agent answers",
                f"{m:.0f} ms",
                f"median of {n * 2}, p90 {p90:.0f} ms",
            )
        )
        after = []
        for _ in range(n):
            vm.load_internal(CLEAN_TAG)
            started = time.perf_counter()
            vm.exec(["true"])
            after.append((time.perf_counter() - started) * 1000)
        rows.append(
            (
                "first `exec` after a restore (guest code runs cold under TCG)",
                f"{statistics.median(after):.0f} ms",
                f"median of {n}",
            )
        )
        blob = os.urandom(8 * 1024 * 1024)
        m, _ = med_ms(lambda: vm.write_file("/tmp/blob", blob), 5)
        rows.append(("write_file 8 MiB", f"{8 / (m / 1000):.0f} MiB/s", "median of 5"))
        m, _ = med_ms(lambda: vm.read_file("/tmp/blob"), 5)
        rows.append(("read_file 8 MiB", f"{8 / (m / 1000):.0f} MiB/s", "median of 5"))
    finally:
        vm.close()
    return rows


def _inner_run(tests: str, n_plain: int, args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="gondolin-bench-") as tmp:
        (Path(tmp) / "test_bench.py").write_text(tests)
        out = Path(tmp) / "times.json"
        env = {**os.environ, "GONDOLIN_BENCH_OUT": str(out), "PYTHONPATH": str(ROOT / "bench")}
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "gondolin",
                "-p",
                "timing_plugin",
                "-q",
                "-p",
                "no:cacheprovider",
                "test_bench.py",
                *args,
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise SystemExit(
                f"inner pytest run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        return dict(json.loads(out.read_text()))


def fixture_section(n: int) -> list[Row]:
    tests = textwrap.dedent(f"""
        import pytest

        @pytest.mark.parametrize("i", range({n + 1}))
        def test_plain(i):
            assert i >= 0

        @pytest.mark.parametrize("i", range({n + 1}))
        def test_vm(vm, i):
            assert vm is not None

        @pytest.mark.parametrize("i", range({n + 1}))
        def test_vm_exec(vm, i):
            assert vm.exec("echo hi; ls /tmp").stdout.startswith("hi")
        """)
    times = _inner_run(tests, n, [])
    plain = [v for k, v in times.items() if "test_plain" in k][1:]
    # The first of each kind starts the VMs.
    with_vm = [v for k, v in times.items() if "test_vm[" in k][1:]
    with_exec = [v for k, v in times.items() if "test_vm_exec[" in k][1:]
    p, v = statistics.median(plain) * 1000, statistics.median(with_vm) * 1000
    e = statistics.median(with_exec) * 1000
    return [
        (
            "per-test cost: test using `vm` vs plain test",
            f"{v:.0f} ms vs {p:.1f} ms",
            f"median of {len(with_vm)}; overhead {v - p:.0f} ms",
        ),
        (
            "test using `vm` that runs one shell command (`echo hi; ls /tmp`)",
            f"{e:.0f} ms",
            f"median of {len(with_exec)}; the whole test, restore wait included",
        ),
    ]


def sandboxed_section(n: int) -> list[Row]:
    tests = textwrap.dedent(f"""
        import pytest

        @pytest.mark.parametrize("i", range({n + 1}))
        def test_plain(i):
            assert i * 2 == i + i

        @pytest.mark.sandboxed
        @pytest.mark.parametrize("i", range({n + 1}))
        def test_sandboxed(i):
            assert i * 2 == i + i
        """)
    times = _inner_run(tests, n, [])
    plain = [v for k, v in times.items() if "test_plain" in k][1:]
    boxed = [v for k, v in times.items() if "test_sandboxed" in k]
    first, rest = boxed[0], boxed[1:]
    p, s = statistics.median(plain) * 1000, statistics.median(rest) * 1000
    return [
        (
            "per-test cost: sandboxed test vs the same test plain",
            f"{s:.0f} ms vs {p:.1f} ms",
            f"median of {len(rest)}; overhead {s - p:.0f} ms",
        ),
        (
            "first sandboxed test of a session (VM, copy, guest pytest start, collection)",
            f"{first:.1f} s",
            "once per session",
        ),
    ]


def render(rows: list[Row], accel: str) -> str:
    lines = [
        f"Measured by `make bench` on {platform.node() or 'this machine'}: {os.cpu_count()} CPUs, "
        f"accelerator **{accel}**, {time.strftime('%Y-%m-%d')}.",
        "",
        "| what | result | notes |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def merge_rows(old_table: str, rows: list[Row], new_table: str) -> str:
    """``old_table`` with ``rows`` in place of the rows of the same name; new ones follow the last of them."""
    lines = old_table.strip("\n").splitlines()
    rendered = {a: f"| {a} | {b} | {c} |" for a, b, c in rows}
    named = [line.split(" | ", 1)[0].removeprefix("| ") for line in lines]
    last = max((i for i, name in enumerate(named) if name in rendered), default=len(lines) - 1)
    out = [rendered.pop(name, line) for name, line in zip(named, lines, strict=True)]
    out[last + 1 : last + 1] = list(rendered.values())
    out[0] = new_table.splitlines()[0]  # the "Measured by ..." line: today's date
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions, to check the script works"
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
    )
    args = parser.parse_args()
    # The package's bytecode, as pip writes it for an installed package: a
    # checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise compile every
    # changed module in each timed pytest process (~1 s of its start-up here).
    compileall.compile_dir(ROOT / "pytest_gondolin", quiet=1)
    n = 5 if args.quick else 20
    accel = choose_accel(os.environ.get("GONDOLIN_ACCEL", "auto")).name
    config = VMConfig(image=ensure_image(), accel=accel)
    rows: list[Row] = []
    only = set(args.only or SECTIONS)
    if "vm" in only:
        rows += vm_section(config, n)
    if "fixture" in only:
        rows += fixture_section(n)
    if "sandboxed" in only:
        rows += sandboxed_section(max(n, 30) if not args.quick else n)
    if "network" in only:
        from network import network_section

        rows += network_section(config, n)
    if "https" in only:
        from tls_throughput import https_section

        rows += https_section(config, 3 if args.quick else 5)
    if "streams" in only:
        from streams import streams_section

        rows += streams_section(config, n)
    if "cache" in only:
        from cache import cache_section

        rows += cache_section(config, n)
    if "layers" in only:
        from layers import layers_section

        rows += layers_section(config)
    if "scaling" in only:
        from scaling import scaling_section

        rows += scaling_section(n)
    if "rerun" in only:
        from rerun import rerun_section

        rows += rerun_section(2 if args.quick else 3)
    if "isolation" in only:
        from isolation import isolation_section

        rows += isolation_section(n, 50 if args.quick else 500)
    table = render(rows, accel)
    print(table)
    if args.write_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
        head, _, rest = text.partition(BEGIN)
        old, _, tail = rest.partition(END)
        if args.only:
            # Some sections only: keep the other sections' rows as they are.
            table = merge_rows(old, rows, table)
        readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
