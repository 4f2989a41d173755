"""ElevenLabs-compatible streaming input, so that clients written for it (Pipecat's
``ElevenLabsTTSService(url=...)``, LiveKit's ``elevenlabs.TTS(base_url=...)``) work against our
engines unchanged, text still streaming into the model as it arrives.

``/v1/text-to-speech/{voice_id}/stream-input`` (one utterance per socket) and
``/v1/text-to-speech/{voice_id}/multi-stream-input`` (contexts by ``context_id``):

- client: ``{"text": " ", "voice_settings", "generation_config", "xi_api_key"}`` (initialise),
  ``{"text": "...", "try_trigger_generation", "flush"}``, ``{"text": ""}`` (stream-input: end of
  input; multi: keep-alive), ``{"context_id", "flush": true}``, ``{"context_id", "close_context":
  true}`` (no more text for it: what was sent is spoken, then ``isFinal``), ``{"close_socket": true}``;
- server: ``{"audio": base64, "isFinal": false, "alignment", "normalizedAlignment", "contextId"}``
  per piece of audio, then ``{"isFinal": true, "contextId"}``; errors as ``{"error", "message",
  "code"}`` with our error codes.

Query: ``output_format`` (``pcm_8000`` ... ``pcm_48000``, ``ulaw_8000``, ``mp3_<rate>_<kbps>``),
``inactivity_timeout`` (seconds without a message before the socket is closed, default 20,
at most 180), ``sync_alignment``, ``model_id`` and the rest of that API's tuning (accepted,
meaningless here).  Auth: ``xi-api-key`` header, our usual carriers, or ``xi_api_key`` in the
first message.

Alignment: our engines say of a chunk how much of the text its audio completes (a mark: every
clause for the default voice, the end of a segment for CosyVoice2).  Every chunk leaves at once;
one with a mark carries the characters since the previous mark, spread evenly over its audio
(times from that message's start, as each message's alignment restarts at zero), which is as
precise as the marks are and never later than the audio already sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from .audio.encoders import AudioEncoder, CodecEncoder, SampleEncoder
from .auth import check_token
from .engines.base import Failed, Finished, SynthesisOptions
from .errors import ProtocolError
from .protocol import parse_voice_options
from .service import Service, service_of
from .synthesis import Audio, Synthesis, Word
from .validation import parse_json

log = logging.getLogger("realtime.elevenlabs")

PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
_KEYS = {
    "text",
    "voice_settings",
    "generation_config",
    "xi_api_key",
    "try_trigger_generation",
    "flush",
    "context_id",
    "close_context",
    "close_socket",
    "pronunciation_dictionary_locators",
    "model_id",
}


def parse_output_format(output_format: str) -> tuple[str, int, int | None]:
    """(our format, sample rate, bitrate) an ``output_format`` names; ``ProtocolError`` for any other."""
    kind, _, rest = output_format.partition("_")
    try:
        if kind == "pcm" and int(rest) in PCM_RATES:
            return "pcm_s16le", int(rest), None
        if output_format == "ulaw_8000":
            return "mulaw", 8000, None
        if kind == "mp3":
            rate, _, kbps = rest.partition("_")
            if int(rate) in (22050, 24000, 44100, 48000) and 8 <= int(kbps) <= 320:
                return "mp3", int(rate), int(kbps) * 1000
    except ValueError:
        pass
    raise ProtocolError(
        "bad_request",
        f"unsupported output_format {output_format!r}: pcm_8000 ... pcm_48000, "
        "ulaw_8000 or mp3_<rate>_<kbps>",
    )


def output_encoder(output: tuple[str, int, int | None], native_rate: int) -> AudioEncoder:
    """A fresh encoder for a parsed ``output_format`` (one per context)."""
    fmt, rate, bitrate = output
    if fmt == "mp3":
        return CodecEncoder("mp3", rate, native_rate, bitrate=bitrate)
    return SampleEncoder(fmt, rate, "raw", native_rate)


@dataclass
class _Context:
    id: str
    synthesis: Synthesis
    task: asyncio.Task | None = None
    text: str = ""  # everything pushed (the marks' offsets count its characters)


class ElevenLabsSession:
    def __init__(self, ws: WebSocket, service: Service, voice_id: str, multi: bool) -> None:
        self.ws = ws
        self.service = service
        self.voice_id = voice_id
        self.multi = multi
        self.contexts: dict[str, _Context] = {}
        self.options: SynthesisOptions | None = None
        self.output: tuple[str, int, int | None] = ("mp3", 44100, 128_000)  # set from the query in run()
        self.inactivity = 20.0
        self.authorized = check_token(service.config.token, ws.headers, ws.query_params) is None or (
            ws.headers.get("xi-api-key", "").strip() == service.config.token
        )
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def send(self, obj: dict) -> None:
        async with self._send_lock:
            if not self._closed:
                await self.ws.send_text(json.dumps(obj, separators=(",", ":")))

    async def run(self) -> None:
        service = self.service
        try:
            query = self.ws.query_params
            self.output = parse_output_format(query.get("output_format", "mp3_44100_128"))
            try:
                self.inactivity = min(180.0, max(1.0, float(query.get("inactivity_timeout") or 20)))
            except ValueError:
                raise ProtocolError("bad_request", "inactivity_timeout must be a number of seconds") from None
            info = service.info
            voice = self.voice_id if info.has_voice(self.voice_id) else None
            if voice is None and self.voice_id not in ("default", "_"):
                from .compat import OPENAI_VOICES

                if self.voice_id not in OPENAI_VOICES and self.voice_id not in service.config.voice_aliases:
                    raise ProtocolError(
                        "unknown_voice", f"unknown voice {self.voice_id!r}; see GET /v1/voices"
                    )
                voice = service.config.voice_aliases.get(self.voice_id)
            self.options = parse_voice_options(
                {"voice": voice or info.default_voice}, SynthesisOptions(), info, service.config.limits
            )
        except (ProtocolError, ValueError) as e:
            code = getattr(e, "code", "bad_request")
            await self.send({"error": code, "message": str(e), "code": code})
            await self.ws.close(1008, str(e)[:120])
            return
        try:
            while not self._closed:
                try:
                    raw = await asyncio.wait_for(self.ws.receive_text(), self.inactivity)
                except TimeoutError:
                    await self.send(
                        {
                            "error": "timeout",
                            "code": "timeout",
                            "message": f"no message for {self.inactivity:g} s",
                        }
                    )
                    await self._close(1008, "input timeout")
                    return
                try:
                    await self.handle(parse_json(raw, what="message"))
                except ProtocolError as e:
                    await self.send({"error": e.code, "code": e.code, "message": e.message})
                    if not self.authorized:
                        await self._close(1008, "unauthorized")
                        return
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self._closed = True
            for ctx in list(self.contexts.values()):
                ctx.synthesis.close()
                if ctx.task is not None:
                    ctx.task.cancel()

    async def handle(self, msg: object) -> None:
        if not isinstance(msg, dict):
            raise ProtocolError("bad_request", "a message must be a JSON object")
        unknown = set(msg) - _KEYS
        if unknown:
            raise ProtocolError("bad_request", f"unknown field(s) {sorted(unknown)}")
        if not self.authorized:
            key = msg.get("xi_api_key")
            if not isinstance(key, str) or key.strip() != self.service.config.token:
                raise ProtocolError("unauthorized", "missing or wrong xi-api-key")
            self.authorized = True
        if msg.get("close_socket"):
            await self._finish_all()
            await self._close(1000, "closed by client")
            return
        cid = msg.get("context_id") if self.multi else "default"
        if self.multi and not isinstance(cid, str):
            cid = "default"
        if msg.get("close_context"):
            # no more text for it: what was sent is spoken, then isFinal (clients close a context
            # at the end of every turn, and on barge-in drop what still comes for it)
            ctx = self.contexts.get(cid)
            if ctx is not None:
                ctx.synthesis.end()
            else:
                await self.send({"isFinal": True, "contextId": cid})
            return
        text = msg.get("text")
        if text is not None and not isinstance(text, str):
            raise ProtocolError("bad_request", "text must be a string")
        ctx = self.contexts.get(cid)
        if text == "" and not msg.get("flush"):
            if not self.multi and ctx is not None:  # end of input: finish, then close the socket
                ctx.synthesis.end()
            return
        if ctx is None:
            if text is not None and not text.strip() and not msg.get("flush"):
                return  # the initialising " ": settings only
            ctx = self._open(cid)
        if text and (text.strip() or ctx.text):  # (a context's initialising " " is not text)
            if ctx.text[-1:] in (".", "!", "?") and text[:1].isupper():
                # the protocol asks for text that ends in a space; clients that send whole sentences
                # without one (Pipecat's default) would otherwise glue "today.Tomorrow" together
                text = " " + text
            ctx.synthesis.push(text)
            ctx.text += text
        if msg.get("flush"):
            ctx.synthesis.flush()

    def _open(self, cid: str) -> _Context:
        service = self.service
        synthesis = Synthesis(
            service.engine,
            self.options,
            service.runtime.admission,
            f"xi-{id(self)}",
            service.config.buffer_seconds,
            service.metrics,
        )
        ctx = self.contexts[cid] = _Context(cid, synthesis)
        ctx.task = asyncio.get_running_loop().create_task(self._pump(ctx))
        return ctx

    async def _pump(self, ctx: _Context) -> None:
        """Each chunk's audio as soon as it exists; the characters its mark covers (since the last
        mark) spread over it as its alignment."""
        encoder = output_encoder(self.output, self.service.engine.sample_rate)
        offset = 0  # characters covered by the audio sent so far
        told_ms = 0  # where the last alignment sent ends on the context's audio clock (whole ms)
        try:
            async with contextlib.aclosing(ctx.synthesis.deliver(encoder)) as deliveries:
                async for item in deliveries:
                    if isinstance(item, Audio):
                        alignment = None
                        upto = max(item.text_offset or 0, item.words[-1].end if item.words else 0)
                        if upto > offset:
                            # the spaces after the last word take the rest of the message's audio
                            while upto < len(ctx.text) and ctx.text[upto].isspace():
                                upto += 1
                            # a mark with no audio of its own (CosyVoice2's end of a segment) puts its
                            # characters at the end of the audio sent: never later than what was heard
                            end_ms = round((item.start_s + item.seconds) * 1000)
                            alignment = _alignment(
                                ctx.text, offset, upto, item.words, told_ms, max(end_ms - told_ms, 0)
                            )
                            offset, told_ms = upto, max(end_ms, told_ms)
                        if not item.frames and alignment is None:
                            continue
                        data = base64.b64encode(b"".join(item.frames)).decode() if item.frames else None
                        await self.send(
                            {
                                "audio": data,
                                "isFinal": False,
                                "contextId": ctx.id,
                                "alignment": alignment,
                                "normalizedAlignment": alignment,
                            }
                        )
                    elif isinstance(item, Finished):
                        await self.send({"isFinal": True, "contextId": ctx.id})
                        self.contexts.pop(ctx.id, None)
                        if not self.multi:
                            await self._close(1000, "done")
                        return
                    elif isinstance(item, Failed):
                        await self.send(
                            {
                                "error": item.code,
                                "code": item.code,
                                "message": item.message,
                                "contextId": ctx.id,
                            }
                        )
                        self.contexts.pop(ctx.id, None)
                        return
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            ctx.synthesis.close()

    async def _finish_all(self) -> None:
        for ctx in list(self.contexts.values()):
            ctx.synthesis.end()
        tasks = [c.task for c in self.contexts.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=60)

    async def _close(self, code: int, reason: str) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason)


def _alignment(
    text: str, begin: int, end: int, words: tuple[Word, ...], origin_ms: float, length_ms: float
) -> dict | None:
    """Characters ``begin:end`` of ``text`` timed in ms from ``origin_ms`` (where the previous
    message's alignment ended: the start of this message's audio, unless audio came without
    characters since) to ``origin_ms + length_ms`` (the end of this message's audio): a word's
    characters spread over the word's own time, the spaces and punctuation between two words over
    the gap between them, what follows the last word (or the last character) over the rest of the
    audio; with no words, everything spread evenly.  So each alignment spans exactly the audio
    since the previous one, and a client that adds up the spans (Pipecat) places every character
    where it is in the context's audio, to the millisecond."""
    if end <= begin:
        return None
    pieces: list[tuple[int, int, float, float]] = []  # (from, to, start ms, end ms), relative
    at, clock = begin, 0.0

    def rel(ms: float) -> float:
        return min(max(ms - origin_ms, clock), length_ms)

    for w in words:
        if w.end <= at:  # already told with an earlier message
            continue
        start, finish = rel(w.start_ms), rel(w.end_ms)
        if w.start > at:
            pieces.append((at, w.start, clock, start))
        pieces.append((max(at, w.start), w.end, start, finish))
        at, clock = w.end, finish
    if end > at:
        pieces.append((at, end, clock, length_ms))
    starts: list[float] = []
    for a, b, t0, t1 in pieces:
        step = (t1 - t0) / (b - a)
        starts += [t0 + k * step for k in range(b - a)]
    bounds = [round(t) for t in starts] + [round(max(starts[-1], pieces[-1][3], length_ms))]
    return {
        "chars": list(text[begin:end]),
        "charStartTimesMs": bounds[:-1],
        "charDurationsMs": [bounds[k + 1] - bounds[k] for k in range(len(starts))],
    }


async def stream_input(ws: WebSocket) -> None:
    await _serve(ws, multi=False)


async def multi_stream_input(ws: WebSocket) -> None:
    await _serve(ws, multi=True)


async def _serve(ws: WebSocket, multi: bool) -> None:
    service = service_of(ws)
    token = service.config.token
    header = ws.headers.get("xi-api-key")
    if token and header is not None and header.strip() != token:
        await ws.send_denial_response(_denial("wrong xi-api-key", 403))
        return
    if service.lifecycle.draining:
        await ws.send_denial_response(_denial("the server is shutting down", 503))
        return
    await ws.accept()
    session = ElevenLabsSession(ws, service, ws.path_params["voice_id"], multi)
    await session.run()


def _denial(message: str, status: int):
    from starlette.responses import JSONResponse

    return JSONResponse(
        {"error": {"code": "unauthorized" if status == 403 else "going_away", "message": message}},
        status_code=status,
    )


__all__ = ["ElevenLabsSession", "multi_stream_input", "output_encoder", "parse_output_format", "stream_input"]
