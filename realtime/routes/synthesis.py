"""``POST /v1/tts`` and what every HTTP synthesis route shares (ours, the official CosyVoice
ones, OpenAI's, VoxCPM's): bounded body readers and the streamed audio response, which runs the
same :class:`~realtime.synthesis.Synthesis` as the WebSocket (admission, engine stream, cleanup).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..audio.encoders import AudioEncoder, make_encoder
from ..audio.formats import default_sample_rate
from ..engines.base import EngineError, Failed, SynthesisOptions
from ..errors import ProtocolError
from ..protocol import (
    Limits,
    parse_output_options,
    parse_voice_options,
)
from ..service import ServerConfig, Service, error_from, service_of
from ..synthesis import Audio, Delivery, Synthesis
from ..text import unspeakable
from ..validation import check_text, parse_json

log = logging.getLogger("realtime.routes.synthesis")


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
    service = service_of(request)
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
        voice = parse_voice_options(body, SynthesisOptions(voice=info.default_voice), info, config.limits)
        rate = (
            out.sample_rate
            if out.sample_rate is not None
            else default_sample_rate(out.format, service.engine.sample_rate)
        )
        encoder = make_encoder(out.format, rate, out.container, service.engine.sample_rate)
        return await synthesis_response(service, text, voice, encoder, encoder.content_type)
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)
