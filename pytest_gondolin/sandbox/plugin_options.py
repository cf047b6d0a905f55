"""The command-line options of the host's plugins, repeated for the guest worker as given.

A plugin that loads in the guest too (``-p NAME``, an autoloaded entry
point: :func:`~.guest_plugins.guest_plugin_loads`) or a conftest of the
project (copied in, so it loads there as well) reads its options in the
guest: ``--asyncio-mode=auto``, ``--record-mode=none``, ``--block-network``,
``--benchmark-disable``, ``--hypothesis-profile=ci``, a conftest's
``--runslow``. :func:`plugin_options` finds the tokens of the host's command
line (``PYTEST_ADDOPTS`` included; under pytest-xdist, the controller's
``sys.argv``) that belong to those plugins' options and returns them,
verbatim, per plugin, so :func:`~.arguments.guest_args` can drop a plugin's
options together with the plugin when the guest cannot import it.

Which options a plugin registered is not recorded by pytest: each plugin's
own ``pytest_addoption`` is called again on a scratch parser (with a plugin
manager that ignores ``add_hookspecs``), and what it adds there is its. A
plugin whose ``pytest_addoption`` fails on the scratch parser gets none of
its options forwarded (logged at DEBUG). The ini file's ``addopts`` are not
repeated: the worker reads the same ini file.

Left out: pytest's own options (``arguments.py`` chooses those one by one),
gondolin's (host settings), the host-only plugins'
(:data:`~.guest_plugins.HOST_ONLY_PLUGINS`), pytest-split's
(:data:`SELECTING_PLUGINS`) and the options the host
resolves itself (:data:`RESOLVED_ON_THE_HOST`: pytest-randomly's seed,
:func:`~.guest_plugins.plugin_option_args`).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from pytest_gondolin.sandbox.guest_plugins import HOST_ONLY_PLUGINS, guest_plugin_loads

__all__ = [
    "RESOLVED_ON_THE_HOST",
    "SELECTING_PLUGINS",
    "PluginOption",
    "given_tokens",
    "plugin_options",
]

log = logging.getLogger(__name__)

#: Options a plugin has in the guest, but whose value the host resolves and
#: passes itself (guest_plugins.plugin_option_args): never repeated verbatim.
RESOLVED_ON_THE_HOST: Final = frozenset({"--randomly-seed", "--randomly-dont-reset-seed"})
#: Plugins whose options choose the items: the host chose them and sends the worker
#: their node ids; in the guest, pytest-split's ``--splits``/``--group`` would split
#: the guest's (smaller) collection again and drop items the host sends.
SELECTING_PLUGINS: Final = frozenset({"pytest-split"})
#: argparse actions that take no value.
_FLAG_ACTIONS: Final = frozenset(
    {"store_true", "store_false", "store_const", "append_const", "count", "help", "version"}
)
_STASH: Final = pytest.StashKey["dict[str, list[str]]"]()


@dataclass(frozen=True)
class PluginOption:
    """One option a plugin registered: its spellings and how many values follow it."""

    names: tuple[str, ...]
    #: ``0`` (a flag), ``1``, a fixed count, or ``-1``: every following token up
    #: to the next one that starts with ``-`` (``nargs="*"`` / ``"+"``).
    values: int


def _values(attrs: Mapping[str, Any]) -> int:
    """How many values an option takes, from its argparse attributes (pytest 8 or 9)."""
    nargs = attrs.get("nargs")
    if nargs is None:
        action = attrs.get("action")
        return 0 if isinstance(action, str) and action in _FLAG_ACTIONS else 1
    if isinstance(nargs, int):
        return nargs
    if nargs == "?":
        return 0  # the value, if any, is written "--opt=value"
    return -1


class _ScratchManager:
    """The plugin manager a plugin's ``pytest_addoption`` sees on the scratch parser:
    the real one, except that hook specifications are not added twice."""

    def __init__(self, real: pytest.PytestPluginManager) -> None:
        self._real = real

    def add_hookspecs(self, module_or_class: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _options_of(config: pytest.Config, plugin: object) -> list[PluginOption]:
    """The options ``plugin``'s own ``pytest_addoption`` registers."""
    parser = pytest.Parser(_ispytest=True)
    kwargs = {"parser": parser, "pluginmanager": _ScratchManager(config.pluginmanager)}
    for impl in config.pluginmanager.hook.pytest_addoption.get_hookimpls():
        if impl.plugin is not plugin:
            continue
        try:
            impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as exc:  # a plugin's quirk costs only the forwarding of its options
            log.debug("options of plugin %s not found: %s", impl.plugin_name, exc)
            return []
    found: list[PluginOption] = []
    for group in parser._groups:
        for option in group.options:
            names = tuple(str(n) for n in option.names() if str(n) not in RESOLVED_ON_THE_HOST)
            if names:
                found.append(PluginOption(names, _values(option.attrs())))
    return found


def _guest_plugins(config: pytest.Config) -> dict[str, object]:
    """The plugins (by name) whose options the worker should get: those it loads by name
    and the project's conftests (inside the rootdir, copied in with the project)."""
    manager = config.pluginmanager
    plugins: dict[str, object] = {}
    for name in guest_plugin_loads(config):
        plugin = manager.get_plugin(name)
        if plugin is not None and name not in HOST_ONLY_PLUGINS | SELECTING_PLUGINS:
            plugins[name] = plugin
    root = Path(config.rootpath).resolve()
    for name, plugin in manager.list_name_plugin():
        filename = getattr(plugin, "__file__", None)
        if not isinstance(filename, str) or Path(filename).name != "conftest.py":
            continue
        if Path(filename).resolve().is_relative_to(root):
            plugins.setdefault(name, plugin)
    return plugins


def _command_line(config: pytest.Config) -> list[str]:
    """The host's command line as pytest read it: ``PYTEST_ADDOPTS``, then the arguments.

    An xdist worker was not started with them: its controller's ``sys.argv`` stands in.
    """
    try:
        env = shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    except ValueError:
        env = []  # pytest refused it already
    workerinput = getattr(config, "workerinput", None)
    if isinstance(workerinput, dict) and isinstance(workerinput.get("mainargv"), list):
        return [*env, *(str(a) for a in workerinput["mainargv"][1:])]
    return [*env, *(str(a) for a in config.invocation_params.args)]


def given_tokens(tokens: Sequence[str], options: Sequence[PluginOption]) -> list[str]:
    """The tokens of ``tokens`` that spell one of ``options``, with their values, in order.

    Knows the forms argparse accepts: ``--opt``, ``--opt=value``, ``--opt value``,
    ``-X``, ``-Xvalue``, ``-X value``; stops at ``--``.
    """
    by_name = {name: option for option in options for name in option.names}
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        if token.startswith("--"):
            name, equals, _ = token.partition("=")
            option = by_name.get(name)
            attached = bool(equals)
        else:
            option = by_name.get(token[:2])
            attached = len(token) > 2
        if option is None:
            continue
        out.append(token)
        if attached or option.values == 0:
            continue
        count = option.values
        while i < len(tokens) and count != 0 and (count > 0 or not tokens[i].startswith("-")):
            out.append(tokens[i])
            i += 1
            count -= 1
    return out


def plugin_options(config: pytest.Config) -> dict[str, list[str]]:
    """The host's command-line tokens for each plugin's options, for the worker (computed once)."""
    if _STASH not in config.stash:
        tokens = _command_line(config)
        found: dict[str, list[str]] = {}
        for name, plugin in _guest_plugins(config).items():
            given = given_tokens(tokens, _options_of(config, plugin))
            if given:
                found[name] = given
        config.stash[_STASH] = found
    return {name: list(tokens) for name, tokens in config.stash[_STASH].items()}
