"""Lifecycles as code: a transition table, one function that checks a move, a method guard.

An object with a lifecycle keeps its state in one enum attribute, exposes it
as ``state``, and changes it in exactly one method, which calls
:func:`transition` against the object's table::

    TRANSITIONS: Transitions[Phase] = {
        Phase.NEW: {Phase.RUNNING, Phase.CLOSED},
        Phase.RUNNING: {Phase.CLOSED},
        Phase.CLOSED: set(),
    }

    def _set_state(self, new: Phase) -> None:
        self._state = transition(TRANSITIONS, self._state, new)

Public methods that only make sense in some states say so with
:func:`require` (modelled on qemu.qmp's ``@require(Runstate.IDLE)``). Both
raise :class:`~pytest_gondolin.errors.StateError`, which carries the
current state and the states that would have been allowed: a
:class:`StateError` is a bug in the caller, never something the guest did.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from pytest_gondolin.errors import StateError

__all__ = ["Transitions", "require", "sources", "transition"]

S = TypeVar("S", bound=enum.Enum)
P = ParamSpec("P")
R = TypeVar("R")
S_co = TypeVar("S_co", bound=enum.Enum, covariant=True)

#: state -> the other states it may move to (staying put is always allowed, so never listed).
Transitions = Mapping[S, Collection[S]]


def sources(table: Mapping[S, Collection[S]], target: S) -> tuple[S, ...]:
    """The states from which ``table`` allows a move to ``target``, in table order."""
    return tuple(state for state, targets in table.items() if target in targets)


def transition(table: Mapping[S, Collection[S]], current: S, new: S) -> S:
    """Return ``new`` if ``table`` allows ``current -> new``; raise StateError otherwise.

    Staying in the same state is always allowed (a no-op, as in qemu.qmp's
    ``_set_state``), so callers need not test first.
    """
    if new is current or new in table.get(current, ()):
        return new
    allowed: tuple[S, ...] = sources(table, new)
    raise StateError(current, allowed, action=f"moving to {new.value!r}")


class _HasState(Protocol[S_co]):
    @property
    def state(self) -> S_co: ...


T = TypeVar("T", bound="_HasState[Any]")


def require(
    *states: enum.Enum,
) -> Callable[[Callable[Concatenate[T, P], R]], Callable[Concatenate[T, P], R]]:
    """Guard a method: raise StateError unless ``self.state`` is one of ``states`` on entry.

    The check is made once, on entry; a method that waits for a state
    change checks again itself.
    """
    if not states:
        raise ValueError("require() needs at least one state")

    def decorate(method: Callable[Concatenate[T, P], R]) -> Callable[Concatenate[T, P], R]:
        @functools.wraps(method)
        def guarded(self: T, /, *args: P.args, **kwargs: P.kwargs) -> R:
            current = self.state
            if current not in states:
                action = f"{type(self).__name__}.{method.__name__}()"
                raise StateError(current, states, action=action)
            return method(self, *args, **kwargs)

        return guarded

    return decorate
