"""``@pytest.mark.sandboxed`` arguments as :class:`SandboxOptions` (``sandbox/options.py``), no QEMU.

Marks are made with ``pytest.mark.sandboxed(...).mark`` and merged with a
:class:`~pytest_gondolin.config.Settings` value, as collection does; every
bad value is a ``ConfigError`` naming the test, the argument and the value.
The same checks through a real session (the item errors at setup with that
message) are in ``tests/plugin/test_sandboxed.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.config import Settings
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import GuestKey
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.sandbox.options import (
    KEYWORDS,
    SandboxOptions,
    options_from_marks,
    sandbox_options,
)

NODEID = "test_m.py::test_f"
SETTINGS = Settings(
    accel="tcg",
    image="debian",
    memory_mib=256,
    cpus=1,
    boot_timeout=60.0,
    timeout=30.0,
    keep_vm=False,
    record_mode="none",
    artifacts=None,
)


def mark(*args: Any, **kwargs: Any) -> pytest.Mark:
    return pytest.mark.sandboxed(*args, **kwargs).mark


def options(*marks: pytest.Mark) -> SandboxOptions:
    return options_from_marks(list(marks), SETTINGS, nodeid=NODEID)


def test_a_bare_marker_takes_the_session_settings() -> None:
    assert options(mark()) == SandboxOptions(
        guest=GuestKey("debian", 256, 1), timeout=30.0, policy=None, cassette=None
    )


def test_the_closest_marker_wins_per_argument() -> None:
    closest, farther = mark(memory="1G"), mark(memory="512M", cpus=2, timeout=5)
    got = options(closest, farther)
    assert got.guest == GuestKey("debian", 1024, 2)
    assert got.timeout == 5.0


def test_network_arguments_build_the_policy_once_at_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEY", "value-from-env")
    got = options(
        mark(
            allow_hosts=["api.test"],
            resolve={"api.test:80": "127.0.0.1:8080"},
            secrets={"API_KEY": ["api.test"]},
        )
    )
    assert isinstance(got.policy, NetworkPolicy)
    assert got.policy.allow_hosts == ("api.test",)
    assert got.policy.resolve_target("api.test", 80) == ("127.0.0.1", 8080)
    assert got.policy.secrets["API_KEY"].value == "value-from-env"
    # Host-side options never change the guest: the same prepared worker serves them.
    assert got.guest == options(mark()).guest


def test_a_cassette_path_is_resolved_at_collection(tmp_path: Path) -> None:
    got = options_from_marks([mark(cassette=str(tmp_path / "api"))], SETTINGS, nodeid=NODEID)
    assert got.cassette == tmp_path / "api.yaml"
    assert got.policy is None  # a cassette alone: deny all, replay nothing


def test_options_from_a_real_item(pytester: pytest.Pytester) -> None:
    (item,) = pytester.getitems(
        """
        import pytest

        @pytest.mark.sandboxed(memory="512M", cassette=True)
        class TestGroup:
            @pytest.mark.sandboxed(memory="1G")
            def test_f(self):
                pass
        """
    )
    got = sandbox_options(item, SETTINGS)
    assert got.guest.memory_mib == 1024
    assert got.cassette == Path(item.path).parent / "cassettes" / Path(item.path).stem / (
        "TestGroup.test_f.yaml"
    )


#: (marker arguments, what the error must name besides the test).
BAD = {
    "positional": ((("512M",), {}), "takes keyword arguments only, got ('512M',)"),
    "unknown": (((), {"memry": "1G"}), "unknown argument(s) memry; known: " + ", ".join(KEYWORDS)),
    "memory": (((), {"memory": "lots"}), "sandboxed(memory=...): memory must be a size"),
    "memory-small": (((), {"memory": 64}), "memory must be between 128M and 64G, got 64"),
    "cpus": (((), {"cpus": 0}), "sandboxed(cpus=...): cpus must be between 1 and 64, got 0"),
    "image": (((), {"image": 5}), "sandboxed(image=...): must be a string, got 5"),
    "timeout": (((), {"timeout": "soon"}), "timeout must be a number, got 'soon'"),
    "timeout-zero": (((), {"timeout": 0}), "timeout must be between 0.001 and"),
    "allow-hosts-str": (((), {"allow_hosts": "a.test"}), "allow_hosts: expected a list"),
    "resolve-str": (((), {"resolve": "a:1"}), "bad network option (resolve)"),
    "secret-unset": (
        ((), {"secrets": {"GONDOLIN_TEST_UNSET_VAR": ["a.test"]}}),
        "GONDOLIN_TEST_UNSET_VAR is not set",
    ),
    "cassette": (((), {"cassette": 5}), "cassette must be True or a file path, got 5"),
    "cassette-true-no-test": (((), {"cassette": True}), "cassette=True needs a test"),
}


@pytest.mark.parametrize(("given", "named"), BAD.values(), ids=BAD.keys())
def test_a_bad_argument_is_named_with_its_test(
    given: tuple[tuple[Any, ...], dict[str, Any]], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GONDOLIN_TEST_UNSET_VAR", raising=False)
    args, kwargs = given
    with pytest.raises(ConfigError) as excinfo:
        options(mark(*args, **kwargs))
    message = str(excinfo.value)
    assert message.startswith(f"{NODEID}: "), message
    assert named in message, message


def test_a_bad_argument_on_a_farther_marker_is_still_found() -> None:
    """Negative control for "closest wins": an overridden value is still validated."""
    with pytest.raises(ConfigError, match="memry"):
        options(mark(memory="1G"), mark(memry="1G"))
