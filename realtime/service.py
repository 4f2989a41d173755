"""What every route shares: the one typed app state (:class:`Service`, on ``app.state``), the
server's configuration, and the JSON error responses.

Routes read the service with :func:`service_of` and touch nothing else of the app; every error
is a body ``{"error": {"code", "message"}}`` with the status of its code (``realtime.errors``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from .admission import Admission
from .audio.formats import default_sample_rate, validate_audio_format
from .engines.base import Engine, EngineError
from .errors import ProtocolError
from .lifecycle import RETRY_AFTER_MS, Lifecycle
from .metrics import Metrics
from .protocol import (
    Limits,
    OutputOptions,
    SessionInfo,
)
from .session import Runtime


@dataclass
class ServerConfig:
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 200
    max_streams: int | None = None  # streams speaking at once; None: the engine's own capacity
    max_streams_per_session: int | None = None  # None: half of max_streams (at least 1)
    buffer_seconds: float = 1.0
    send_timeout: float = 10.0
    idle_timeout: float = 300.0
    context_idle_timeout: float = 30.0
    queue_timeout: float = 5.0
    body_timeout: float = 30.0  # an HTTP request body must arrive within this
    header_timeout: float = 10.0  # enforced by realtime.transport, see uvicorn_config
    close_timeout: float = 5.0
    realtime_lead_ms: int = 300
    realtime_batch_ms: int = 100
    frame_ms: int = 20
    # names that clients of other APIs use (OpenAI's voices) -> our voices; OpenAI's names not
    # listed here mean the default voice
    voice_aliases: dict[str, str] = field(default_factory=dict)


def _output_check(out: OutputOptions, native_rate: int) -> str | None:
    rate = out.sample_rate if out.sample_rate is not None else default_sample_rate(out.format, native_rate)
    return validate_audio_format(out.format, rate, out.container, native_rate)


def session_info(engine: Engine) -> SessionInfo:
    return SessionInfo(
        native_rate=engine.sample_rate,
        default_voice=engine.default_voice,
        voices=frozenset(v.id for v in engine.voices()),
        modes=tuple(engine.modes),
        output_check=_output_check,
        engine_name=engine.name,
        # voices registered later (here or by a replica sharing the model directory)
        lookup_voice=lambda voice: any(v.id == voice for v in engine.voices()),
    )


def capacity(engine: Engine, max_streams: int | None) -> int:
    """The streams admitted at once: ``max_streams`` or the engine's own estimate, never more than
    the engine can hold."""
    wanted = max_streams or engine.capacity
    return wanted if engine.max_capacity is None else min(wanted, engine.max_capacity)


class Service:
    """What every route shares: the engine, the limits, the session count and the runtime."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.info = session_info(engine)
        self.sessions = 0
        self.capacity = capacity(engine, config.max_streams)
        self.lifecycle = Lifecycle()
        self.metrics = Metrics()
        self.metrics.watch(
            lambda: self.runtime.admission.active,
            lambda: self.runtime.admission.capacity,
            lambda: self.runtime.admission.waiting,
            lambda: self.lifecycle.draining,
        )
        self.metrics.add_engine(engine.stats, engine.distributions)
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """Made on first use, because admission's asyncio objects belong to the serving loop."""
        if self._runtime is None:
            c = self.config
            self._runtime = Runtime(
                engine=self.engine,
                admission=Admission(self.capacity, c.max_streams_per_session, c.queue_timeout),
                buffer_seconds=c.buffer_seconds,
                frame_ms=c.frame_ms,
                send_timeout=c.send_timeout,
                idle_timeout=c.idle_timeout,
                context_idle_timeout=c.context_idle_timeout,
                realtime_lead_ms=c.realtime_lead_ms,
                realtime_batch_ms=c.realtime_batch_ms,
                lifecycle=self.lifecycle,
                metrics=self.metrics,
            )
        return self._runtime

    @property
    def load(self) -> float:
        """Places in use over places: what a balancer or an autoscaler reads."""
        admission = self.runtime.admission
        return round(admission.active / admission.capacity, 3) if admission.capacity else 1.0

    def refuse_if_draining(self) -> None:
        if self.lifecycle.draining:
            raise ProtocolError(
                "going_away",
                "the server is shutting down; another replica will answer",
                retry_after_ms=RETRY_AFTER_MS,
            )

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, let what is speaking finish (up to ``timeout`` s), close the rest."""
        return await self.lifecycle.drain(timeout, busy=lambda: self.runtime.admission.active > 0)


def service_of(conn: Request | WebSocket) -> Service:
    """The service of the app serving this request or socket."""
    return conn.app.state.service


# ---- errors -------------------------------------------------------------------------------------
def error_response(
    code: str,
    message: str,
    status: int | None = None,
    retry_after_ms: int | None = None,
    metrics: Metrics | None = None,
) -> JSONResponse:
    """The JSON error response of ``code`` (counted in ``metrics`` when given)."""
    if metrics is not None:
        metrics.errors.labels(code).inc()
    error = ProtocolError(code, message, retry_after_ms=retry_after_ms)
    headers = {"Retry-After": str(math.ceil(retry_after_ms / 1000))} if retry_after_ms is not None else None
    return JSONResponse({"error": error.body()}, status_code=status or error.http_status, headers=headers)


def error_from(e: ProtocolError | EngineError, metrics: Metrics | None = None) -> JSONResponse:
    return error_response(
        e.code, e.message, retry_after_ms=getattr(e, "retry_after_ms", None), metrics=metrics
    )
