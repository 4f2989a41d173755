"""Admission: how many streams may speak at once, and who gets the next free one.

A stream takes a place when its first text arrives (an open context with no text costs nothing)
and gives it back when its engine has finished computing, when it is cancelled, or when its
client goes away.  Two rules keep one client from using up what others need:

* one owner (a WebSocket, or one HTTP request) holds at most ``per_owner`` places; more of its
  streams wait, without a time limit, for its own earlier ones (that wait costs nobody else);
* a stream that needs a place held by others waits at most ``queue_timeout`` seconds, first come
  first served, then gets :class:`Overloaded` with an estimate of when to retry; and only
  ``max_waiting`` wait at once: under sustained overload a long queue only makes every stream
  wait the whole timeout, while a prompt refusal lets a client go elsewhere or retry.

Everything runs on the event loop; ``release`` is synchronous, so cleanup that cannot await (a
``finally`` in a cancelled task) always gives the place back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


@dataclass(eq=False)
class Ticket:
    owner: Hashable
    granted_at: float
    released: bool = False


@dataclass(eq=False)
class _Owner:
    held: int = 0
    entering: int = 0  # streams past the owner's own limit, waiting for a place
    acquiring: int = 0  # calls to acquire in progress
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Admission:
    def __init__(
        self,
        capacity: int,
        per_owner: int | None = None,
        queue_timeout: float = 5.0,
        max_waiting: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.per_owner = max(1, per_owner if per_owner is not None else max(1, capacity // 2))
        self.queue_timeout = queue_timeout
        self.max_waiting = max_waiting if max_waiting is not None else max(1, capacity // 4)
        self.active = 0
        self._owners: dict[Hashable, _Owner] = {}
        self._waiting: deque[tuple[Hashable, asyncio.Future[Ticket]]] = deque()
        self._tickets: set[Ticket] = set()
        self._hold_s = 5.0  # running mean of how long a stream holds its place

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def held_by(self, owner: Hashable) -> int:
        o = self._owners.get(owner)
        return o.held if o else 0

    async def acquire(self, owner: Hashable) -> Ticket:
        """A place for one stream of ``owner``; raises :class:`Overloaded` when none frees up in
        time.  Cancellation while waiting leaves nothing held."""
        o = self._owners.setdefault(owner, _Owner())
        o.acquiring += 1
        try:
            while o.held + o.entering >= self.per_owner:  # wait for the owner's own streams
                o.changed.clear()
                await o.changed.wait()
            o.entering += 1
            try:
                return await self._take_place(owner)
            finally:
                o.entering -= 1
        finally:
            o.acquiring -= 1
            self._forget_if_idle(owner)

    async def _take_place(self, owner: Hashable) -> Ticket:
        if self.active < self.capacity and not self._waiting:
            return self._grant(owner)
        if len(self._waiting) >= self.max_waiting:
            raise Overloaded("no synthesis capacity free; try again", self.retry_after_ms())
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        entry = (owner, future)
        self._waiting.append(entry)
        ticket = None
        try:
            async with asyncio.timeout(self.queue_timeout):
                ticket = await asyncio.shield(future)
            return ticket
        except TimeoutError:
            raise Overloaded("no synthesis capacity free; try again", self.retry_after_ms()) from None
        finally:
            if ticket is None:  # timed out or cancelled: leave nothing behind
                if entry in self._waiting:
                    self._waiting.remove(entry)
                elif future.done() and not future.cancelled():
                    self.release(future.result())  # granted just as the wait ended

    def _grant(self, owner: Hashable) -> Ticket:
        self.active += 1
        self._owners.setdefault(owner, _Owner()).held += 1
        ticket = Ticket(owner, time.monotonic())
        self._tickets.add(ticket)
        return ticket

    def release(self, ticket: Ticket | None) -> None:
        """Give a place back (idempotent) and hand it to the first stream waiting for one."""
        if ticket is None or ticket.released:
            return
        ticket.released = True
        self._tickets.discard(ticket)
        self.active -= 1
        self._hold_s = 0.8 * self._hold_s + 0.2 * (time.monotonic() - ticket.granted_at)
        o = self._owners.get(ticket.owner)
        if o is not None:
            o.held -= 1
            o.changed.set()
            self._forget_if_idle(ticket.owner)
        while self._waiting and self.active < self.capacity:
            owner, future = self._waiting.popleft()
            if not future.done():
                future.set_result(self._grant(owner))

    def _forget_if_idle(self, owner: Hashable) -> None:
        o = self._owners.get(owner)
        if o is not None and o.held == 0 and o.acquiring == 0:
            del self._owners[owner]

    def retry_after_ms(self) -> int:
        """When a place is likely to be free: the soonest expected end among the streams holding
        one (by the running mean of hold times), at least 100 ms, at most 30 s."""
        now = time.monotonic()
        remaining = min((self._hold_s - (now - t.granted_at) for t in self._tickets), default=0.0)
        behind = len(self._waiting) * self._hold_s / self.capacity  # those already queued go first
        return int(min(30_000, max(100, math.ceil((max(0.0, remaining) + behind) * 1000))))
