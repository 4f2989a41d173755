"""How uvicorn carries our connections: a deadline on everything a client can stall, and one write
per connection per event-loop iteration.

uvicorn leaves several waits to the client's good will.  Its HTTP protocol has no deadline for the
request headers (a half-open upgrade or a slowloris holds a connection for ever); a download
whose client stops reading waits in ``drain`` for ever; and ``transport.close()`` on a socket with
unsent data keeps it established until the peer reads it all, which a client that never reads
never does.  The protocol subclasses here bound each of those waits (:class:`Deadlines`), answer
in JSON where uvicorn answers in plain text, and keep log lines to one per event a client causes
(uvicorn logs a traceback per invalid UTF-8 frame and an ERROR per refused WebSocket).

Write coalescing: a paced session sends its audio in batches (several frames back to back, see
``realtime.session._Pacer``), and uvicorn writes every WebSocket frame to the socket on its own:
one ``send(2)`` per 20 ms frame was half of the service's CPU per frame.  :class:`ServerTransport`
collects what a connection writes during one loop iteration and hands it to the socket in one call
at the end of the iteration, so a batch of frames costs one system call and the client wakes once
per batch.  Nothing waits longer than the current iteration, and the order of bytes is unchanged
(close flushes first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

log = logging.getLogger("realtime.transport")

ACTIVITY_EXTENSION = "realtime.activity"


@dataclass(frozen=True)
class Deadlines:
    header_s: float = 10.0  # request line and headers (a WebSocket upgrade too) must arrive within this
    close_s: float = 5.0  # a closing connection whose peer does not take its last bytes is aborted after this
    stall_s: float = 20.0  # a response the client has not read from for this long is aborted


class ServerTransport:
    """A transport proxy: writes flushed once per loop iteration, and a ``close`` that turns into
    an abort if the peer has not taken the last bytes within ``close_s``."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, close_s: float = 5.0
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._close_s = close_s
        self._pending: list[bytes] = []
        self._abort_timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        for data in chunks:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()
        if self._abort_timer is None and self._transport.get_write_buffer_size():
            self._abort_timer = self._loop.call_later(self._close_s, self._abort_if_unsent)

    def _abort_if_unsent(self) -> None:
        if self._transport.get_write_buffer_size():
            log.info(
                "peer did not take the last %d bytes within %.0fs; aborting the connection",
                self._transport.get_write_buffer_size(),
                self._close_s,
            )
            self.abort()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included.  A plain close or abort leaves unsent
        bytes with the kernel, which keeps the connection (and retransmits to a peer that does not
        read) for minutes after we let go; a zero linger resets it at once."""
        self._pending.clear()
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


def _wrap(transport: Any, loop: asyncio.AbstractEventLoop, close_s: float) -> ServerTransport:
    return transport if isinstance(transport, ServerTransport) else ServerTransport(transport, loop, close_s)


class _StallGuard:
    """Abort a connection whose writes have been paused (the client not reading) for too long."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_s: float) -> None:
        self._loop = loop
        self._stall_s = stall_s
        self._timer: asyncio.TimerHandle | None = None

    def paused(self, transport: Any) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._stall_s, self._fire, transport)

    def resumed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, transport: Any) -> None:
        self._timer = None
        log.info("client did not read for %.0fs; aborting the connection", self._stall_s)
        transport.abort()


def _json_response(status: int, reason: bytes, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


class _StallGuarded:
    """Mixin for the protocols below: a connection whose writes stay paused too long is aborted."""

    _stall: _StallGuard
    transport: Any

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._stall.paused(self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._stall.resumed()


class GuardedHttpProtocol(_StallGuarded, HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a write-stall deadline, an abort for a
    close the peer does not complete, and JSON for the errors it answers itself."""

    deadlines = Deadlines()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        self._stall = _StallGuard(loop, self.deadlines.stall_s)
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(_wrap(transport, loop, self.deadlines.close_s))  # type: ignore[arg-type]
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.deadlines.header_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        log.info(
            "%s: request headers did not arrive within %.0fs; closing", self.client, self.deadlines.header_s
        )
        self.transport.write(
            _json_response(
                408,
                b"Request Timeout",
                "timeout",
                f"request headers must arrive within {self.deadlines.header_s:g} s",
            )
        )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._disarm_header_timer()
        self.transport.write(_json_response(400, b"Bad Request", "bad_request", msg))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._stall.resumed()
        super().connection_lost(exc)


class _Activity:
    """The loop time of the client's last sign of life that the app does not see itself (pings)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.last = loop.time()

    def touch(self) -> None:
        self.last = self._loop.time()

    def __call__(self) -> float:
        return self.last


class GuardedWebSocketProtocol(_StallGuarded, WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol writing through a :class:`ServerTransport`, with the
    client's pings exposed to the app as activity (scope extension ``realtime.activity``), a
    bounded close handshake and write stall, and one log line per refused or invalid frame."""

    deadlines = Deadlines()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self._stall = _StallGuard(loop, self.deadlines.stall_s)
        self._activity = _Activity(loop)
        self.close_timeout = self.deadlines.close_s
        super().connection_made(_wrap(transport, loop, self.deadlines.close_s))

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][ACTIVITY_EXTENSION] = self._activity

    def handle_ping(self) -> None:
        self._activity.touch()
        super().handle_ping()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                data.decode()
            except UnicodeDecodeError:
                self.frames = []
                log.info("%s: invalid UTF-8 in a text frame; closing with 1007", self.client)
                self.conn.send_close(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # a refusal sent as an HTTP response is a finished handshake

    def connection_lost(self, exc: Exception | None) -> None:
        self._stall.resumed()
        super().connection_lost(exc)


def uvicorn_options(max_frame_bytes: int, deadlines: Deadlines | None = None) -> dict[str, Any]:
    """The protocol settings of every uvicorn that serves this app (the CLI and the tests)."""
    d = deadlines or Deadlines()
    http = type("HttpProtocol", (GuardedHttpProtocol,), {"deadlines": d})
    ws = type("WebSocketProtocol", (GuardedWebSocketProtocol,), {"deadlines": d})
    return {
        "http": http,
        "ws": ws,
        # above our own limit, so that an oversize frame reaches the protocol and gets its typed
        # too_large error rather than uvicorn's bare close
        "ws_max_size": max_frame_bytes * 2 + 65536,
        "ws_ping_interval": 20,
        "ws_ping_timeout": 20,
        # audio does not compress: deflating every frame only burns the event loop's CPU
        "ws_per_message_deflate": False,
    }
