"""``without_hypothesis_deadline``: a ``@given`` test runs in the guest without a deadline.

The VM-backed check is in ``tests/plugin/test_marking_a_suite.py``;
these pin what it keeps (the test's other settings) and what it leaves alone.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.guest.plugin import without_hypothesis_deadline

SETTINGS = "_hypothesis_internal_use_settings"


@settings(max_examples=3, deadline=timedelta(milliseconds=50), database=None)
@given(st.integers())
def _slow_given(n: int) -> None:
    pass


def _item(function: object) -> pytest.Item:
    return cast(pytest.Item, SimpleNamespace(function=function))


def test_the_deadline_is_off_during_the_run_and_back_after() -> None:
    before = getattr(_slow_given, SETTINGS)
    assert before.deadline == timedelta(milliseconds=50)
    with without_hypothesis_deadline(_item(_slow_given)):
        during = getattr(_slow_given, SETTINGS)
        assert during.deadline is None
        assert during.max_examples == 3  # the test's own settings stay
        assert during.database is None
    assert getattr(_slow_given, SETTINGS) is before


def test_the_deadline_comes_back_when_the_run_raises() -> None:
    before = getattr(_slow_given, SETTINGS)
    with pytest.raises(RuntimeError), without_hypothesis_deadline(_item(_slow_given)):
        raise RuntimeError("the run failed")
    assert getattr(_slow_given, SETTINGS) is before


def _plain() -> None:
    pass


@pytest.mark.parametrize(
    "item",
    [
        SimpleNamespace(),  # not a Function (a doctest, a YAML item)
        SimpleNamespace(function=_plain),  # no @given
        # has the attribute but is not a Hypothesis test: left alone
        SimpleNamespace(function=SimpleNamespace(**{SETTINGS: "x"})),
    ],
)
def test_other_items_are_left_alone(item: Any) -> None:
    function = getattr(item, "function", None)
    before = getattr(function, SETTINGS, None)
    with without_hypothesis_deadline(cast(pytest.Item, item)):
        assert getattr(function, SETTINGS, None) == before
