"""The host's plugins and output options, as arguments for the guest worker.

The guest worker runs with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``: it loads
no plugin the host did not load. :func:`entry_point_plugins` names the
plugins the host loaded through their ``pytest11`` entry points (for
``-p NAME`` in the guest, where :func:`~.arguments.guest_args` keeps only
those the guest can import); a plugin the host did not load (``-p
no:NAME``, or not installed) is not named, so it stays off in the guest.
:func:`plugin_option_args` repeats what those plugins need to behave as on
the host (pytest-randomly's resolved seed), and :func:`output_args` the
options that change what a test shows while it runs (``-s``,
``--setup-show``), which the worker sends back live (``guest/live.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import pytest

from pytest_gondolin.guest.worker import RANDOMLY_SEED_ENV

__all__ = [
    "HOST_ONLY_PLUGINS",
    "PLUGIN_OPTION_PREFIXES",
    "entry_point_plugins",
    "guest_plugin_loads",
    "key_args",
    "output_args",
    "plugin_option_args",
    "run_seed_env",
]

#: Plugins the guest worker never loads, autoloaded on the host or named with
#: ``-p``: xdist (a worker never distributes) and the plugins whose work the
#: host does around the run -- pytest-timeout (``sandbox/timeout_plugin.py``;
#: in the guest too, its alarm would race the host's), pytest-cov
#: (``sandbox/coverage.py``) and pytest-rerunfailures (a rerun starts from a
#: fresh restore, decided on the host).
HOST_ONLY_PLUGINS: Final = frozenset(
    {"xdist", "xdist.looponfail", "timeout", "pytest_cov", "rerunfailures"}
)
#: The worker loads the guest's own plugin under this name (``-p gondolin``).
_GONDOLIN: Final = "gondolin"

#: Options that belong to a plugin: dropped with the plugin when the guest
#: cannot import it (an unknown option would stop the worker at start-up).
PLUGIN_OPTION_PREFIXES: Final[Mapping[str, tuple[str, ...]]] = {
    "randomly": ("--randomly-seed=", "--randomly-dont-reset-seed"),
}


def entry_point_plugins(config: pytest.Config) -> list[str]:
    """Names of the plugins the host loaded through entry points, in load order.

    Without gondolin, those in :data:`HOST_ONLY_PLUGINS` and those already
    named with ``-p`` on the command line (the worker gets those anyway).
    """
    manager = config.pluginmanager
    given = set(getattr(config.option, "plugins", None) or [])
    names: list[str] = []
    for plugin, _dist in manager.list_plugin_distinfo():
        name = manager.get_name(plugin)
        if name in HOST_ONLY_PLUGINS or name in (_GONDOLIN, None) or name in given:
            continue
        if name not in names:
            names.append(name)
    return names


def guest_plugin_loads(config: pytest.Config) -> list[str]:
    """``-p`` values for the worker: the host's own (without :data:`HOST_ONLY_PLUGINS`;
    ``-p no:NAME`` always kept), then :func:`entry_point_plugins`."""
    given = [
        name
        for name in getattr(config.option, "plugins", None) or []
        if name not in HOST_ONLY_PLUGINS
    ]
    return given + entry_point_plugins(config)


def plugin_option_args(config: pytest.Config) -> list[str]:
    """Options that make the host's plugins behave in the guest as on the host.

    pytest-randomly: the seed the host resolved (``--randomly-seed=N``, also
    when the host picked it itself or read ``last`` from its cache, which
    the worker does not have), so a seed reproduces a sandboxed test's
    ``random`` values; ``--randomly-dont-reset-seed`` when given.
    """
    args: list[str] = []
    if config.pluginmanager.has_plugin("randomly"):
        seed = getattr(config.option, "randomly_seed", None)
        if isinstance(seed, int) and not isinstance(seed, bool):
            args.append(f"--randomly-seed={seed}")
        if getattr(config.option, "randomly_reset_seed", True) is False:
            args.append("--randomly-dont-reset-seed")
    return args


def run_seed_env(config: pytest.Config) -> dict[str, str]:
    """pytest-randomly's seed for each run's environment (the worker sets it before the run).

    A cached worker (``sandbox/worker_cache.py``) was collected under the
    seed of the run that made it: its key leaves the seed out
    (:func:`key_args`), so a re-run with a new seed still restores it.
    """
    if config.pluginmanager.has_plugin("randomly"):
        seed = getattr(config.option, "randomly_seed", None)
        if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
            return {RANDOMLY_SEED_ENV: str(seed)}
    return {}


def key_args(args: list[str]) -> list[str]:
    """``args`` as a cached worker's key sees them: without the per-run seed (:func:`run_seed_env`)."""
    prefix = "--randomly-seed="
    return [f"{prefix}(each run's)" if a.startswith(prefix) else a for a in args]


def output_args(config: pytest.Config) -> list[str]:
    """``--capture=METHOD`` when not pytest's default, and ``--setup-show``."""
    args: list[str] = []
    capture = getattr(config.option, "capture", "fd")
    if capture and capture != "fd":
        args.append(f"--capture={capture}")
    if getattr(config.option, "setupshow", False):
        args.append("--setup-show")
    return args
