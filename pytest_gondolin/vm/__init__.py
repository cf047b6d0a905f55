"""One QEMU guest: its process, agent channel, snapshots, checkpoints and pools.

Public API: :class:`~pytest_gondolin.vm.machine.VM` (with ``exec``,
``write_file``, ``read_file``, ``snapshot``/``restore``, ``checkpoint``,
``close`` and ``http``), :class:`~pytest_gondolin.vm.machine.Checkpoint`,
:class:`~pytest_gondolin.vm.commands.ExecResult` and
:class:`~pytest_gondolin.vm.identity.Snapshot`, re-exported by
:mod:`pytest_gondolin`. Each module's docstring names its one concern; see
``docs/architecture.md`` for the map. Nothing is imported here, so loading
one module of the package loads no other.
"""
