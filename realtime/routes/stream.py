"""``/v1/tts/stream``: our WebSocket protocol.  The endpoint only adapts Starlette's socket to a
:class:`~realtime.session.Session`, which runs the sans-I/O :class:`~realtime.protocol.Protocol`.
"""

from __future__ import annotations

import contextlib

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..auth import check_token
from ..lifecycle import RETRY_AFTER_MS
from ..protocol import (
    Protocol,
)
from ..service import error_response, service_of
from ..session import Session
from ..transport import ACTIVITY_EXTENSION


# ---- WebSocket ------------------------------------------------------------------------------------
async def stream(ws: WebSocket) -> None:
    service = service_of(ws)
    config = service.config
    problem = check_token(config.token, ws.headers, ws.query_params)
    if problem:
        service.metrics.errors.labels("unauthorized").inc()
        status = 401 if problem == "missing" else 403
        body = JSONResponse(
            {"error": {"code": "unauthorized", "message": f"{problem} API token"}}, status_code=status
        )
        try:
            await ws.send_denial_response(body)
        except RuntimeError:  # server without the denial extension: refuse with a policy close
            await ws.close(code=1008, reason=f"{problem} API token")
        return
    if service.lifecycle.draining:
        with contextlib.suppress(RuntimeError):
            await ws.send_denial_response(
                error_response(
                    "going_away",
                    "the server is shutting down; reconnect",
                    retry_after_ms=RETRY_AFTER_MS,
                    metrics=service.metrics,
                )
            )
            return
        await ws.close(code=1001, reason="going away")
        return
    await ws.accept()
    if service.sessions >= config.max_sessions:
        service.metrics.errors.labels("overloaded").inc()
        with contextlib.suppress(Exception):
            await ws.send_text(
                Protocol.error_frame(
                    "overloaded", "too many sessions; try again later", True, retry_after_ms=1000
                )
            )
            await ws.close(code=1013, reason="too many sessions")
        return
    service.sessions += 1
    try:
        session = Session(
            service.runtime,
            Protocol(service.info, config.limits),
            _ws_receiver(ws),
            _ws_sender(ws),
            _ws_closer(ws),
            ws.scope.get("extensions", {}).get(ACTIVITY_EXTENSION),
        )
        await session.run()
    finally:
        service.sessions -= 1


def _ws_receiver(ws: WebSocket):
    async def receive() -> str | bytes | None:
        try:
            msg = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if msg["type"] == "websocket.disconnect":
            return None
        if msg.get("text") is not None:
            return msg["text"]
        return msg.get("bytes") or b""

    return receive


def _ws_sender(ws: WebSocket):
    async def send(data: str | bytes) -> None:
        if isinstance(data, str):
            await ws.send_text(data)
        else:
            await ws.send_bytes(data)

    return send


def _ws_closer(ws: WebSocket):
    async def close(code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await ws.close(code=code, reason=reason)

    return close
