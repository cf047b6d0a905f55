"""``@pytest.mark.sandboxed``: run a test in a guest pytest worker, replay its reports here.

One sandboxed test takes one road through this package::

    session.SandboxSession        the plugin object: options per item (built at
        |                         collection by options.py), a worker per guest key
        v
    guest_worker.GuestWorker      a lane restored to the collected snapshot, the
        |                         test's network applied (network_setup.py)
        v
    client.WorkerClient           "run" over transports.VMTransport; each line
        |                         parsed by messages.py (report_checks.py,
        |                         json_checks.py), the run tallied by outcome.py
        v
    replay.replay_item            the reports through the host's hooks, the host's
                                  verdicts (crash, timeout, cassette miss) applied

Modules, one concern each:

=====================  =================================================================
``session``            the plugin object that owns the feature's session state
``options``            ``SandboxOptions``: marker + settings, validated at collection
``guest_worker``       a prepared guest worker; its VMs (lanes) take turns
``worker_setup``       what a guest worker is made of: its Python, environment, arguments
``worker_cache``       the started and the collected worker, cached across runs
``worker_disk``        a one-test session's cached worker used in place, not copied
``project_files``      what is copied into the guest: the project tree, pytest
``arguments``          the worker's pytest arguments, mirroring the host session
``guest_plugins``      the host's plugins and output options (-s, --setup-show) for the worker
``plugin_options``     the options of plugins and conftests in the guest too, as given
``debugger``           the host's terminal for pdb in the guest (--pdb, breakpoint())
``live_output``        a running test's live output on the host's terminal, made safe
``client``             ``WorkerClient``: the host side of the worker protocol
``worker_transport``   ``WorkerTransport``: the contract a byte pipe to a worker meets
``transports``         byte pipes to a worker: local subprocess, guest process
``messages``           the worker's lines as validated messages (sans-IO)
``json_checks``        typed, bounded reads of the worker's JSON; the memory budget
``report_checks``      serialized pytest reports, checked and bounded
``outcome``            what one run comes to: reports, warnings, verdicts
``replay``             outcomes through the host's hooks, the xdist way
``queries``            answers to the running test's ``http_traffic`` questions
``timeout_plugin``     pytest-timeout's timeout as the run's bound, not the host's alarm
``rerun_plugin``       pytest-rerunfailures' reruns, each attempt from a fresh restore
``coverage``           pytest-cov: the guest's measurement checked and merged on the host
``host_python``        which Python runs the worker: the host's own, carried in, or the image's
``interpreter_files``  the host interpreter's layout and the files carried for it
``elf_checks``         what an ELF object needs: machine, glibc, shared libraries
``guest_facts``        what an image offers a carried interpreter (asked once, cached)
``interpreter_pack``   the carried interpreter as cached tars, a guest layer's items
``environment_image``  the host's environment as a file-system image the guest mounts
=====================  =================================================================

The names below are the package's public API, imported lazily so that
loading the plugin stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gondolin.sandbox.arguments import worker_args
    from pytest_gondolin.sandbox.client import WorkerClient, WorkerState, WorkerTransport
    from pytest_gondolin.sandbox.messages import Collected, WarningRecord, parse_message
    from pytest_gondolin.sandbox.options import SandboxOptions, sandbox_options
    from pytest_gondolin.sandbox.outcome import Failure, HostFailure, RunOutcome
    from pytest_gondolin.sandbox.replay import replay_collect_errors, replay_item
    from pytest_gondolin.sandbox.session import SandboxSession
    from pytest_gondolin.sandbox.transports import SubprocessTransport, worker_command

__all__ = [
    "Collected",
    "Failure",
    "HostFailure",
    "RunOutcome",
    "SandboxOptions",
    "SandboxSession",
    "SubprocessTransport",
    "WarningRecord",
    "WorkerClient",
    "WorkerState",
    "WorkerTransport",
    "parse_message",
    "replay_collect_errors",
    "replay_item",
    "sandbox_options",
    "worker_args",
    "worker_command",
]

_LAZY = {
    "Collected": "messages",
    "Failure": "outcome",
    "HostFailure": "outcome",
    "RunOutcome": "outcome",
    "SandboxOptions": "options",
    "SandboxSession": "session",
    "SubprocessTransport": "transports",
    "WarningRecord": "messages",
    "WorkerClient": "client",
    "WorkerState": "client",
    "WorkerTransport": "client",
    "parse_message": "messages",
    "replay_collect_errors": "replay",
    "replay_item": "replay",
    "sandbox_options": "options",
    "worker_args": "arguments",
    "worker_command": "transports",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_gondolin.sandbox' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pytest_gondolin.sandbox.{module}"), name)
