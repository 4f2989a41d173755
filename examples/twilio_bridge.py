"""A Twilio Media Streams bridge: phone calls on one side, our ``/v1/tts/stream`` on the other.

Run it as its own process next to the service::

    python examples/twilio_bridge.py --service ws://127.0.0.1:8000 --port 8080

and point a Twilio number's voice webhook at ``https://BRIDGE/twiml`` (or answer with your own
``<Connect><Stream url="wss://BRIDGE/twilio/media-stream"/></Connect>``).  Why a separate program
and not a route of the service: it is a *client* of our public protocol, the way any telephony
integration would be (``format: "mulaw"``, ``sample_rate: 8000``, ``pacing: "realtime"``, marks,
``cancel``), so the service keeps one synthesis path and the bridge scales and restarts on its own.

Per call (one Twilio WebSocket) the bridge holds one socket to the service; every *turn* (one answer
of the voice agent) is one context on it.  The agent pushes its LLM's text deltas for a call and
interrupts it over a small HTTP control channel (or in process, through :class:`Call`):

- ``POST /calls/{call_sid}/say`` ``{"text": "...", "end": false, "turn_id": optional}``: append
  text to the call's current turn (a new one if none is open); ``end: true`` closes the turn.
- ``POST /calls/{call_sid}/barge_in``: the caller spoke.  Twilio gets ``clear`` (its buffered
  audio is dropped), the service gets ``cancel``; the answer says what the caller actually heard.
- ``GET /calls/{call_sid}``: the call's turns, what was heard of each, frames it ignored.

Audio: the service paces μ-law 8 kHz at playback rate (300 ms ahead), the bridge cuts it into
20 ms ``media`` messages (160 bytes) and forwards each as it comes, so Twilio holds well under half
a second and ``clear`` drops at most that.  After the audio that ends each word (the service's
``words`` messages, asked for with ``timestamps: "words"``; a service without them gives clause
``mark``s only) the bridge sends Twilio a ``mark`` named ``TURN:OFFSET`` (and ``TURN:end`` after a
turn's last audio); Twilio echoes a mark once the caller has heard the audio before it, so the
last echoed mark of a turn is how much of its text the caller heard, to the word.  That is frozen
at barge-in: the marks Twilio returns after a ``clear`` name audio that was dropped, not heard.

Bad input from Twilio never ends in a stack trace: an unreadable frame, a frame of an unknown
event, media before ``start`` are logged with a code and ignored (counted per call); a ``start``
without the ids the stream needs (or with another media format) closes the socket with 1008, and
a service that cannot be reached closes it with 1011.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from realtime.auth import check_token
from realtime.errors import ProtocolError
from realtime.integrations.client import HandshakeError, auth_headers, handshake, stream_url
from realtime.routes.synthesis import read_body
from realtime.service import error_response
from realtime.validation import parse_json

log = logging.getLogger("twilio_bridge")

FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz: what Twilio plays per media message
MULAW_SILENCE = 0xFF  # pads a turn's last frame to 20 ms
CONTROL_BODY_LIMIT = 256 * 1024
SERVICE_READY_TIMEOUT = 10.0
CANCEL_TIMEOUT = 5.0  # how long barge-in waits for the service to confirm the cancel


class BadFrame(Exception):
    """A Twilio frame the bridge cannot use; ``code`` is what the log and the counters say."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


# event -> the fields it must carry, as (object key, field, type); a message without them is
# ignored, except `start`, without which the stream cannot be addressed at all
_TWILIO_FIELDS: dict[str, tuple[tuple[str, str, type], ...]] = {
    "connected": (),
    "start": (("start", "streamSid", str), ("start", "callSid", str)),
    "media": (("media", "payload", str),),
    "mark": (("mark", "name", str),),
    "dtmf": (("dtmf", "digit", str),),
    "stop": (),
}


def parse_twilio_frame(raw: str) -> dict:
    """One Twilio message, checked against :data:`_TWILIO_FIELDS`; raises :class:`BadFrame`."""
    try:
        msg = parse_json(raw, what="Twilio frame")
    except ProtocolError as e:
        raise BadFrame("bad_json", e.message) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise BadFrame("bad_frame", "a Twilio frame is a JSON object with a string 'event'")
    event = msg["event"]
    if event not in _TWILIO_FIELDS:
        raise BadFrame("unknown_event", f"unknown Twilio event {event[:40]!r}")
    for obj, name, kind in _TWILIO_FIELDS[event]:
        value = msg.get(obj)
        if not isinstance(value, dict) or not isinstance(value.get(name), kind) or not value[name]:
            raise BadFrame("bad_frame", f"{event} without {obj}.{name}", fatal=event == "start")
    if event == "start":
        fmt = msg["start"].get("mediaFormat")
        if isinstance(fmt, dict) and (
            fmt.get("encoding", "audio/x-mulaw") != "audio/x-mulaw" or fmt.get("sampleRate", 8000) != 8000
        ):
            raise BadFrame("bad_frame", f"unsupported mediaFormat {fmt}", fatal=True)
    return msg


class BridgeError(Exception):
    """A control request refused: an HTTP status and a typed JSON error."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Heard:
    """What the caller heard of a turn: its text up to ``text_offset``, ``audio_ms`` into its audio."""

    turn_id: str | None
    text: str = ""
    text_offset: int = 0
    audio_ms: float = 0.0

    def body(self) -> dict:
        return {
            "turn_id": self.turn_id,
            "heard": self.text,
            "text_offset": self.text_offset,
            "audio_ms": self.audio_ms,
        }


@dataclass
class Turn:
    """One answer of the agent: one context of the call's service socket."""

    id: str
    text: str = ""
    state: str = "open"  # open → ended → spoken → played; or interrupted / failed
    in_service: bool = False  # the service has a context for it (it got text)
    heard_offset: int = 0
    heard_ms: float = 0.0
    audio_ms: float | None = None  # the service's `done` stats
    frames: int = 0  # media messages sent to Twilio
    first_text_at: float | None = None
    first_audio_ms: float | None = None  # first text → first media message sent
    error: str | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # done / cancelled / error

    @property
    def audible(self) -> bool:
        """Twilio may still be playing (or about to play) it."""
        return self.state in ("open", "ended", "spoken")

    def info(self) -> dict:
        return {
            "turn_id": self.id,
            "state": self.state,
            "text": self.text,
            "heard": self.text[: self.heard_offset],
            "heard_audio_ms": self.heard_ms,
            "audio_ms": self.audio_ms,
            "frames": self.frames,
            "first_audio_ms": self.first_audio_ms,
            "error": self.error,
        }


class Call:
    """One Twilio stream and its service socket.  The agent's side: :meth:`say`, :meth:`barge_in`."""

    def __init__(
        self, twilio: WebSocket, start: dict, service: ClientConnection, ignored: Counter, word_marks: bool
    ) -> None:
        info = start["start"]
        self.call_sid: str = info["callSid"]
        self.stream_sid: str = info["streamSid"]
        params = info.get("customParameters")
        self.custom_parameters: dict = params if isinstance(params, dict) else {}
        self.twilio = twilio
        self.service = service
        self.ignored = ignored  # Twilio frames ignored, by code
        self.word_marks = word_marks  # a mark per word (the service sends `words`), else per clause
        self.turns: dict[str, Turn] = {}
        self.current: Turn | None = None  # the turn text goes to
        self._speaking: list[Turn] = []  # turns with a service context not yet over, oldest first
        self._marks: dict[str, tuple[Turn, int, float]] = {}  # mark name -> (turn, offset, audio_ms)
        self._held = bytearray()  # audio short of a whole 20 ms frame
        self._held_marks: list[str] = []  # marks that go after the frame that completes _held
        self._twilio_lock = asyncio.Lock()  # one writer at a time, and clear vs media decided inside it
        self._service_lock = asyncio.Lock()
        self._turn_count = 0
        self.closed = False
        self.reader = asyncio.get_running_loop().create_task(self._read_service())

    # -- the agent's side ----------------------------------------------------------------------
    async def say(self, text: str, end: bool = False, turn_id: str | None = None) -> Turn:
        """Append ``text`` to the current turn (or ``turn_id``'s), opening it if needed."""
        if self.closed:
            raise BridgeError("conflict", "the call has ended", 409)
        if self.reader.done():
            raise BridgeError("internal", "the TTS service connection is gone", 502)
        turn = self.turns.get(turn_id) if turn_id is not None else self.current
        if turn is None or (turn_id is None and turn.state != "open"):
            turn = Turn(turn_id or self._next_turn_id())
            self.turns[turn.id] = self.current = turn
        if turn.state != "open":
            raise BridgeError("conflict", f"turn {turn.id!r} is {turn.state}; start a new one", 409)
        if text:
            if turn.first_text_at is None:
                turn.first_text_at = time.perf_counter()
            if not turn.in_service:
                turn.in_service = True
                self._speaking.append(turn)
            turn.text += text
            await self._to_service({"type": "text", "context_id": turn.id, "text": text})
        if end:
            turn.state = "ended"
            if turn.in_service:
                await self._to_service({"type": "end", "context_id": turn.id})
            else:  # nothing to speak
                turn.state = "played"
                turn.finished.set()
            if self.current is turn:
                self.current = None
        return turn

    def _next_turn_id(self) -> str:
        while True:
            self._turn_count += 1
            if f"turn-{self._turn_count}" not in self.turns:
                return f"turn-{self._turn_count}"

    async def barge_in(self) -> Heard:
        """The caller interrupted: Twilio drops what it buffered, the service stops, and the
        answer is what the caller heard of the turn they interrupted."""
        audible = [t for t in self.turns.values() if t.audible]
        if not audible:
            return Heard(None)
        heard_turn = audible[0]
        for t in audible:
            t.state = "interrupted"
        self._held.clear()
        self._held_marks.clear()
        self.current = None
        t = heard_turn
        heard = Heard(t.id, t.text[: t.heard_offset], t.heard_offset, t.heard_ms)
        await self._to_twilio({"event": "clear", "streamSid": self.stream_sid})
        waiting = [t for t in audible if t.in_service and not t.finished.is_set()]
        if waiting and not self.closed:
            await self._to_service({"type": "cancel"})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    for t in waiting:
                        await t.finished.wait()
        return heard

    def info(self) -> dict:
        return {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "custom_parameters": self.custom_parameters,
            "closed": self.closed,
            "service_connected": not self.reader.done(),
            "word_marks": self.word_marks,
            "turns": [t.info() for t in self.turns.values()],
            "ignored_frames": dict(self.ignored),
        }

    # -- Twilio's side -------------------------------------------------------------------------
    def echoed(self, name: str) -> None:
        """Twilio played everything before mark ``name``."""
        found = self._marks.pop(name, None)
        if found is None:
            self.ignored["unknown_mark"] += 1
            log.warning("twilio frame ignored: unknown_mark (%s)", name[:80])
            return
        turn, offset, audio_ms = found
        if turn.state == "interrupted":  # returned by a clear: dropped, not heard
            return
        turn.heard_offset = max(turn.heard_offset, offset)
        turn.heard_ms = max(turn.heard_ms, audio_ms)
        if name.endswith(":end") and turn.state == "spoken":
            turn.state = "played"

    async def close(self) -> None:
        """The call is over: stop every turn at the service and close its socket."""
        if self.closed:
            return
        self.closed = True
        for t in self.turns.values():
            if t.audible:
                t.state = "interrupted" if t.in_service else "played"
        with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
            async with asyncio.timeout(CANCEL_TIMEOUT):
                if any(t.in_service and not t.finished.is_set() for t in self.turns.values()):
                    await self.service.send(json.dumps({"type": "cancel"}))
                await self.service.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader

    # -- the service's side --------------------------------------------------------------------
    async def _to_service(self, msg: dict) -> None:
        try:
            async with self._service_lock:
                await self.service.send(json.dumps(msg))
        except (ConnectionClosed, OSError):
            raise BridgeError("internal", "the TTS service connection is gone", 502) from None

    async def _to_twilio(self, msg: dict, turn: Turn | None = None) -> None:
        """Send to Twilio, unless ``turn`` was interrupted meanwhile (decided under the lock, so
        nothing of an interrupted turn can follow its ``clear``)."""
        async with self._twilio_lock:
            if turn is not None and turn.state == "interrupted":
                return
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.twilio.send_text(json.dumps(msg, separators=(",", ":")))

    async def _read_service(self) -> None:
        try:
            async for msg in self.service:
                if isinstance(msg, bytes):
                    await self._audio(msg)
                else:
                    await self._event(json.loads(msg))
        except (ConnectionClosed, OSError):
            pass
        finally:
            if not self.closed:
                log.warning("call %s: the TTS service closed the connection", self.call_sid)
            for t in self._speaking:
                if t.audible and not self.closed:
                    t.state, t.error = "failed", "service connection closed"
                t.finished.set()
            self._speaking.clear()

    async def _audio(self, data: bytes) -> None:
        """A binary frame belongs to the oldest context not yet done or cancelled."""
        turn = self._speaking[0] if self._speaking else None
        if turn is None or turn.state == "interrupted":
            return
        self._held += data
        while len(self._held) >= FRAME_BYTES:
            frame = bytes(self._held[:FRAME_BYTES])
            del self._held[:FRAME_BYTES]
            await self._media(turn, frame)
            marks, self._held_marks = self._held_marks, []
            for name in marks:
                await self._mark(turn, name)

    async def _media(self, turn: Turn, frame: bytes) -> None:
        if turn.first_audio_ms is None and turn.first_text_at is not None:
            turn.first_audio_ms = round((time.perf_counter() - turn.first_text_at) * 1000, 1)
        payload = base64.b64encode(frame).decode()
        await self._to_twilio(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}, turn
        )
        if turn.state != "interrupted":
            turn.frames += 1

    async def _mark(self, turn: Turn, name: str) -> None:
        await self._to_twilio({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}, turn)

    async def _event(self, m: dict) -> None:
        kind, turn = m.get("type"), self.turns.get(m.get("context_id", ""))
        if kind == "error" and turn is None:
            log.warning("call %s: service error %s: %s", self.call_sid, m.get("code"), m.get("message"))
            return
        if turn is None:
            return  # ready, or an acknowledgement of a turn the bridge has forgotten
        if kind == "mark":
            await self._position(turn, int(m["text_offset"]), float(m["audio_ms"]))
        elif kind == "words":  # each word's end, as a mark of its own: heard text to the word
            for w in m.get("words", []):
                await self._position(turn, int(w["end"]), float(w["end_ms"]))
        elif kind in ("done", "cancelled", "error"):
            if kind == "done" and turn.state == "ended":
                turn.state = "spoken"
                turn.audio_ms = m.get("stats", {}).get("audio_ms")
            elif kind == "error":
                log.warning("call %s turn %s: service error %s", self.call_sid, turn.id, m.get("code"))
                if turn.audible:
                    turn.state, turn.error = "failed", m.get("code")
            if turn.state != "interrupted":
                await self._finish_audio(turn)
            if turn in self._speaking:
                self._speaking.remove(turn)
            turn.finished.set()

    async def _position(self, turn: Turn, offset: int, audio_ms: float) -> None:
        """The text up to ``offset`` is in the audio sent: a Twilio mark ``TURN:OFFSET`` after it."""
        name = f"{turn.id}:{offset}"
        if turn.state == "interrupted" or name in self._marks:
            return
        self._marks[name] = (turn, offset, audio_ms)
        if self._held:  # its audio ends inside the frame not yet complete: after that frame
            self._held_marks.append(name)
        else:
            await self._mark(turn, name)

    async def _finish_audio(self, turn: Turn) -> None:
        """The turn's last audio: its partial frame padded to 20 ms, its marks, then ``TURN:end``."""
        if self._held:
            frame = bytes(self._held) + bytes([MULAW_SILENCE]) * (FRAME_BYTES - len(self._held))
            self._held.clear()
            await self._media(turn, frame)
        marks, self._held_marks = self._held_marks, []
        for name in marks:
            await self._mark(turn, name)
        end = f"{turn.id}:end"
        self._marks[end] = (turn, len(turn.text), turn.audio_ms or 0.0)
        await self._mark(turn, end)


OnCall = Callable[[Call], Awaitable[None]]
OnMedia = Callable[[Call, bytes], None]


class TwilioBridge:
    """The bridge's ASGI app (:attr:`app`) and its calls, by call SID.

    ``on_call`` (async) runs when a call's stream starts, for an agent that lives in this process;
    ``on_media`` gets the caller's μ-law audio (for speech recognition), ``on_dtmf`` the keys.
    """

    def __init__(
        self,
        service_url: str,
        service_token: str | None = None,
        control_token: str | None = None,
        voice: str | None = None,
        on_call: OnCall | None = None,
        on_media: OnMedia | None = None,
        on_dtmf: Callable[[Call, str], None] | None = None,
    ) -> None:
        self.service_url = stream_url(service_url)
        self.service_token = service_token
        self.control_token = control_token
        self.voice = voice
        self.on_call, self.on_media, self.on_dtmf = on_call, on_media, on_dtmf
        self.calls: dict[str, Call] = {}
        self._hooks: set[asyncio.Task] = set()  # on_call tasks (held: the loop keeps weak references)
        self.app = Starlette(
            routes=[
                WebSocketRoute("/twilio/media-stream", self.media_stream),
                Route("/twiml", self.twiml, methods=["GET", "POST"]),
                Route("/calls/{call_sid}", self.call_info, methods=["GET"]),
                Route("/calls/{call_sid}/say", self.say, methods=["POST"]),
                Route("/calls/{call_sid}/barge_in", self.barge_in, methods=["POST"]),
            ]
        )

    # -- Twilio ---------------------------------------------------------------------------------
    async def media_stream(self, ws: WebSocket) -> None:
        await ws.accept()
        ignored: Counter = Counter()
        call: Call | None = None
        close = (1000, "stream stopped")
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    close = None
                    break
                try:
                    if msg.get("text") is None:
                        raise BadFrame("binary_frame", "Twilio sends JSON text frames only")
                    event = parse_twilio_frame(msg["text"])
                    kind = event["event"]
                    if kind == "stop":
                        break
                    if kind == "start":
                        if call is not None:
                            raise BadFrame("repeated_start", "a stream starts once")
                        call = await self._start(ws, event, ignored)
                        if call is None:
                            close = (1011, "TTS service unavailable")
                            break
                    elif kind != "connected" and call is None:
                        raise BadFrame("before_start", f"{kind} before start")
                    elif call is not None:
                        self._handle(call, kind, event)
                except BadFrame as e:
                    ignored[e.code] += 1
                    log.warning(
                        "twilio frame %s: %s (%s)", "refused" if e.fatal else "ignored", e.code, e.message
                    )
                    if e.fatal:
                        close = (1008, e.message[:120])
                        break
        except WebSocketDisconnect:
            close = None
        finally:
            if call is not None:
                await call.close()
                self.calls.pop(call.call_sid, None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await ws.close(*close)

    def _handle(self, call: Call, kind: str, event: dict) -> None:
        if kind == "media":
            try:
                audio = base64.b64decode(event["media"]["payload"], validate=True)
            except (binascii.Error, ValueError):
                raise BadFrame("bad_payload", "media payload is not base64") from None
            if self.on_media is not None and event["media"].get("track", "inbound") == "inbound":
                _hook(self.on_media, call, audio)
        elif kind == "mark":
            call.echoed(event["mark"]["name"])
        elif kind == "dtmf" and self.on_dtmf is not None:
            _hook(self.on_dtmf, call, event["dtmf"]["digit"])

    async def _start(self, ws: WebSocket, event: dict, ignored: Counter) -> Call | None:
        """Open the call's service socket; None (logged) if the service cannot be had."""
        # word times when the service has them (a mark per word: heard text to the word), its
        # clause marks otherwise (an older service refuses `timestamps`; handshake drops it)
        start = {"type": "start", "format": "mulaw", "sample_rate": 8000, "pacing": "realtime"}
        start["timestamps"] = "words"
        if self.voice:
            start["voice"] = self.voice
        try:
            service = await connect(
                self.service_url,
                additional_headers=auth_headers(self.service_token),
                open_timeout=SERVICE_READY_TIMEOUT,
            )
        except (OSError, InvalidHandshake, TimeoutError) as e:
            log.error("call %s: cannot reach the TTS service: %s", event["start"]["callSid"], e)
            return None
        try:
            async with asyncio.timeout(SERVICE_READY_TIMEOUT):
                ready = await handshake(service.send, service.recv, start, optional=("timestamps",))
        except (ConnectionClosed, OSError, TimeoutError, HandshakeError) as e:
            log.error("call %s: the TTS service refused the session: %s", event["start"]["callSid"], e)
            await service.close()
            return None
        call = Call(ws, event, service, ignored, word_marks=ready.words)
        old = self.calls.get(call.call_sid)
        if old is not None:  # Twilio reconnected the stream: the old one is over
            await old.close()
        self.calls[call.call_sid] = call
        if self.on_call is not None:
            task = asyncio.get_running_loop().create_task(self.on_call(call))
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)
        return call

    async def twiml(self, request: Request) -> Response:
        """The TwiML a Twilio number's voice webhook answers with: a bidirectional stream here."""
        proto = request.headers.get("x-forwarded-proto", request.url.scheme)  # behind a TLS proxy
        scheme = "wss" if proto in ("https", "wss") else "ws"
        host = request.headers.get("x-forwarded-host") or request.url.netloc
        url = f"{scheme}://{host}/twilio/media-stream"
        xml = f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={quoteattr(url)}/></Connect></Response>'
        return Response(xml, media_type="application/xml")

    # -- the control channel ----------------------------------------------------------------------
    def _call(self, request: Request) -> Call:
        problem = check_token(self.control_token, request.headers, request.query_params)
        if problem:
            raise BridgeError(
                "unauthorized", f"{problem} control token", 401 if problem == "missing" else 403
            )
        call = self.calls.get(request.path_params["call_sid"])
        if call is None:
            raise BridgeError("not_found", f"no call {request.path_params['call_sid'][:64]!r}")
        return call

    async def call_info(self, request: Request) -> Response:
        try:
            return JSONResponse(self._call(request).info())
        except BridgeError as e:
            return error_response(e.code, e.message, e.status)

    async def say(self, request: Request) -> Response:
        try:
            call = self._call(request)
            body = await _json_body(request, {"text", "end", "turn_id"})
            text, end, turn_id = body.get("text", ""), body.get("end", False), body.get("turn_id")
            if not isinstance(text, str) or not isinstance(end, bool):
                raise BridgeError("bad_request", "text must be a string and end a boolean")
            if turn_id is not None and (
                not isinstance(turn_id, str) or not 1 <= len(turn_id) <= 128 or ":" in turn_id
            ):
                raise BridgeError("bad_request", "turn_id must be 1-128 characters without ':'")
            turn = await call.say(text, end, turn_id)
            return JSONResponse({"turn_id": turn.id, "state": turn.state}, status_code=202)
        except BridgeError as e:
            return error_response(e.code, e.message, e.status)

    async def barge_in(self, request: Request) -> Response:
        try:
            call = self._call(request)
            await _json_body(request, set())  # none or {}: nothing to say
            heard = await call.barge_in()
            return JSONResponse({"interrupted": heard.turn_id is not None, **heard.body()})
        except BridgeError as e:
            return error_response(e.code, e.message, e.status)


def _hook(hook: Callable, *args: object) -> None:
    """Run an agent's hook; if it raises, its traceback is logged (the agent's bug, not Twilio's)
    and the call goes on."""
    try:
        hook(*args)
    except Exception:
        log.exception("the %s hook failed; the call goes on", getattr(hook, "__name__", "agent"))


async def _json_body(request: Request, allowed: set[str]) -> dict:
    """A control request's JSON object (an empty body is ``{}``), bounded and validated."""
    try:
        raw = await read_body(request, CONTROL_BODY_LIMIT, 10.0)
        body = parse_json(raw, what="body") if raw.strip() else {}
    except ProtocolError as e:
        raise BridgeError(e.code, e.message) from None
    if not isinstance(body, dict):
        raise BridgeError("bad_request", "the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise BridgeError("bad_request", f"unknown key(s): {sorted(unknown)}")
    return body


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Twilio Media Streams ↔ cosyvoice-realtime bridge")
    p.add_argument(
        "--service", default="ws://127.0.0.1:8000", help="the TTS service (ws:// or http:// base URL)"
    )
    p.add_argument("--token", default=None, help="the service's API token")
    p.add_argument("--control-token", default=None, help="a token the control channel requires (Bearer)")
    p.add_argument("--voice", default=None, help="a voice of the service (default: its default voice)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bridge = TwilioBridge(args.service, args.token, args.control_token, args.voice)
    uvicorn.run(bridge.app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
