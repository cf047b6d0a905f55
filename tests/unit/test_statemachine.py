"""Lifecycles as code: transition tables, the ``require`` guard, and StateError's data.

Every table in the package is checked for shape (each state is a key, every
target is a state of the same enum, terminal states are reachable), and
every forbidden move of the agent channel, a call and a VM raises
StateError naming the current state and the allowed ones. The VM's table
is driven through a real VM object in ``test_vm_lifecycle.py``.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

import pytest

from pytest_gondolin.errors import GondolinError, StateError
from pytest_gondolin.statemachine import Transitions, require, sources, transition
from pytest_gondolin.vm.agent_calls import CALL_TRANSITIONS, CallState
from pytest_gondolin.vm.channel_core import CHANNEL_TRANSITIONS, ChannelState
from pytest_gondolin.vm.runstate import VM_TRANSITIONS, Runstate


class Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


TABLE: Transitions[Phase] = {
    Phase.NEW: {Phase.RUNNING, Phase.CLOSED},
    Phase.RUNNING: {Phase.CLOSED},
    Phase.CLOSED: set(),
}


class Thing:
    def __init__(self) -> None:
        self._state = Phase.NEW

    @property
    def state(self) -> Phase:
        return self._state

    def _set_state(self, new: Phase) -> None:
        self._state = transition(TABLE, self._state, new)

    @require(Phase.NEW)
    def start(self) -> str:
        self._set_state(Phase.RUNNING)
        return "started"

    @require(Phase.NEW, Phase.RUNNING)
    def close(self, *, reason: str = "") -> str:
        self._set_state(Phase.CLOSED)
        return reason


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [(c, n, n in TABLE[c] or n is c) for c, n in itertools.product(Phase, Phase)],
)
def test_transition_follows_the_table(current: Phase, new: Phase, allowed: bool) -> None:
    if allowed:
        assert transition(TABLE, current, new) is new
        return
    with pytest.raises(StateError) as info:
        transition(TABLE, current, new)
    assert info.value.state is current
    assert info.value.required == sources(TABLE, new)
    assert isinstance(info.value, GondolinError)


def test_require_guards_on_entry_and_passes_arguments() -> None:
    thing = Thing()
    assert thing.start() == "started"
    with pytest.raises(StateError, match=r"Thing\.start\(\) needs state 'new', but .* 'running'"):
        thing.start()
    assert thing.close(reason="done") == "done"
    with pytest.raises(StateError) as info:
        thing.close()
    assert (info.value.state, info.value.required) == (Phase.CLOSED, (Phase.NEW, Phase.RUNNING))
    assert Thing.start.__name__ == "start"  # functools.wraps keeps the method's identity


def test_require_needs_a_state() -> None:
    with pytest.raises(ValueError, match="at least one state"):
        require()


def test_state_error_message_names_both_sides() -> None:
    err = StateError(Phase.CLOSED, Phase.NEW)
    assert err.required == (Phase.NEW,)
    assert str(err) == "this needs state 'new', but the state is 'closed'"
    assert (
        str(StateError(Phase.NEW, (), action="x"))
        == "x is allowed in no state (the state is 'new')"
    )


@pytest.mark.parametrize(
    ("table", "states", "terminal"),
    [
        pytest.param(CHANNEL_TRANSITIONS, ChannelState, {ChannelState.CLOSED}, id="channel"),
        pytest.param(CALL_TRANSITIONS, CallState, set(), id="call"),
        pytest.param(VM_TRANSITIONS, Runstate, {Runstate.CLOSED}, id="vm"),
    ],
)
def test_the_package_tables_are_well_formed(
    table: Transitions[enum.Enum], states: type[enum.Enum], terminal: set[enum.Enum]
) -> None:
    assert set(table) == set(states), "every state needs a row"
    for state, targets in table.items():
        assert all(isinstance(t, states) for t in targets), state
        assert state not in targets, f"{state} lists itself (staying is always allowed)"
    assert {s for s, targets in table.items() if not targets} == terminal
    # Every state can be reached from the initial one.
    initial = next(iter(states))
    seen, todo = {initial}, [initial]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(states)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (ChannelState.LOST, ChannelState.OPEN),
        (ChannelState.LOST, ChannelState.SYNCING),
        (ChannelState.CLOSED, ChannelState.LOST),
        (ChannelState.CLOSED, ChannelState.OPEN),
        (ChannelState.BROKEN, ChannelState.OPEN),  # only a successful sync repairs a channel
        (CallState.DONE, CallState.FAILED),  # an outcome, once known, stays
        (CallState.FAILED, CallState.DONE),
        (CallState.RUNNING, CallState.PENDING),
        (Runstate.CREATED, Runstate.RUNNING),  # only a boot makes a VM run
        (Runstate.RUNNING, Runstate.BOOTING),  # a VM boots once
        (Runstate.RUNNING, Runstate.CREATED),
        (Runstate.CLOSED, Runstate.RUNNING),  # closed while booting: the boot must not revive it
        (Runstate.CLOSED, Runstate.BOOTING),
    ],
)
def test_forbidden_moves(current: enum.Enum, new: enum.Enum) -> None:
    tables: dict[type[enum.Enum], Transitions[Any]] = {
        ChannelState: CHANNEL_TRANSITIONS,
        CallState: CALL_TRANSITIONS,
        Runstate: VM_TRANSITIONS,
    }
    table = tables[type(current)]
    with pytest.raises(StateError) as info:
        transition(table, current, new)
    assert info.value.state is current
    assert current not in info.value.required
