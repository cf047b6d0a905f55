"""A tar layer's items packed ahead on a thread while its VM starts (``vm/layers.py``, no VM).

The host-environment layer is the big tar layer (tens of MiB): its packing
runs while the VM restores (:attr:`Layer.prepare`), and what the layer
sends must be the same bytes, in the same order, each item packed once.
"""

from __future__ import annotations

import threading

import pytest

from pytest_gondolin.vm import layers
from pytest_gondolin.vm.layers import TarItem, _Prefetch, _prepare, tar_layer


def _items(sizes: list[int], calls: list[str]) -> list[TarItem]:
    def item(index: int, size: int) -> TarItem:
        def pack() -> bytes:
            calls.append(f"{index}@{threading.current_thread().name}")
            return bytes([index]) * size

        return TarItem(f"item{index}", pack)

    return [item(i, size) for i, size in enumerate(sizes)]


def test_prepared_items_are_taken_in_order_each_packed_once() -> None:
    calls: list[str] = []
    prefetch = _Prefetch(_items([10, 20, 30], calls))
    thread = threading.Thread(target=prefetch.prepare, name="prep")
    thread.start()
    thread.join()
    assert calls == ["0@prep", "1@prep", "2@prep"]
    assert list(prefetch.packs()) == [b"\0" * 10, b"\1" * 20, b"\2" * 30]
    assert len(calls) == 3, "nothing packed twice"


def test_without_prepare_every_item_is_packed_where_taken() -> None:
    calls: list[str] = []
    prefetch = _Prefetch(_items([1, 2], calls))
    assert list(prefetch.packs()) == [b"\0", b"\1\1"]
    assert calls == ["0@MainThread", "1@MainThread"]


def test_prepare_holds_at_most_the_bound_and_the_rest_is_packed_when_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(layers, "PREFETCH_BYTES", 25)
    calls: list[str] = []
    prefetch = _Prefetch(_items([10, 20, 30, 5], calls))
    prefetch.prepare()  # this thread: it stops once 30 bytes (>= 25) are held
    assert calls == ["0@MainThread", "1@MainThread"]
    calls.clear()
    worker = threading.Thread(
        target=lambda: calls.extend(len(d) for d in prefetch.packs()), name="taker"
    )
    worker.start()
    worker.join()
    assert calls == [10, 20, "2@taker", 30, "3@taker", 5]


def test_a_pack_that_failed_ahead_raises_where_the_bytes_are_taken() -> None:
    def broken() -> bytes:
        raise OSError("the host file went away")

    prefetch = _Prefetch([TarItem("ok", lambda: b"x"), TarItem("broken", broken)])
    prefetch.prepare()
    taken = prefetch.packs()
    assert next(taken) == b"x"
    with pytest.raises(OSError, match="went away"):
        next(taken)


def test_a_second_apply_packs_again() -> None:
    calls: list[str] = []
    prefetch = _Prefetch(_items([3], calls))
    prefetch.prepare()
    assert list(prefetch.packs()) == [b"\0" * 3]
    assert list(prefetch.packs()) == [b"\0" * 3]
    assert calls == ["0@MainThread", "0@MainThread"]


def test_layers_are_prepared_in_order_on_one_thread_and_failures_are_left_to_apply() -> None:
    seen: list[str] = []

    def step(name: str, fail: bool = False) -> None:
        seen.append(f"{name}@{threading.current_thread().name}")
        if fail:
            raise OSError("apply will say it")

    stack = [
        tar_layer("a", []),
        layers.Layer("b", "kb", lambda vm: None, lambda: step("b", fail=True)),
        layers.Layer("plain", "kp", lambda vm: None),
        layers.Layer("c", "kc", lambda vm: None, lambda: step("c")),
    ]
    thread = _prepare(stack)
    assert thread is not None
    thread.join(10)
    assert seen == ["b@layer-prepare", "c@layer-prepare"]
    assert _prepare([layers.Layer("plain", "k", lambda vm: None)]) is None
