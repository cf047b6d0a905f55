"""Option parsing, QEMU command lines and checkpoint metadata (no VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gondolin import config as cfg
from pytest_gondolin.errors import ConfigError, SnapshotError
from pytest_gondolin.vm import checkpoint
from pytest_gondolin.vm.qemu import AGENT_PORT_NAME, MachineSpec, command_line


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        (256, 256),
        ("256", 256),
        ("256M", 256),
        ("1G", 1024),
        ("1GiB", 1024),
        ("2g", 2048),
        ("524288K", 512),
    ],
)
def test_memory_sizes(value: object, mib: int) -> None:
    assert cfg.parse_memory(value, "test") == mib


@pytest.mark.parametrize("value", ["lots", "12X", "", "1.5G", True, "64", "100G", -1])
def test_bad_memory_names_value_and_source(value: object) -> None:
    with pytest.raises(ConfigError, match=r"--gondolin-memory: memory must") as info:
        cfg.parse_memory(value, "--gondolin-memory")
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("", ()),
        ([], ()),
        ("six", ("six",)),
        ("requests==2.32.3 six", ("requests==2.32.3", "six")),  # flag / env
        ("\n    six==1.16.0\n    attrs\n", ("six==1.16.0", "attrs")),  # ini lines
        ("a b\nc", ("a", "b", "c")),
        (["attrs", "six==1.16.0"], ("attrs", "six==1.16.0")),  # TOML list
        (["attrs six"], ("attrs", "six")),
        (["requests >= 2.32", "attrs [tests]"], ("requests >= 2.32", "attrs [tests]")),
        (["foo; python_version < '3.12'"], ("foo; python_version < '3.12'",)),
        (["# pinned for the guest", "", "  six  "], ("six",)),
        (("attrs",), ("attrs",)),
    ],
)
def test_requirements_forms(value: object, expected: tuple[str, ...]) -> None:
    assert cfg.parse_requirements(value, "src") == expected


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ("not a==valid!!", "'a==valid!!'"),
        (["attrs", "six=="], "'six=='"),
        (["attrs", 3], "expected requirements as a list of strings"),
        (42, "expected requirements as a list of strings"),
    ],
)
def test_bad_requirements_name_the_item_and_source(value: object, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^ini gondolin_requirements: ") as info:
        cfg.parse_requirements(value, "ini gondolin_requirements")
    assert bad in str(info.value)


@pytest.mark.parametrize(
    ("value", "ok"), [("3", True), ("0", False), ("65", False), ("x", False), (True, False)]
)
def test_numbers(value: object, ok: bool) -> None:
    if ok:
        assert cfg.parse_number(value, "src", kind=int, low=1, high=64, what="cpus") == int(value)  # type: ignore[call-overload]
    else:
        with pytest.raises(ConfigError, match="src: cpus must"):
            cfg.parse_number(value, "src", kind=int, low=1, high=64, what="cpus")


def _spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        qemu="qemu-system-x86_64",
        accel="tcg",
        kernel=Path("/k"),
        initrd=Path("/i"),
        disk=Path("/d.qcow2"),
        rundir=Path("/run/x"),
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def _value(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line_basics() -> None:
    argv = command_line(_spec(memory_mib=512, cpus=2))
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert _value(argv, "-m") == ["512M"] and _value(argv, "-smp") == ["2"]
    assert "tcg" in _value(argv, "-accel")[0]
    assert any(AGENT_PORT_NAME in d for d in _value(argv, "-device"))
    assert "panic=-1" in _value(argv, "-append")[0]
    assert _value(argv, "-qmp") == ["unix:/run/x/qmp.sock,server=on,wait=off"]
    assert "-netdev" not in argv and "-incoming" not in argv and "-loadvm" not in argv


def test_command_line_kvm_net_and_loadvm() -> None:
    argv = command_line(
        _spec(accel="kvm", net_socket=Path("/run/x/net.sock"), mtu=65520, loadvm="gondolin-clean")
    )
    assert _value(argv, "-accel") == ["kvm"] and _value(argv, "-cpu") == ["host"]
    assert _value(argv, "-netdev") == [
        "stream,id=net0,server=off,addr.type=unix,addr.path=/run/x/net.sock"
    ]
    assert any("host_mtu=65520" in d for d in _value(argv, "-device"))
    assert _value(argv, "-loadvm") == ["gondolin-clean"]


def test_checkpoint_trailer_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "c.qcow2"
    f.write_bytes(b"QFI\xfb" + b"\0" * 100)
    checkpoint.write_trailer(f, {"format": checkpoint.FORMAT_VERSION, "image_build_id": "abc"})
    assert checkpoint.read_trailer(f)["image_build_id"] == "abc"
    assert f.read_bytes().startswith(b"QFI\xfb")


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"", "no metadata trailer"),
        (b"{not json" + (9).to_bytes(4, "big") + checkpoint.TRAILER_MAGIC, "not valid JSON"),
        ((10**6).to_bytes(4, "big") + checkpoint.TRAILER_MAGIC, "length .* is invalid"),
        (
            b'{"format": 99}' + (14).to_bytes(4, "big") + checkpoint.TRAILER_MAGIC,
            "unsupported checkpoint format",
        ),
    ],
)
def test_checkpoint_trailer_errors(tmp_path: Path, tail: bytes, message: str) -> None:
    f = tmp_path / "c.qcow2"
    f.write_bytes(b"x" * 64 + tail)
    with pytest.raises(SnapshotError, match=message):
        checkpoint.read_trailer(f)
