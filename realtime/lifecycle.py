"""The service's life: serving, then draining for a rolling update or a scale-down.

A replica behind a load balancer gets SIGTERM; it must not cut a caller off mid-sentence. Draining:
readiness fails at once (the balancer stops sending new clients), new WebSocket upgrades and HTTP
syntheses are refused with ``going_away`` (503 + ``Retry-After``: another replica will take them),
sessions with no open context are closed at once, and sessions that are speaking finish their open
contexts (new contexts on them are refused) and are closed when they have none left.  What is
still open at the drain deadline gets a fatal ``going_away`` and a 1001 close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("realtime.lifecycle")

RETRY_AFTER_MS = 1000  # a refused client should come back at once: the balancer sends it elsewhere


class Drainable(Protocol):
    """A session as the lifecycle sees it."""

    def drain(self) -> None:
        """Draining has begun: close now if idle, else once the open contexts are done."""

    def go_away(self) -> None:
        """The drain deadline has passed: close now (fatal ``going_away``, 1001)."""


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self.sessions: set[Drainable] = set()

    def join(self, session: Drainable) -> None:
        self.sessions.add(session)
        if self.draining:
            session.drain()

    def leave(self, session: Drainable) -> None:
        self.sessions.discard(session)

    async def drain(self, timeout: float, busy: callable = lambda: False, poll: float = 0.1) -> bool:
        """Drain: returns True if everything finished within ``timeout`` seconds (``busy`` says
        whether anything besides sessions, e.g. HTTP downloads, is still speaking)."""
        self.draining = True
        log.info("draining: %d session(s) open, up to %.0f s", len(self.sessions), timeout)
        for session in list(self.sessions):
            session.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.sessions or busy()) and loop.time() < deadline:
            await asyncio.sleep(poll)
        clean = not self.sessions and not busy()
        if not clean:
            log.warning("drain deadline: closing %d session(s) still open", len(self.sessions))
            for session in list(self.sessions):
                session.go_away()
            close_by = loop.time() + 5
            while self.sessions and loop.time() < close_by:
                await asyncio.sleep(poll)
        log.info("drained%s", "" if clean else " (some sessions were cut at the deadline)")
        return clean
