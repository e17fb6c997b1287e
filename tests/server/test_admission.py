"""Admission control: slots, a bounded FIFO queue, timeouts, release on every path."""

from __future__ import annotations

import asyncio

import pytest

from glm4voice.server.admission import Admission, AdmissionClosed, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_slots_then_queue_then_refusal():
    async def scenario():
        admission = Admission(slots=2, max_waiting=1)
        first, second = admission.reserve(), admission.reserve()
        assert first.admitted and second.admitted and admission.active == 2
        third = admission.reserve()
        assert not third.admitted and admission.waiting == 1
        with pytest.raises(QueueFull, match="all 2 streams are busy and 1 requests are waiting"):
            admission.reserve()
        first.release()
        assert await third.wait(timeout=1.0)
        assert admission.active == 2 and admission.waiting == 0
        for ticket in (second, third):
            ticket.release()
        assert admission.active == 0

    run(scenario())


def test_waiters_are_admitted_in_arrival_order():
    async def scenario():
        admission = Admission(slots=1, max_waiting=3)
        holder = admission.reserve()
        waiters = [admission.reserve() for _ in range(3)]
        order = []

        async def wait(index):
            assert await waiters[index].wait(timeout=5.0)
            order.append(index)
            await asyncio.sleep(0)
            waiters[index].release()

        tasks = [asyncio.create_task(wait(i)) for i in (2, 0, 1)]
        await asyncio.sleep(0)
        holder.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2]
        assert admission.active == 0 and admission.waiting == 0

    run(scenario())


def test_timeout_and_cancel_leave_the_queue():
    async def scenario():
        admission = Admission(slots=1, max_waiting=2)
        holder = admission.reserve()
        timed_out, cancelled = admission.reserve(), admission.reserve()
        assert not await timed_out.wait(timeout=0.01)
        timed_out.release()
        task = asyncio.create_task(cancelled.wait(timeout=10.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.release()
        assert admission.waiting == 0
        holder.release()
        assert admission.active == 0  # no slot handed to a ticket that left
        assert admission.reserve().admitted

    run(scenario())


def test_release_is_idempotent():
    async def scenario():
        admission = Admission(slots=1, max_waiting=0)
        ticket = admission.reserve()
        ticket.release()
        ticket.release()
        assert admission.active == 0
        assert admission.reserve().admitted
        assert admission.active == 1

    run(scenario())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        Admission(slots=0, max_waiting=1)
    with pytest.raises(ValueError):
        Admission(slots=1, max_waiting=-1)


def test_close_fails_waiters_and_refuses_new_tickets():
    async def scenario():
        admission = Admission(slots=1, max_waiting=2)
        holder = admission.reserve()
        waiter = admission.reserve()
        admission.close()
        with pytest.raises(AdmissionClosed):
            await waiter.wait(timeout=1.0)
        waiter.release()
        with pytest.raises(AdmissionClosed):
            admission.reserve()
        holder.release()
        assert admission.active == 0 and admission.waiting == 0

    run(scenario())
