"""Host-side tests drive a clean VM through the ``vm`` fixture."""

from __future__ import annotations


def test_exec_in_a_clean_vm(vm) -> None:  # type: ignore[no-untyped-def]
    result = vm.exec("echo hello from $(uname -n)")
    assert result.stdout == "hello from gondolin\n"


def test_files_round_trip(vm) -> None:  # type: ignore[no-untyped-def]
    vm.write_file("/srv/data.txt", "42\n")
    assert vm.exec("cat /srv/data.txt").stdout == "42\n"


def test_state_does_not_leak_between_tests(vm) -> None:  # type: ignore[no-untyped-def]
    assert vm.exec("test -e /srv/data.txt").returncode != 0
