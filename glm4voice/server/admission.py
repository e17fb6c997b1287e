"""Admission control: at most ``slots`` streams at once, a bounded FIFO queue behind them.

Everything runs on the server's event loop, so plain counters suffice (no locks). A request
reserves a :class:`Ticket` synchronously (or is refused with :class:`QueueFull`, which the server
answers with 503), then waits for its slot with a timeout, and releases it when its stream ends
for any reason (finished, failed, client gone). ``release`` is idempotent.
"""

from __future__ import annotations

import asyncio
import collections


class QueueFull(Exception):
    """Every slot is busy and the queue is at its bound."""


class AdmissionClosed(Exception):
    """The server is shutting down: no more slots are handed out."""


class Ticket:
    __slots__ = ("_admission", "_future", "_released")

    def __init__(self, admission: Admission, future: asyncio.Future[None]):
        self._admission = admission
        self._future = future
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._future.done() and not self._future.cancelled() and self._future.exception() is None

    async def wait(self, timeout: float) -> bool:
        """Wait until the ticket holds a slot; False when ``timeout`` seconds passed first;
        :class:`AdmissionClosed` when the server shuts down meanwhile."""
        if self.admitted:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return self.admitted  # a slot may have been handed over as the timer fired
        return True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission._release(self)


class Admission:
    def __init__(self, slots: int, max_waiting: int):
        if slots < 1 or max_waiting < 0:
            raise ValueError(f"need slots >= 1 and max_waiting >= 0, got {slots}, {max_waiting}")
        self.slots = slots
        self.max_waiting = max_waiting
        self.active = 0
        self.closed = False
        self.close_reason = ""
        self._waiters: collections.deque[Ticket] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reserve(self) -> Ticket:
        if self.closed:
            raise AdmissionClosed(self.close_reason)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = Ticket(self, future)
        if self.active < self.slots and not self._waiters:
            self.active += 1
            future.set_result(None)
        elif len(self._waiters) < self.max_waiting:
            self._waiters.append(ticket)
        else:
            raise QueueFull(f"all {self.slots} streams are busy and {self.waiting} requests are waiting")
        return ticket

    def close(self, reason: str = "the server is shutting down") -> None:
        """Refuse new tickets; waiting ones fail with :class:`AdmissionClosed` (``reason``)."""
        self.closed = True
        self.close_reason = reason
        while self._waiters:
            future = self._waiters.popleft()._future
            if not future.done():
                future.set_exception(AdmissionClosed(reason))

    def _release(self, ticket: Ticket) -> None:
        if ticket.admitted:
            self.active -= 1
            self._admit_next()
        else:
            if ticket._future.done():
                ticket._future.exception()  # retrieved: no "never retrieved" warning
            ticket._future.cancel()
            try:
                self._waiters.remove(ticket)
            except ValueError:
                pass

    def _admit_next(self) -> None:
        while self._waiters and self.active < self.slots:
            ticket = self._waiters.popleft()
            self.active += 1
            ticket._future.set_result(None)
