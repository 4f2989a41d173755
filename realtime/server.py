"""The Starlette application: :func:`create_app` mounts the route modules (``realtime.routes``:
the WebSocket stream, our HTTP synthesis, voices, operations; ``realtime.compat`` and
``realtime.elevenlabs``: the other APIs' routes) over one :class:`~realtime.service.Service` on
``app.state``, with the token check, JSON errors for everything (404 and 405 included) and the
draining uvicorn server that SIGTERM starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from . import compat, elevenlabs
from .auth import check_token
from .engines.base import Engine
from .errors import ERROR_CODES
from .metrics import Metrics
from .routes import operations, stream, synthesis, voices
from .routes.operations import is_static
from .service import ServerConfig, Service, error_response, session_info
from .transport import Deadlines, uvicorn_options

log = logging.getLogger("realtime.server")


def uvicorn_config(app: ASGIApp, config: ServerConfig, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn configuration that serves ``app`` with this config's protocol deadlines: the CLI
    and the tests serve the same way."""
    deadlines = Deadlines(
        header_s=config.header_timeout,
        close_s=config.close_timeout,
        stall_s=config.send_timeout + config.close_timeout,
    )
    return uvicorn.Config(app, **kwargs, **uvicorn_options(config.limits.max_frame_bytes, deadlines))


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT drains first (readiness fails, open contexts finish up
    to ``drain_timeout`` seconds, the rest get ``going_away`` and 1001) and the process then exits
    0; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # not recorded in uvicorn's captured signals: it re-raises them after shutdown, and the
        # process would die of SIGTERM instead of exiting 0
        if self._drain is not None or self._loop is None or self.should_exit:
            log.warning("second signal: exiting now")
            self.force_exit = self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.drain(self.drain_timeout)
        finally:
            self.should_exit = True


def _app_metrics(scope: Scope) -> Metrics | None:
    """The metrics of the app serving ``scope`` (Starlette puts the app in the scope)."""
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    return service.metrics if isinstance(service, Service) else None


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "bad_request")
    response = error_response(code, str(exc.detail), exc.status_code, metrics=_app_metrics(request.scope))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response("internal", "internal error", metrics=_app_metrics(request.scope))


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """What no route matches: JSON 404, also for a WebSocket upgrade to an unknown path (refused
    with an HTTP response before the handshake completes)."""
    response = error_response("not_found", f"{scope.get('path', '')} not found", metrics=_app_metrics(scope))
    if scope["type"] == "websocket":
        await WebSocket(scope, receive, send).send_denial_response(response)
    elif scope["type"] == "http":
        await response(scope, receive, send)


class TokenAuth:
    """ASGI middleware: every HTTP route but the static page needs the token once one is set.
    WebSockets are checked in their endpoint, where a refusal can still be an HTTP response."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token or is_static(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        problem = check_token(self.token, request.headers, request.query_params)
        if problem:
            code = 401 if problem == "missing" else 403
            await error_response("unauthorized", f"{problem} API token", code, metrics=_app_metrics(scope))(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


def create_app(engine: Engine, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    service = Service(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        engine.close()

    routes = [
        Route("/", operations.static_file),
        Route("/health", operations.health),
        Route("/health/live", operations.health_live),
        Route("/health/ready", operations.health_ready),
        Route("/v1/voices", voices.voices, methods=["GET"]),
        Route("/v1/voices", voices.register_voice, methods=["POST"]),
        Route("/metrics", operations.metrics),
        Route("/v1/tts", synthesis.tts, methods=["POST"]),
        WebSocketRoute("/v1/tts/stream", stream.stream),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/stream-input", elevenlabs.stream_input),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/multi-stream-input", elevenlabs.multi_stream_input),
        *compat.compat_routes(),
        Route("/static/{name}", operations.static_file),
        Route("/{name}", operations.static_file),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: internal_error},
    )
    app.router.default = not_found
    app.add_middleware(TokenAuth, token=config.token)
    app.state.service = service
    return app


__all__ = [
    "ERROR_CODES",
    "DrainingServer",
    "ServerConfig",
    "Service",
    "create_app",
    "error_response",
    "session_info",
]
