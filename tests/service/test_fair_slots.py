"""Fair slots (service/fair_slots.py): the per-owner share, round robin across waiting owners,
FIFO within an owner, and waiters that give up (asyncio cancellation) leaving no slot behind;
with real threads and a real event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.fair_slots import AsyncFairSlots, FairShare, ThreadFairSlots


def test_an_owner_never_holds_more_than_its_share() -> None:
    share: FairShare[str] = FairShare(slots=4, per_owner=2)
    assert share.request("a", "a1") and share.request("a", "a2")
    assert not share.request("a", "a3")  # at its share, although two slots are free
    assert share.request("b", "b1") and share.request("b", "b2")
    assert share.holders == 4 and share.waiting() == 1
    assert share.release("b") == []  # a is still at its share: the slot stays free for others
    assert share.request("c", "c1")
    assert share.release("a") == [("a", "a3")]


def test_freed_slots_go_round_robin_across_owners_and_in_order_within_one() -> None:
    share: FairShare[str] = FairShare(slots=1, per_owner=1)
    assert share.request("heavy", "h0")
    for index in range(1, 4):
        assert not share.request("heavy", f"h{index}")
    assert not share.request("light", "l1")
    assert not share.request("other", "o1")
    assert not share.request("light", "l2")
    order = []
    owner = "heavy"
    while True:
        granted = share.release(owner)
        if not granted:
            break
        ((owner, waiter),) = granted
        order.append(waiter)
    # heavy queued first, then light, then other; each turn moves the owner to the back.
    assert order == ["h1", "l1", "o1", "h2", "l2", "h3"]


def test_a_share_larger_than_the_slots_is_the_slots() -> None:
    share: FairShare[str] = FairShare(slots=2, per_owner=5)
    assert share.per_owner == 2
    assert share.request("a", "1") and share.request("a", "2") and not share.request("a", "3")


def test_a_cancelled_waiter_is_dropped() -> None:
    share: FairShare[str] = FairShare(slots=1, per_owner=1)
    assert share.request("a", "a1")
    assert not share.request("b", "b1") and not share.request("c", "c1")
    share.cancel("b", "b1")
    assert share.release("a") == [("c", "c1")]
    assert share.waiting() == 0


def test_threads_wait_their_turn() -> None:
    slots = ThreadFairSlots(slots=1, per_owner=1)
    served: list[str] = []
    release_first = threading.Event()

    def hold(owner: str, label: str, started: threading.Event | None = None) -> None:
        with slots.hold(owner):
            served.append(label)
            if started is not None:
                started.set()
                release_first.wait(10)

    first_in = threading.Event()
    threads = [threading.Thread(target=hold, args=("heavy", "h0", first_in))]
    threads[0].start()
    assert first_in.wait(10)
    for owner, label in [("heavy", "h1"), ("heavy", "h2"), ("light", "l1")]:
        thread = threading.Thread(target=hold, args=(owner, label))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while slots.share.waiting() < len(threads) - 1:  # queued in this order
            assert time.monotonic() < deadline
            time.sleep(0.001)
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert served == ["h0", "h1", "l1", "h2"]  # light did not wait behind heavy's whole queue


def test_coroutines_that_give_up_leave_no_slot_held() -> None:
    async def scenario() -> None:
        slots = AsyncFairSlots(slots=1, per_owner=1)
        holding = slots.hold("a")
        await holding.__aenter__()
        waiter = asyncio.create_task(slots.hold("b").__aenter__())
        await asyncio.sleep(0)
        assert slots.share.waiting("b") == 1
        waiter.cancel()  # gives up while queued
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.share.waiting() == 0
        # Granted a slot, then cancelled before it could run: the slot is given back.
        late = asyncio.create_task(slots.hold("c").__aenter__())
        await asyncio.sleep(0)
        await holding.__aexit__(None, None, None)  # grants c's waiter, without yielding
        assert slots.share.held["c"] == 1
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert slots.share.holders == 0
        async with asyncio.timeout(1), slots.hold("d"):
            assert slots.share.held["d"] == 1

    asyncio.run(scenario())
