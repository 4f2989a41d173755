"""Admission units: places up to capacity, first come first served, a bounded wait that ends in a
typed refusal with a retry estimate, per-owner shares, and nothing left behind by a cancel."""

from __future__ import annotations

import asyncio

import pytest

from realtime.admission import Admission, Overloaded


async def test_places_up_to_capacity_then_first_come_first_served():
    adm = Admission(capacity=2, per_owner=2, queue_timeout=5, max_waiting=2)
    a = await adm.acquire("a")
    await adm.acquire("b")
    assert adm.active == 2
    order: list[str] = []

    async def wait(owner: str):
        ticket = await adm.acquire(owner)
        order.append(owner)
        return ticket

    c = asyncio.create_task(wait("c"))
    await asyncio.sleep(0)
    d = asyncio.create_task(wait("d"))
    await asyncio.sleep(0.05)
    assert adm.waiting == 2 and order == []
    adm.release(a)
    adm.release(a)  # idempotent: one place, given once
    tc = await c
    assert order == ["c"] and adm.active == 2 and not d.done()
    adm.release(tc)
    await d
    assert order == ["c", "d"]


async def test_a_wait_for_others_is_bounded_and_says_when_to_retry():
    adm = Admission(capacity=1, queue_timeout=0.1)
    await adm.acquire("holder")
    with pytest.raises(Overloaded) as refused:
        await adm.acquire("late")
    assert 100 <= refused.value.retry_after_ms <= 30_000
    assert adm.active == 1 and adm.waiting == 0


async def test_only_a_few_wait_at_once_the_rest_are_refused_at_once():
    adm = Admission(capacity=4, per_owner=4, queue_timeout=5, max_waiting=1)
    for owner in "abcd":
        await adm.acquire(owner)
    waiter = asyncio.create_task(adm.acquire("e"))
    await asyncio.sleep(0.01)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(Overloaded):
        await adm.acquire("f")  # refused without waiting the timeout
    assert asyncio.get_running_loop().time() - t0 < 1 and adm.waiting == 1
    waiter.cancel()
    assert Admission(capacity=20).max_waiting == 5


async def test_an_owner_waits_for_its_own_places_without_a_time_limit_while_others_pass():
    adm = Admission(capacity=3, per_owner=1, queue_timeout=0.05)
    first = await adm.acquire("socket")
    second = asyncio.create_task(adm.acquire("socket"))
    await asyncio.sleep(0.2)  # far past queue_timeout: its own first stream holds it, nobody else
    assert not second.done() and adm.held_by("socket") == 1
    other = await adm.acquire("other")  # another owner is not held up by it
    adm.release(first)
    assert (await second).owner == "socket"
    adm.release(other)
    assert adm.active == 1


async def test_cancelled_waiters_leave_nothing_behind():
    adm = Admission(capacity=1, queue_timeout=5)
    holder = await adm.acquire("a")
    waiter = asyncio.create_task(adm.acquire("b"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.waiting == 0
    # granted at the very moment it was cancelled: the place comes back
    racer = asyncio.create_task(adm.acquire("c"))
    await asyncio.sleep(0.01)
    adm.release(holder)  # hands the place to the waiting racer ...
    racer.cancel()  # ... which is cancelled before it could take it
    with pytest.raises(asyncio.CancelledError):
        await racer
    assert adm.active == 0 and adm.waiting == 0
    assert (await adm.acquire("d")).owner == "d"


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        Admission(capacity=0)
    assert Admission(capacity=1).per_owner == 1 and Admission(capacity=9).per_owner == 4
