"""The Starlette application: the WebSocket stream, the HTTP synthesis routes (ours and the official
CosyVoice FastAPI ones), health, voices, metrics and the browser client."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from .audio.encoders import AudioEncoder, make_encoder
from .audio.formats import allowed_sample_rates, default_sample_rate, validate_audio_format
from .auth import check_token
from .engines.base import AudioChunk, Engine, EngineError, SynthesisOptions
from .metrics import METRICS
from .protocol import (
    FORMATS,
    Limits,
    OutputOptions,
    Protocol,
    ProtocolError,
    SessionInfo,
    VoiceOptions,
    parse_output_options,
    parse_voice_options,
)
from .session import Runtime, Session
from .synthesis import Failed, Finished, Synthesis, synthesis_options

log = logging.getLogger("realtime.server")

HTTP_STATUS = {"bad_request": 400, "unauthorized": 401, "unknown_voice": 404, "too_large": 413,
               "overloaded": 503, "internal": 500}


@dataclass
class ServerConfig:
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_sessions: int = 200
    max_concurrent_syntheses: int = 4
    buffer_seconds: float = 1.0
    send_timeout: float = 10.0
    idle_timeout: float = 300.0
    queue_timeout: float = 5.0
    realtime_lead_ms: int = 300
    realtime_batch_ms: int = 100
    frame_ms: int = 20


def _output_check(out: OutputOptions, native_rate: int) -> str | None:
    rate = out.sample_rate or default_sample_rate(out.format, native_rate)
    return validate_audio_format(out.format, rate, out.container, native_rate)


def session_info(engine: Engine) -> SessionInfo:
    return SessionInfo(
        native_rate=engine.sample_rate,
        default_voice=engine.default_voice,
        voices=frozenset(v.id for v in engine.voices()),
        modes=tuple(engine.modes),
        output_check=_output_check,
        engine_name=engine.name,
    )


def error_response(code: str, message: str, status: int | None = None) -> JSONResponse:
    METRICS.errors.inc(code)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status or HTTP_STATUS.get(code, 400))


class TokenAuth:
    """ASGI middleware: every HTTP route but the static page needs the token once one is set.
    WebSockets are checked in their endpoint, where a refusal can still be an HTTP response."""

    PUBLIC = ("/", "/favicon.ico")

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
            await error_response("unauthorized", f"{problem} API token", code)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _web_dir():
    return importlib.resources.files("realtime.web")


_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png"}


def _is_static(path: str) -> bool:
    if path in ("/", "/index.html"):
        return True
    name = path.rsplit("/", 1)[-1]
    return (path.startswith("/static/") or path.count("/") == 1) and any(name.endswith(s) for s in _STATIC_TYPES)


async def static_file(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    if "/" in name or name.startswith(".") or not any(name.endswith(s) for s in _STATIC_TYPES):
        return error_response("bad_request", "not found", 404)
    path = _web_dir() / name
    if not path.is_file():
        return error_response("bad_request", f"{name} not found", 404)
    suffix = name[name.rfind("."):]
    return FileResponse(str(path), media_type=_STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` (never reads more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(engine: Engine, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    info = session_info(engine)
    executor = ThreadPoolExecutor(max_workers=config.max_concurrent_syntheses, thread_name_prefix="synth")
    state: dict[str, object] = {"sessions": 0}
    runtime_box: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        # the semaphore must be made on the serving loop, so the runtime is built on first use
        if "rt" not in runtime_box:
            runtime_box["rt"] = Runtime(
                engine=engine, executor=executor,
                synth_slots=asyncio.Semaphore(config.max_concurrent_syntheses),
                buffer_seconds=config.buffer_seconds, frame_ms=config.frame_ms,
                send_timeout=config.send_timeout, idle_timeout=config.idle_timeout,
                queue_timeout=config.queue_timeout, realtime_lead_ms=config.realtime_lead_ms,
                realtime_batch_ms=config.realtime_batch_ms,
            )
        return runtime_box["rt"]

    # ---- WebSocket ------------------------------------------------------------------------
    async def stream(ws: WebSocket) -> None:
        problem = check_token(config.token, ws.headers, ws.query_params)
        if problem:
            METRICS.errors.inc("unauthorized")
            status = 401 if problem == "missing" else 403
            body = JSONResponse({"error": {"code": "unauthorized", "message": f"{problem} API token"}}, status_code=status)
            try:
                await ws.send_denial_response(body)
            except RuntimeError:  # server without the denial extension: refuse with a policy close
                await ws.close(code=1008, reason=f"{problem} API token")
            return
        await ws.accept()
        if state["sessions"] >= config.max_sessions:
            METRICS.errors.inc("overloaded")
            await ws.send_text(Protocol.error_frame("overloaded", "too many sessions; try again later", True))
            await ws.close(code=1013, reason="too many sessions")
            return
        state["sessions"] += 1
        protocol = Protocol(info, config.limits)

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

        async def send_raw(data: str | bytes) -> None:
            if isinstance(data, str):
                await ws.send_text(data)
            else:
                await ws.send_bytes(data)

        async def close(code: int, reason: str) -> None:
            with contextlib.suppress(Exception):
                await ws.close(code=code, reason=reason)

        try:
            session = Session(runtime(), protocol, receive, send_raw, close)
            await session.run()
        finally:
            state["sessions"] -= 1

    # ---- HTTP synthesis --------------------------------------------------------------------
    async def synthesize_stream(text: str, options: SynthesisOptions, encoder: AudioEncoder) -> AsyncIterator[bytes]:
        rt = runtime()
        try:
            async with asyncio.timeout(rt.queue_timeout):
                await rt.synth_slots.acquire()
        except TimeoutError:
            raise ProtocolError("overloaded", "no synthesis capacity free; try again") from None
        synthesis = Synthesis(engine, options, asyncio.get_running_loop(), rt.buffer_seconds)
        synthesis.text.push(text)
        synthesis.text.end()
        synthesis.start(executor)

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    item = await synthesis.get()
                    if isinstance(item, AudioChunk):
                        for frame in encoder.encode(np.asarray(item.samples, dtype=np.float32).reshape(-1)):
                            yield frame
                    elif isinstance(item, Finished):
                        for frame in encoder.finish():
                            yield frame
                        METRICS.audio_seconds.inc(value=encoder.samples_out / encoder.sample_rate)
                        return
                    elif isinstance(item, Failed):
                        # headers are gone already: the stream just ends, and the log says why
                        log.warning("HTTP synthesis failed: %s %s", item.code, item.message)
                        METRICS.errors.inc(item.code)
                        return
            finally:
                synthesis.cancel()
                await synthesis.wait_stopped()
                rt.synth_slots.release()

        return body()

    async def tts(request: Request) -> Response:
        METRICS.http_requests.inc("/v1/tts")
        try:
            raw = await _read_bounded(request, config.limits.max_frame_bytes)
            if raw is None:
                return error_response("too_large", f"body exceeds {config.limits.max_frame_bytes} bytes")
            try:
                body = json.loads(raw)
            except ValueError:
                return error_response("bad_request", "body must be JSON: {\"text\": ..., options}")
            if not isinstance(body, dict):
                return error_response("bad_request", "body must be a JSON object")
            allowed = {"text", "voice", "mode", "prompt_text", "prompt_audio", "instruct_text", "speed",
                       "token_hop_len", "seed", "format", "sample_rate", "container"}
            unknown = set(body) - allowed
            if unknown:
                return error_response("bad_request", f"unknown key(s): {sorted(unknown)}")
            text = body.get("text")
            if not isinstance(text, str) or not text.strip():
                return error_response("bad_request", "text must be a non-empty string")
            if len(text) > config.limits.max_context_chars:
                return error_response("too_large", f"text may hold at most {config.limits.max_context_chars} characters")
            body.setdefault("container", "wav" if body.get("format", "pcm_s16le") != "opus" else "ogg")
            out = parse_output_options(body, info)
            voice = parse_voice_options(body, VoiceOptions(voice=info.default_voice), info, config.limits)
            rate = out.sample_rate or default_sample_rate(out.format, engine.sample_rate)
            encoder = make_encoder(out.format, rate, out.container, engine.sample_rate)
            stream = await synthesize_stream(text, synthesis_options(voice), encoder)
            return StreamingResponse(stream, media_type=encoder.content_type)
        except ProtocolError as e:
            return error_response(e.code, e.message)

    async def official(request: Request) -> Response:
        """The official CosyVoice FastAPI routes: form fields (GET: query), raw int16 PCM at the
        model's rate, streamed while it is synthesised."""
        route = request.url.path.strip("/")
        METRICS.http_requests.inc("/" + route)
        if request.method == "POST":
            try:
                form = await request.form(max_part_size=config.limits.max_prompt_audio_bytes + 1024)
            except Exception as e:
                return error_response("bad_request", f"could not read form: {e}")
        else:
            form = request.query_params
        fields: dict[str, str] = {}
        prompt_wav: bytes | None = None
        for key in ("tts_text", "spk_id", "prompt_text", "instruct_text"):
            value = form.get(key)
            if isinstance(value, str):
                fields[key] = value
        upload = form.get("prompt_wav")
        if isinstance(upload, UploadFile):
            prompt_wav = await upload.read()
            if len(prompt_wav) > config.limits.max_prompt_audio_bytes:
                return error_response("too_large", "prompt_wav is too large")
        text = fields.get("tts_text", "")
        if not text.strip():
            return error_response("bad_request", "tts_text is required")
        if len(text) > config.limits.max_context_chars:
            return error_response("too_large", f"tts_text may hold at most {config.limits.max_context_chars} characters")
        mode = {"inference_sft": "sft", "inference_zero_shot": "zero_shot",
                "inference_cross_lingual": "cross_lingual", "inference_instruct": "instruct",
                "inference_instruct2": "instruct2"}[route]
        if mode == "instruct":
            return error_response("bad_request", "inference_instruct is CosyVoice 1's speaker+instruct mode, which "
                                  "CosyVoice2 does not have; use /inference_instruct2 (instruct_text + prompt_wav)")
        if mode != "sft" and prompt_wav is None:
            return error_response("bad_request", f"/{route} needs the prompt_wav file field")
        try:
            requested = {"voice": fields.get("spk_id") or info.default_voice, "mode": mode,
                         "prompt_text": fields.get("prompt_text"), "instruct_text": fields.get("instruct_text")}
            voice = parse_voice_options({k: v for k, v in requested.items() if v is not None},
                                        VoiceOptions(), info, config.limits)
            if prompt_wav is not None:
                voice = replace(voice, prompt_audio=prompt_wav)
            encoder = make_encoder("pcm_s16le", engine.sample_rate, "raw", engine.sample_rate)
            stream = await synthesize_stream(text, synthesis_options(voice), encoder)
        except ProtocolError as e:
            return error_response(e.code, e.message)
        return StreamingResponse(stream, media_type="application/octet-stream",
                                 headers={"X-Sample-Rate": str(engine.sample_rate)})

    async def register_voice(request: Request) -> Response:
        """POST /v1/voices (multipart: voice_id, prompt_text, prompt_wav): a zero-shot voice, for
        engines that can register one (``engine.register_voice``)."""
        METRICS.http_requests.inc("/v1/voices")
        register = getattr(engine, "register_voice", None)
        if register is None:
            return error_response("bad_request", f"engine {engine.name!r} cannot register voices", 404)
        try:
            form = await request.form(max_part_size=config.limits.max_prompt_audio_bytes + 1024)
        except Exception as e:
            return error_response("bad_request", f"could not read form: {e}")
        voice_id, prompt_text, upload = form.get("voice_id"), form.get("prompt_text"), form.get("prompt_wav")
        if not isinstance(voice_id, str) or not isinstance(prompt_text, str) or not isinstance(upload, UploadFile):
            return error_response("bad_request", "multipart fields voice_id, prompt_text and prompt_wav (a file) are required")
        wav = await upload.read()
        if len(wav) > config.limits.max_prompt_audio_bytes:
            return error_response("too_large", "prompt_wav is too large")
        try:
            voice = await asyncio.to_thread(register, voice_id, wav, prompt_text)
        except EngineError as e:
            return error_response(e.code, e.message, 409 if e.code == "conflict" else None)
        info.voices = info.voices | {voice.id}  # new sessions may use it at once
        return JSONResponse({"voice": voice.__dict__}, status_code=201)

    # ---- service routes ---------------------------------------------------------------------
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "engine": engine.name, "sample_rate": engine.sample_rate,
                             "sessions": state["sessions"]})

    async def voices(request: Request) -> Response:
        return JSONResponse({
            "engine": engine.name,
            "sample_rate": engine.sample_rate,
            "default_voice": engine.default_voice,
            "modes": list(engine.modes),
            "voices": [v.__dict__ for v in engine.voices()],
            "formats": list(FORMATS),
            "sample_rates": sorted({r for f in FORMATS for r in allowed_sample_rates(f, engine.sample_rate)}),
            "sample_rates_by_format": {f: list(allowed_sample_rates(f, engine.sample_rate)) for f in FORMATS},
        })

    async def metrics(request: Request) -> Response:
        rt = runtime_box.get("rt")
        busy = config.max_concurrent_syntheses - rt.synth_slots._value if rt else 0
        return PlainTextResponse(METRICS.render({"realtime_syntheses_active": busy,
                                                 "realtime_synthesis_slots": config.max_concurrent_syntheses}),
                                 media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        engine.close()

    official_routes = [Route(f"/{name}", official, methods=["GET", "POST"]) for name in (
        "inference_sft", "inference_zero_shot", "inference_cross_lingual", "inference_instruct", "inference_instruct2")]
    routes = [
        Route("/", static_file),
        Route("/health", health),
        Route("/v1/voices", voices),
        Route("/v1/voices", register_voice, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/v1/tts", tts, methods=["POST"]),
        WebSocketRoute("/v1/tts/stream", stream),
        *official_routes,
        Route("/static/{name}", static_file),
        Route("/{name}", static_file),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(TokenAuth, token=config.token)
    app.state.engine = engine
    app.state.config = config
    app.state.executor = executor
    return app

