"""The guest half of pytest-gondolin: everything that runs inside the VM.

The boot payload (:mod:`pytest_gondolin.vm.payload`) ships exactly this
package, plus the package's own ``__init__``. Modules here import only the
standard library, pytest (and its dependencies) and each other; the host
side imports from here, never the other way round
(``tests/unit/test_guest_boundary.py`` checks both).

* ``sysinit`` -- PID 1's system setup at boot, then runs the agent
* ``agent`` -- the agent's main loop, dispatch table and machine requests
* ``execs`` / ``spawn`` / ``reaper`` -- running commands for the host
* ``files`` -- file writes and reads for the host
* ``agentio`` -- the agent's frame writer and fd helpers
* ``protocol`` -- the agent's wire protocol (shared with the host)
* ``worker`` -- the in-guest pytest worker and its line protocol
* ``plugin`` -- the plugin as the guest sees it (top-level ``gondolin`` there)
* ``options`` -- option and marker declarations (shared with the host)
* ``hostquery`` -- questions a running test asks the host
* ``live`` -- a run's output sent to the host as it happens (``-s``, ``--setup-show``)
* ``coverage`` -- each run measured for pytest-cov on the host (``coverage`` imported lazily)
* ``traffic`` / ``recording`` -- ``http_traffic`` and the exchange queries
* ``errors`` -- the exception classes (the host's ``pytest_gondolin.errors``
  re-exports them)
* ``secret`` -- ``Secret``, a value both sides use
* ``public`` -- the package's public names in the guest (stand-ins for the
  host-only classes)
"""
