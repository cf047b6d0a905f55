"""Loading the plugin and resolving its options (real inner pytest runs, no VM)."""

from __future__ import annotations

import pytest

SHOW_SETTINGS = """
import pytest
from pytest_gondolin.fixtures import SETTINGS_KEY

@pytest.mark.sandboxed
def test_marked():
    pass

def test_show(request):
    s = request.config.stash[SETTINGS_KEY]
    print(f"SETTINGS memory={s.memory_mib} accel={s.accel} timeout={s.timeout} mode={s.record_mode}")
"""


@pytest.mark.parametrize("autoload", ["0", "1"])
def test_loads_with_and_without_autoload(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, autoload: str
) -> None:
    if autoload == "1":
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    else:
        monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(SHOW_SETTINGS)
    result = pytester.runpytest_subprocess("-p", "gondolin", "--strict-markers", "-k", "show", "-s")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*SETTINGS memory=256 accel=auto timeout=None mode=*"])


def test_markers_and_help_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "gondolin", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.sandboxed(*allow_hosts=*"])
    result = pytester.runpytest_subprocess("-p", "gondolin", "--help")
    result.stdout.fnmatch_lines(
        [
            "*sandboxed test execution in QEMU micro-VMs*",
            "*--gondolin-accel=*",
            "*--gondolin-memory=*",
        ]
    )


def test_precedence_ini_env_cli(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(SHOW_SETTINGS)
    pytester.makeini("[pytest]\ngondolin_memory = 512M\ngondolin_timeout = 30\n")
    monkeypatch.delenv("GONDOLIN_MEMORY", raising=False)
    monkeypatch.setenv("CI", "1")
    result = pytester.runpytest_subprocess("-p", "gondolin", "-k", "show", "-s")
    result.stdout.fnmatch_lines(["*SETTINGS memory=512 accel=auto timeout=30.0 mode=none*"])
    monkeypatch.setenv("GONDOLIN_MEMORY", "1G")
    result = pytester.runpytest_subprocess("-p", "gondolin", "-k", "show", "-s")
    result.stdout.fnmatch_lines(["*SETTINGS memory=1024 *"])
    result = pytester.runpytest_subprocess(
        "-p", "gondolin", "-k", "show", "-s", "--gondolin-memory=2G"
    )
    result.stdout.fnmatch_lines(["*SETTINGS memory=2048 *"])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (
            "cli",
            "*pytest-gondolin: --gondolin-memory: memory must be a size like '256M' or '1G', got 'lots'*",
        ),
        ("env", "*pytest-gondolin: $GONDOLIN_MEMORY: memory must be a size*'lots'*"),
        ("ini", "*pytest-gondolin: ini gondolin_memory: memory must be a size*'lots'*"),
    ],
)
def test_bad_option_names_its_source(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, expected: str
) -> None:
    pytester.makepyfile("def test_x(): pass")
    args = ["-p", "gondolin"]
    monkeypatch.delenv("GONDOLIN_MEMORY", raising=False)
    if how == "cli":
        args.append("--gondolin-memory=lots")
    elif how == "env":
        monkeypatch.setenv("GONDOLIN_MEMORY", "lots")
    else:
        pytester.makeini("[pytest]\ngondolin_memory = lots\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_bad_accel_choice_is_rejected(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "gondolin", "--gondolin-accel=hvf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gondolin-accel: invalid choice: 'hvf'*"])


SHOW_REQUIREMENTS = """
from pytest_gondolin.fixtures import SETTINGS_KEY

def test_show(request):
    print("REQUIREMENTS", "|".join(request.config.stash[SETTINGS_KEY].requirements))
"""


def test_requirements_take_a_toml_list_a_string_or_names(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(SHOW_REQUIREMENTS)
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\ngondolin_requirements = ["attrs", "requests >= 2.32", "six"]\n'
    )
    monkeypatch.delenv("GONDOLIN_REQUIREMENTS", raising=False)
    # -W error: a list given to a "string" ini key is a deprecation warning in pytest 9.
    args = ["-p", "gondolin", "-s", "-W", "error"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*REQUIREMENTS attrs|requests >= 2.32|six"])
    monkeypatch.setenv("GONDOLIN_REQUIREMENTS", "six==1.16.0 attrs")
    result = pytester.runpytest_subprocess(*args)
    result.stdout.fnmatch_lines(["*REQUIREMENTS six==1.16.0|attrs"])
    result = pytester.runpytest_subprocess(*args, "--gondolin-requirements=idna")
    result.stdout.fnmatch_lines(["*REQUIREMENTS idna"])


def test_requirements_in_an_ini_file_take_lines_or_names(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SHOW_REQUIREMENTS)
    pytester.makeini("[pytest]\ngondolin_requirements =\n    six==1.16.0\n    attrs idna\n")
    result = pytester.runpytest_subprocess("-p", "gondolin", "-s")
    result.stdout.fnmatch_lines(["*REQUIREMENTS six==1.16.0|attrs|idna"])


def test_a_requirements_list_with_a_bad_item_names_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\ngondolin_requirements = ["attrs", "six=="]\n'
    )
    result = pytester.runpytest_subprocess("-p", "gondolin")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini gondolin_requirements: 'six==' is not a valid requirement*"])
