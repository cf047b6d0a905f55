"""The session's sandboxes: one per guest key, prepared on first use."""

from __future__ import annotations

import traceback

import pytest

from pytest_gondolin.errors import GondolinError
from pytest_gondolin.fixtures import GuestKey, get_factory
from pytest_gondolin.markers import SandboxOptions
from pytest_gondolin.netpolicy.http.cassette_paths import resolve_cassette_option
from pytest_gondolin.replay import replay_collect_errors, replay_item
from pytest_gondolin.sandbox import Sandbox
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.worker_messages import Failure

_SANDBOXES = pytest.StashKey[dict[GuestKey, Sandbox]]()
_BROKEN = pytest.StashKey[dict[GuestKey, Failure]]()


def _sandbox_for(item: pytest.Item, key: GuestKey) -> Sandbox | Failure:
    config = item.config
    sandboxes = config.stash.setdefault(_SANDBOXES, {})
    broken = config.stash.setdefault(_BROKEN, {})
    if key in broken:
        return broken[key]
    box = sandboxes.get(key)
    if box is not None and box.alive:
        return box
    # Collect every file that holds a sandboxed item with this key: one worker serves them all.
    from pytest_gondolin.plugin import OPTIONS_KEY

    paths: list[str] = []
    for other in item.session.items:
        opts = other.stash.get(OPTIONS_KEY, None)
        if opts is not None and opts.guest == key and str(other.path) not in paths:
            paths.append(str(other.path))
    box = Sandbox(get_factory(config), config, key, paths)
    try:
        collected = box.prepare()
    except Exception as exc:  # a bug or a broken host must fail these tests, not the session
        box.close()
        # Later items would fail the same way: don't pay a boot for each of them.
        failure = Failure.from_exception(exc)
        if not isinstance(exc, GondolinError):
            failure = Failure(failure.kind, failure.headline, traceback.format_exc())
        broken[key] = failure
        return broken[key]
    sandboxes[key] = box
    replay_collect_errors(config, collected)
    return box


def vm_for(item: pytest.Item) -> VM | None:
    """The VM of the sandbox ``item`` runs in, if one was prepared (for failure artifacts)."""
    from pytest_gondolin.plugin import OPTIONS_KEY

    options = item.stash.get(OPTIONS_KEY, None)
    if options is None:
        return None
    box = item.config.stash.get(_SANDBOXES, {}).get(options.guest)
    return box.vm if box is not None else None


def run_item(item: pytest.Item, options: SandboxOptions | None, error: str | None) -> None:
    """Run ``item`` in its sandbox and replay the reports; failures become failed reports."""
    if error is not None or options is None:
        replay_item(item, Failure("error", error or "sandboxed options missing"))
        return
    box = _sandbox_for(item, options.guest)
    if isinstance(box, Failure):
        replay_item(item, box)
        return
    try:
        cassette = resolve_cassette_option(
            options.network.get("cassette"), where=f"{item.nodeid}: sandboxed", item=item
        )
    except GondolinError as exc:
        replay_item(item, Failure.from_exception(exc))
        return
    replay_item(
        item,
        box.run(item.nodeid, timeout=options.timeout, network=options.network, cassette=cassette),
    )
