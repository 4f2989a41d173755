"""The Starlette application: the WebSocket stream, the HTTP synthesis routes (ours and the official
CosyVoice FastAPI ones), health, voices, metrics and the browser client.

Every endpoint is a small module-level function over one :class:`Service` on ``app.state``.
Every error, 404 and 405 included, is a JSON body ``{"error": {"code", "message"}}`` with the
status of its code (``realtime.errors``).  Both kinds of synthesis go through the same
:class:`~realtime.synthesis.Synthesis`: admission, engine stream, cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .admission import Admission
from .audio.encoders import AudioEncoder, make_encoder
from .audio.formats import allowed_sample_rates, default_sample_rate, validate_audio_format
from .auth import check_token
from .engines.base import Engine, EngineError, Failed, SynthesisOptions
from .errors import ERROR_CODES, ProtocolError
from .lifecycle import RETRY_AFTER_MS, Lifecycle
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    FORMATS,
    Limits,
    OutputOptions,
    Protocol,
    SessionInfo,
    VoiceOptions,
    parse_output_options,
    parse_voice_options,
)
from .session import Runtime, Session
from .synthesis import Audio, Delivery, Synthesis, synthesis_options
from .text import unspeakable
from .transport import ACTIVITY_EXTENSION, Deadlines, uvicorn_options
from .validation import check_text, parse_json

log = logging.getLogger("realtime.server")


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


class Service:
    """What every route shares: the engine, the limits, the session count and the runtime."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.info = session_info(engine)
        self.sessions = 0
        self.capacity = config.max_streams or engine.capacity
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


def _service(conn: Request | WebSocket) -> Service:
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
        if scope["type"] != "http" or not self.token or _is_static(scope["path"]):
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


# ---- static web client ----------------------------------------------------------------------------
_STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def _is_static(path: str) -> bool:
    if path in ("/", "/index.html"):
        return True
    name = path.rsplit("/", 1)[-1]
    return (path.startswith("/static/") or path.count("/") == 1) and any(
        name.endswith(s) for s in _STATIC_TYPES
    )


async def static_file(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    if "/" in name or name.startswith(".") or not any(name.endswith(s) for s in _STATIC_TYPES):
        return error_response("not_found", f"{request.url.path} not found")
    path = importlib.resources.files("realtime.web") / name
    if not path.is_file():
        return error_response("not_found", f"{name} not found")
    suffix = name[name.rfind(".") :]
    return FileResponse(str(path), media_type=_STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})


# ---- WebSocket ------------------------------------------------------------------------------------
async def stream(ws: WebSocket) -> None:
    service = _service(ws)
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


# ---- HTTP synthesis ---------------------------------------------------------------------------------
class AudioStreamResponse(Response):
    """Streams one synthesis as the response body, from its first delivered item on.

    The synthesis is closed in ``finally`` however the response ends (done, failed, client gone,
    client not reading for ``send_timeout``), and closing never awaits, so a dropped download
    always gives its place back.
    """

    def __init__(
        self,
        synthesis: Synthesis,
        deliveries: AsyncIterator[Delivery],
        first: Delivery,
        media_type: str,
        send_timeout: float,
        headers: dict[str, str] | None = None,
        events: Any = None,
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)  # no body attribute: no Content-Length, the body is chunked
        self.synthesis = synthesis
        self.deliveries = deliveries
        self.first = first
        self.send_timeout = send_timeout
        self.events = (
            events  # wraps each piece of audio (e.g. compat.SseAudio), or None: the bytes as they are
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = asyncio.create_task(self._body(send))
        watcher = asyncio.create_task(self._watch_disconnect(receive))
        try:
            await asyncio.wait({body, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.synthesis.close()
            for task in (body, watcher):
                task.cancel()
            await asyncio.gather(body, watcher, return_exceptions=True)
            await self.deliveries.aclose()

    @staticmethod
    async def _watch_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _send(self, send: Send, message: dict) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await send(message)
        except TimeoutError:
            raise _Stalled() from None

    async def _body(self, send: Send) -> None:
        try:
            await self._send(
                send, {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            events, end = self.events, b""
            async for item in _chain(self.first, self.deliveries):
                if isinstance(item, Audio):
                    for frame in item.frames:
                        body = events.frame(frame) if events else frame
                        await self._send(
                            send, {"type": "http.response.body", "body": body, "more_body": True}
                        )
                elif isinstance(item, Failed):
                    # headers are gone already: the stream just ends (with an error event where the
                    # format has one), and the log says why
                    log.warning("HTTP synthesis failed: %s %s", item.code, item.message)
                    end = events.error(item.code, item.message) if events else b""
                    break
            else:
                end = events.done() if events else b""
            await self._send(send, {"type": "http.response.body", "body": end, "more_body": False})
        except _Stalled:
            log.warning("HTTP client did not read for %.1fs; dropping the download", self.send_timeout)
        except OSError:  # ASGI 2.4 servers raise this for a client that is gone
            pass
        finally:
            self.synthesis.close()


class _Stalled(Exception):
    pass


async def _chain(first: Delivery, rest: AsyncIterator[Delivery]) -> AsyncIterator[Delivery]:
    yield first
    async for item in rest:
        yield item


async def synthesis_response(
    service: Service,
    text: str,
    options: SynthesisOptions,
    encoder: AudioEncoder,
    media_type: str,
    headers: dict[str, str] | None = None,
    events: Any = None,
) -> Response:
    """Speak ``text`` (all of it, at once) and stream the audio; an error found before the first
    audio (no capacity, a voice that cannot be used) is an HTTP error instead."""
    service.refuse_if_draining()
    synthesis = Synthesis(
        service.engine,
        options,
        service.runtime.admission,
        f"http-{uuid.uuid4()}",
        service.config.buffer_seconds,
        service.metrics,
    )
    deliveries = synthesis.deliver(encoder)
    try:
        synthesis.push(text)
        synthesis.end()
        first = await anext(deliveries)
        if isinstance(first, Failed):
            raise ProtocolError(first.code, first.message, retry_after_ms=first.retry_after_ms)
        languages = service.engine.languages(options.voice)
        skipped = unspeakable(text, languages) if languages else []
        if skipped:  # the rest is spoken; the headers say what is not (percent-encoded UTF-8)
            headers = {
                **(headers or {}),
                "X-Voice-Languages": ",".join(languages),
                "X-Skipped-Text": quote(" ".join(skipped)),
            }
        return AudioStreamResponse(
            synthesis, deliveries, first, media_type, service.config.send_timeout, headers, events
        )
    except BaseException:
        synthesis.close()
        await deliveries.aclose()
        raise


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body; ``too_large`` as soon as it is known to exceed ``limit`` (never reads
    more), ``timeout`` if it does not arrive within ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError("too_large", f"body exceeds {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ProtocolError("too_large", f"body exceeds {limit} bytes")
    except TimeoutError:
        raise ProtocolError("timeout", f"the request body did not arrive within {timeout:g} s") from None
    return bytes(body)


async def read_json_object(
    request: Request, config: ServerConfig, allowed: set[str], shape: str = ""
) -> dict:
    """A JSON object body (bounded and validated like every client JSON) with no key outside
    ``allowed``; ``shape`` tells a client what was expected."""
    body = parse_json(
        await read_body(request, config.limits.max_frame_bytes, config.body_timeout), what="body"
    )
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", f"body must be a JSON object{shape}")
    unknown = set(body) - allowed
    if unknown:
        raise ProtocolError("bad_request", f"unknown key(s): {sorted(unknown)}")
    return body


async def read_form(request: Request, limits: Limits, timeout: float) -> FormData:
    """A urlencoded or multipart form, bounded like every body (the parser reads our bytes)."""
    raw = await read_body(request, limits.max_frame_bytes, timeout)
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=limits.max_prompt_audio_bytes + 1024)
    except Exception as e:
        raise ProtocolError("bad_request", f"could not read the form: {e}") from None
    for value in form.values():
        if isinstance(value, str):
            check_text(value, "form field")
    return form


_TTS_KEYS = {
    "text",
    "voice",
    "mode",
    "prompt_text",
    "prompt_audio",
    "instruct_text",
    "speed",
    "token_hop_len",
    "seed",
    "format",
    "sample_rate",
    "container",
}


async def tts(request: Request) -> Response:
    """POST /v1/tts: JSON ``{"text": ..., options}`` in, streaming audio out (WAV header first for PCM)."""
    service = _service(request)
    service.metrics.http_requests.labels("/v1/tts").inc()
    config, info = service.config, service.info
    try:
        body = await read_json_object(request, config, _TTS_KEYS, ': {"text": ..., options}')
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError("bad_request", "text must be a non-empty string")
        if len(text) > config.limits.max_context_chars:
            raise ProtocolError(
                "too_large", f"text may hold at most {config.limits.max_context_chars} characters"
            )
        body.setdefault("container", "wav" if body.get("format", "pcm_s16le") != "opus" else "ogg")
        out = parse_output_options(body, info)
        voice = parse_voice_options(body, VoiceOptions(voice=info.default_voice), info, config.limits)
        rate = (
            out.sample_rate
            if out.sample_rate is not None
            else default_sample_rate(out.format, service.engine.sample_rate)
        )
        encoder = make_encoder(out.format, rate, out.container, service.engine.sample_rate)
        return await synthesis_response(
            service, text, synthesis_options(voice), encoder, encoder.content_type
        )
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)


async def register_voice(request: Request) -> Response:
    """POST /v1/voices (multipart: voice_id, prompt_text, prompt_wav): a zero-shot voice, for
    engines that can register one (``engine.register_voice``)."""
    service = _service(request)
    service.metrics.http_requests.labels("/v1/voices").inc()
    register = getattr(service.engine, "register_voice", None)
    if register is None:
        return error_response(
            "not_found", f"engine {service.engine.name!r} cannot register voices", metrics=service.metrics
        )
    try:
        form = await read_form(request, service.config.limits, service.config.body_timeout)
        voice_id, prompt_text, upload = form.get("voice_id"), form.get("prompt_text"), form.get("prompt_wav")
        if (
            not isinstance(voice_id, str)
            or not isinstance(prompt_text, str)
            or not isinstance(upload, UploadFile)
        ):
            raise ProtocolError(
                "bad_request", "multipart fields voice_id, prompt_text and prompt_wav (a file) are required"
            )
        wav = await upload.read()
        if len(wav) > service.config.limits.max_prompt_audio_bytes:
            raise ProtocolError("too_large", "prompt_wav is too large")
        voice = await asyncio.to_thread(register, voice_id, wav, prompt_text)
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)
    return JSONResponse({"voice": voice.__dict__}, status_code=201)


# ---- service routes ---------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    service = _service(request)
    admission = service.runtime.admission
    return JSONResponse(
        {
            "status": "draining" if service.lifecycle.draining else "ok",
            "engine": service.engine.name,
            "sample_rate": service.engine.sample_rate,
            "sessions": service.sessions,
            "streams": admission.active,
            "capacity": admission.capacity,
            "waiting": admission.waiting,
            "load": service.load,
        }
    )


async def health_live(request: Request) -> Response:
    """Liveness: the process answers (a draining replica is alive)."""
    return JSONResponse({"status": "alive"})


async def health_ready(request: Request) -> Response:
    """Readiness: the model is loaded (the app exists only once it is), the replica is not
    draining, and it has a free place; 503 otherwise, so the balancer sends new clients elsewhere."""
    service = _service(request)
    admission = service.runtime.admission
    reason = (
        "draining"
        if service.lifecycle.draining
        else "at capacity"
        if admission.active >= admission.capacity
        else None
    )
    body = {"status": "ready" if reason is None else "not ready", "load": service.load}
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


async def voices(request: Request) -> Response:
    engine = _service(request).engine
    return JSONResponse(
        {
            "engine": engine.name,
            "sample_rate": engine.sample_rate,
            "default_voice": engine.default_voice,
            "modes": list(engine.modes),
            "voices": [v.__dict__ for v in engine.voices()],
            "formats": list(FORMATS),
            "sample_rates": sorted({r for f in FORMATS for r in allowed_sample_rates(f, engine.sample_rate)}),
            "sample_rates_by_format": {f: list(allowed_sample_rates(f, engine.sample_rate)) for f in FORMATS},
        }
    )


async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE)


def create_app(engine: Engine, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    service = Service(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        engine.close()

    from . import elevenlabs  # (these build on this module's helpers)
    from .compat import compat_routes

    routes = [
        Route("/", static_file),
        Route("/health", health),
        Route("/health/live", health_live),
        Route("/health/ready", health_ready),
        Route("/v1/voices", voices, methods=["GET"]),
        Route("/v1/voices", register_voice, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/v1/tts", tts, methods=["POST"]),
        WebSocketRoute("/v1/tts/stream", stream),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/stream-input", elevenlabs.stream_input),
        WebSocketRoute("/v1/text-to-speech/{voice_id}/multi-stream-input", elevenlabs.multi_stream_input),
        *compat_routes(),
        Route("/static/{name}", static_file),
        Route("/{name}", static_file),
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
