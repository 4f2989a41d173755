"""How uvicorn carries our WebSockets: one write per connection per event-loop iteration.

A paced session sends its audio in batches (several frames back to back, see
``realtime.session._Pacer``), and uvicorn writes every WebSocket frame to the socket on its own:
one ``send(2)`` per 20 ms frame was half of the service's CPU per frame.  ``CorkedTransport``
collects what a connection writes during one loop iteration and hands it to the socket in one
call at the end of the iteration, so a batch of frames costs one system call and the client wakes
once per batch.  Nothing waits longer than the current iteration, and the order of bytes is
unchanged (close flushes first).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class CorkedTransport:
    """A transport proxy whose ``write`` is flushed once per loop iteration."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

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

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)


class CorkedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol writing through a :class:`CorkedTransport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CorkedTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]


def uvicorn_ws_options(max_frame_bytes: int) -> dict[str, Any]:
    """The WebSocket settings of every uvicorn that serves this app (the CLI and the tests)."""
    return {
        "ws": CorkedWebSocketProtocol,
        # above our own limit, so that an oversize frame reaches the protocol and gets its typed
        # too_large error rather than uvicorn's bare close
        "ws_max_size": max_frame_bytes * 2 + 65536,
        "ws_ping_interval": 20,
        "ws_ping_timeout": 20,
        # audio does not compress: deflating every frame only burns the event loop's CPU
        "ws_per_message_deflate": False,
    }
