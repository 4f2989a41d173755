"""Wire protocol v1 of ``/v1/tts/stream`` as a pure state machine (no I/O, no asyncio).

The glue hands every frame the client sent to :meth:`Protocol.receive_text` /
:meth:`Protocol.receive_bytes` and gets back a list of events: things to do (open a context, push
text, flush, end, cancel), frames to send, or a close.  When the engine side has something to say
(audio, a mark, a flush acknowledgement, the end of a context) the glue asks the protocol for the
frame to send, so that the protocol alone decides what a client can see and in which state.

Keeping this pure is what lets the tests drive every message sequence (including hostile ones)
through it exhaustively without a server.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol as _Shape

from .audio.formats import CONTAINERS, FORMATS, default_sample_rate
from .engines.base import EngineError, SynthesisOptions, check_options
from .errors import ProtocolError
from .validation import parse_json

TRANSPORTS = ("binary", "json")
PACINGS = ("asap", "realtime")
TIMESTAMPS = ("none", "words")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one socket may send; everything a client controls is bounded."""

    max_frame_bytes: int = 4 << 20  # a start frame may carry a base64 prompt WAV
    max_text_frame_chars: int = 20_000  # one text delta
    max_context_chars: int = 100_000  # all text of one context
    max_open_contexts: int = 8  # contexts not yet done/cancelled on one socket
    max_context_id_chars: int = 128
    max_prompt_audio_bytes: int = 3 << 20  # decoded prompt WAV
    max_prompt_text_chars: int = 4_000  # prompt_text, instruct_text


@dataclass(frozen=True)
class OutputOptions:
    """Session-wide options: binary frames carry no context id, so these cannot vary per context."""

    format: str = "pcm_s16le"
    sample_rate: int | None = None  # None: the format's default (see realtime.audio)
    container: str = "raw"
    audio_transport: str = "binary"
    pacing: str = "asap"
    timestamps: str = "none"  # "words": a `words` message with the model's word timing


# option name -> (accepted JSON types, group) ; group "voice" may appear on a context's first message
_OPTION_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "voice": ((str,), "voice"),
    "mode": ((str,), "voice"),
    "prompt_text": ((str,), "voice"),
    "prompt_audio": ((str,), "voice"),
    "instruct_text": ((str,), "voice"),
    "speed": ((int, float), "voice"),
    "token_hop_len": ((int,), "voice"),
    "seed": ((int,), "voice"),
    "format": ((str,), "output"),
    "sample_rate": ((int,), "output"),
    "container": ((str,), "output"),
    "audio_transport": ((str,), "output"),
    "pacing": ((str,), "output"),
    "timestamps": ((str,), "output"),
}
_VOICE_KEYS = {k for k, (_, g) in _OPTION_TYPES.items() if g == "voice"}
_COMMON_KEYS = {"type", "context_id"}
_MESSAGE_KEYS = {
    "start": _COMMON_KEYS | set(_OPTION_TYPES),
    "text": _COMMON_KEYS | {"text"} | _VOICE_KEYS,
    "flush": _COMMON_KEYS | _VOICE_KEYS,
    "end": _COMMON_KEYS | _VOICE_KEYS,
    "cancel": _COMMON_KEYS,
}


class WordSpan(_Shape):
    """What :meth:`Protocol.words` reads of a word (``realtime.synthesis.Word`` has it)."""

    start: int
    end: int
    start_ms: float
    end_ms: float


# ---- events handed to the glue ---------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    """A frame to send as is (str → text frame, bytes → binary frame); ``error`` names the error
    code when the frame is an error report (for metrics)."""

    data: str | bytes
    error: str | None = None


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True)
class OpenContext:
    context_id: str
    options: SynthesisOptions


@dataclass(frozen=True)
class PushText:
    context_id: str
    text: str


@dataclass(frozen=True)
class FlushContext:
    context_id: str


@dataclass(frozen=True)
class EndContext:
    context_id: str


@dataclass(frozen=True)
class CancelContext:
    context_id: str


Event = Send | Close | OpenContext | PushText | FlushContext | EndContext | CancelContext


class ContextState(Enum):
    OPEN = "open"  # accepting text
    ENDED = "ended"  # end received, audio may still be coming
    CANCELLING = "cancelling"  # cancel received, waiting for the engine to let go


@dataclass
class _Context:
    id: str
    state: ContextState = ContextState.OPEN
    chars: int = 0
    seq: int = 0
    pending_flushes: int = 0
    text: list[str] = field(default_factory=list)  # its deltas, kept only for `words` messages


@dataclass
class SessionInfo:
    """What the glue knows of the engine, handed to the protocol so it can validate options."""

    native_rate: int
    default_voice: str | None
    voices: frozenset[str]
    modes: tuple[str, ...] = ("sft",)
    output_check: Callable[[OutputOptions, int], str | None] | None = None  # → error message
    engine_name: str = "engine"
    # a voice not in ``voices``: asks the engine (one registered since, e.g. by another replica)
    lookup_voice: Callable[[str], bool] | None = None

    def has_voice(self, voice: str | None) -> bool:
        return voice in self.voices or (
            voice is not None and self.lookup_voice is not None and self.lookup_voice(voice)
        )


@dataclass
class Protocol:
    """State of one socket.  ``session_id`` is the UUID all of the session's model state lives under."""

    info: SessionInfo
    limits: Limits = field(default_factory=Limits)
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self.voice_defaults = SynthesisOptions(voice=self.info.default_voice)
        self.output = OutputOptions()
        self.started = False  # `ready` sent
        self.closed = False
        self.contexts: OrderedDict[str, _Context] = OrderedDict()
        self.current: str | None = None  # context that id-less text goes to
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently finished ids (bounded)

    # ---- inbound ---------------------------------------------------------------------------
    def receive_text(self, data: str) -> list[Event]:
        if self.closed:
            return []
        try:
            if (
                len(data) > self.limits.max_frame_bytes
                or len(data.encode("utf-8", "surrogatepass")) > self.limits.max_frame_bytes
            ):
                raise ProtocolError(
                    "too_large", f"frame exceeds {self.limits.max_frame_bytes} bytes", fatal=True
                )
            msg = parse_json(data, what="frame")
            if not isinstance(msg, dict):
                raise ProtocolError("bad_request", "a message must be a JSON object")
            return self._dispatch(msg)
        except ProtocolError as e:
            return self._error_events(e)

    def receive_bytes(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        if len(data) > self.limits.max_frame_bytes:
            return self._error_events(ProtocolError("too_large", "frame too large", fatal=True))
        return self._error_events(
            ProtocolError("bad_request", "binary frames are not accepted: send JSON text frames")
        )

    def _dispatch(self, msg: dict) -> list[Event]:
        kind = msg.get("type")
        if not isinstance(kind, str) or kind not in _MESSAGE_KEYS:
            raise ProtocolError(
                "bad_request", f"unknown message type {kind!r}; expected one of {sorted(_MESSAGE_KEYS)}"
            )
        unknown = set(msg) - _MESSAGE_KEYS[kind]
        if unknown:
            raise ProtocolError("bad_request", f"unknown key(s) for {kind!r}: {sorted(unknown)}")
        cid = msg.get("context_id")
        if cid is not None and (
            not isinstance(cid, str) or not cid or len(cid) > self.limits.max_context_id_chars
        ):
            raise ProtocolError(
                "bad_request",
                f"context_id must be a non-empty string of at most {self.limits.max_context_id_chars} characters",
            )
        if kind == "start":
            return self._start(msg)
        if kind == "cancel":
            return self._cancel(cid)
        return self._context_message(kind, msg, cid)

    def _start(self, msg: dict) -> list[Event]:
        if self.started or self.contexts:
            raise ProtocolError(
                "bad_request", "start must be the first message of a session and may be sent once"
            )
        voice = self._voice_options(msg, self.voice_defaults)
        self.output = parse_output_options(msg, self.info)
        self.voice_defaults = voice
        return [self._ready()]

    def _ready(self) -> Send:
        self.started = True
        return Send(
            _json(
                {
                    "type": "ready",
                    "session_id": self.session_id,
                    "format": self.output.format,
                    "sample_rate": self.sample_rate,
                    "container": self.output.container,
                    "audio_transport": self.output.audio_transport,
                    "pacing": self.output.pacing,
                    "timestamps": self.output.timestamps,
                    "voice": self.voice_defaults.voice,
                    "engine": self.info.engine_name,
                }
            )
        )

    @property
    def sample_rate(self) -> int:
        if self.output.sample_rate is not None:
            return self.output.sample_rate
        return default_sample_rate(self.output.format, self.info.native_rate)

    def _voice_options(self, msg: dict, base: SynthesisOptions) -> SynthesisOptions:
        return parse_voice_options(msg, base, self.info, self.limits)

    def _context_message(self, kind: str, msg: dict, cid: str | None) -> list[Event]:
        events: list[Event] = []
        text = msg.get("text")
        if kind == "text":
            if not isinstance(text, str):
                raise ProtocolError("bad_request", "text must be a string", cid)
            if len(text) > self.limits.max_text_frame_chars:
                raise ProtocolError(
                    "too_large",
                    f"a text delta may hold at most {self.limits.max_text_frame_chars} characters",
                    cid,
                )
        explicit = cid is not None
        if cid is None:
            cid = self.current if self.current in self.contexts else None
        ctx = self.contexts.get(cid) if cid is not None else None
        if ctx is None:
            if kind != "text" and not explicit:
                raise ProtocolError("bad_request", f"no open context to {kind}: send text first")
            if cid is not None and cid in self._finished:
                raise ProtocolError("bad_request", f"context {cid!r} is finished; use a new context_id", cid)
            if len(self.contexts) >= self.limits.max_open_contexts:
                raise ProtocolError(
                    "overloaded",
                    f"at most {self.limits.max_open_contexts} contexts may be open on one socket",
                    cid,
                )
            try:
                options = self._voice_options(msg, self.voice_defaults)
            except ProtocolError as e:
                if not explicit:  # no context exists: the session is as it was
                    raise
                # the client's context is refused: the error names it, and the id is spent
                self._finish(cid)
                raise ProtocolError(e.code, e.message, cid, e.fatal, e.retry_after_ms) from None
            if not self.started:
                events.append(self._ready())
            cid = cid or str(uuid.uuid4())
            ctx = self.contexts[cid] = _Context(cid)
            events.append(OpenContext(cid, options))
        else:
            if _VOICE_KEYS & set(msg):
                raise ProtocolError(
                    "bad_request", "voice options may only be set on a context's first message", cid
                )
            if ctx.state is not ContextState.OPEN:
                raise ProtocolError("bad_request", f"context {cid!r} has ended; no more {kind} for it", cid)
        self.current = cid
        if kind == "text":
            assert isinstance(text, str)
            if ctx.chars + len(text) > self.limits.max_context_chars:
                raise ProtocolError(
                    "too_large", f"a context may hold at most {self.limits.max_context_chars} characters", cid
                )
            ctx.chars += len(text)
            if text:
                if self.output.timestamps == "words":
                    ctx.text.append(text)
                events.append(PushText(cid, text))
        elif kind == "flush":
            ctx.pending_flushes += 1
            events.append(FlushContext(cid))
        elif kind == "end":
            ctx.state = ContextState.ENDED
            self.current = None
            events.append(EndContext(cid))
        return events

    def _cancel(self, cid: str | None) -> list[Event]:
        if cid is None:  # barge-in: stop everything this socket has going
            targets = [c for c in self.contexts.values() if c.state is not ContextState.CANCELLING]
        elif cid in self.contexts:
            targets = [self.contexts[cid]] if self.contexts[cid].state is not ContextState.CANCELLING else []
        elif cid in self._finished:
            return []  # raced with done/cancelled: nothing left to stop
        else:
            raise ProtocolError("bad_request", f"unknown context {cid!r}", cid)
        for ctx in targets:
            ctx.state = ContextState.CANCELLING
            if self.current == ctx.id:
                self.current = None
        return [CancelContext(c.id) for c in targets]

    def _error_events(self, e: ProtocolError) -> list[Event]:
        events: list[Event] = [
            Send(self.error_frame(e.code, e.message, e.fatal, e.context_id, e.retry_after_ms), e.code)
        ]
        if e.fatal:
            self.closed = True
            events.append(Close(e.close_code, e.message[:120]))
        return events

    # ---- outbound ----------------------------------------------------------------------------
    def audio(self, context_id: str, data: bytes) -> str | bytes | None:
        """The frame that carries ``data`` for ``context_id``; None once the context is cancelling."""
        ctx = self.contexts.get(context_id)
        if ctx is None or ctx.state is ContextState.CANCELLING:
            return None
        ctx.seq += 1
        if self.output.audio_transport == "binary":
            return data
        return _json(
            {
                "type": "audio",
                "context_id": context_id,
                "seq": ctx.seq,
                "data": base64.b64encode(data).decode("ascii"),
            }
        )

    def mark(self, context_id: str, text_offset: int, audio_ms: float) -> str | None:
        ctx = self.contexts.get(context_id)
        if ctx is None or ctx.state is ContextState.CANCELLING:
            return None
        return _json(
            {
                "type": "mark",
                "context_id": context_id,
                "text_offset": text_offset,
                "audio_ms": floor_ms(audio_ms),
            }
        )

    def words(self, context_id: str, words: Sequence[WordSpan]) -> str | None:
        """The ``words`` message for words the context's audio sent so far holds (each a raw-text
        range and its times); None when the session asked for no timestamps or the context is
        being cancelled."""
        ctx = self.contexts.get(context_id)
        if self.output.timestamps != "words" or ctx is None or ctx.state is ContextState.CANCELLING:
            return None
        if not words:
            return None
        if len(ctx.text) > 1:
            ctx.text[:] = ["".join(ctx.text)]
        text = ctx.text[0] if ctx.text else ""
        return _json(
            {
                "type": "words",
                "context_id": context_id,
                "words": [
                    {
                        "word": text[w.start : w.end],
                        "start": w.start,
                        "end": w.end,
                        "start_ms": floor_ms(w.start_ms),
                        "end_ms": floor_ms(w.end_ms),
                    }
                    for w in words
                ],
            }
        )

    def flushed(self, context_id: str) -> str | None:
        ctx = self.contexts.get(context_id)
        if ctx is None or ctx.state is ContextState.CANCELLING or ctx.pending_flushes == 0:
            return None
        ctx.pending_flushes -= 1
        return _json({"type": "flushed", "context_id": context_id})

    def done(self, context_id: str, stats: dict) -> str | None:
        ctx = self.contexts.get(context_id)
        if ctx is None or ctx.state is ContextState.CANCELLING:
            return None
        self._finish(context_id)
        return _json({"type": "done", "context_id": context_id, "stats": stats})

    def cancelled(self, context_id: str) -> str | None:
        if context_id not in self.contexts:
            return None
        self._finish(context_id)
        return _json({"type": "cancelled", "context_id": context_id})

    def failed(
        self,
        context_id: str,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        extra: dict[str, object] | None = None,
    ) -> str | None:
        """The service gave up on a context (no capacity, no text for too long, unknown voice found
        late, model error, nothing the voice can say): report it and finish the context."""
        if context_id not in self.contexts:
            return None
        self._finish(context_id)
        return self.error_frame(code, message, False, context_id, retry_after_ms, extra)

    def warning(self, context_id: str, code: str, message: str, extra: dict[str, object]) -> str | None:
        """Something about a context the client should know that does not end it (text the voice
        cannot say was skipped)."""
        ctx = self.contexts.get(context_id)
        if ctx is None or ctx.state is ContextState.CANCELLING:
            return None
        return _json({"type": "warning", "code": code, "context_id": context_id, "message": message, **extra})

    def _finish(self, context_id: str) -> None:
        self.contexts.pop(context_id, None)
        if self.current == context_id:
            self.current = None
        self._finished[context_id] = None
        while len(self._finished) > 256:
            self._finished.popitem(last=False)

    @staticmethod
    def error_frame(
        code: str,
        message: str,
        fatal: bool = False,
        context_id: str | None = None,
        retry_after_ms: int | None = None,
        extra: dict[str, object] | None = None,
    ) -> str:
        body: dict[str, object] = {"type": "error", "code": code, "message": message, "fatal": fatal}
        if context_id is not None:
            body["context_id"] = context_id
        if retry_after_ms is not None:
            body["retry_after_ms"] = retry_after_ms
        return _json({**body, **(extra or {})})

    def open_contexts(self) -> list[str]:
        return list(self.contexts)


def floor_ms(ms: float) -> float:
    """A time told to the client, to 0.1 ms and rounded down: never later than the audio it is on."""
    return math.floor(ms * 10) / 10


def parse_voice_options(
    msg: dict, base: SynthesisOptions, info: SessionInfo, limits: Limits
) -> SynthesisOptions:
    """Validate the voice options in ``msg`` on top of ``base``; raises :class:`ProtocolError`."""
    changes: dict[str, object] = {}
    for key in _VOICE_KEYS & set(msg):
        value = msg[key]
        _check_type(key, value, limits.max_prompt_text_chars)
        changes[key] = value
    if "speed" in changes:
        changes["speed"] = float(changes["speed"])  # JSON's 1 is the engine's 1.0
    opts = replace(base, **changes)
    if "prompt_audio" in changes:
        raw = changes["prompt_audio"]
        assert isinstance(raw, str)
        if len(raw) > limits.max_prompt_audio_bytes * 4 // 3 + 4:
            raise ProtocolError("too_large", "prompt_audio is too large")
        try:
            audio = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_request", "prompt_audio must be base64 (a WAV file)") from None
        opts = replace(opts, prompt_audio=audio)
    try:
        check_options(opts, info.modes, info.has_voice, info.engine_name)
    except EngineError as e:
        raise ProtocolError(e.code, e.message) from None
    return opts


def parse_output_options(msg: dict, info: SessionInfo) -> OutputOptions:
    """Validate the output options in ``msg`` (format, rate, container, transport, pacing,
    timestamps)."""
    out = OutputOptions()
    for key in ("format", "sample_rate", "container", "audio_transport", "pacing", "timestamps"):
        if key in msg:
            _check_type(key, msg[key])
            out = replace(out, **{key: msg[key]})
    if out.format not in FORMATS:
        raise ProtocolError("bad_request", f"format must be one of {list(FORMATS)}")
    if out.audio_transport not in TRANSPORTS:
        raise ProtocolError("bad_request", f"audio_transport must be one of {list(TRANSPORTS)}")
    if out.pacing not in PACINGS:
        raise ProtocolError("bad_request", f"pacing must be one of {list(PACINGS)}")
    if out.timestamps not in TIMESTAMPS:
        raise ProtocolError("bad_request", f"timestamps must be one of {list(TIMESTAMPS)}")
    if out.container not in CONTAINERS[out.format]:
        raise ProtocolError(
            "bad_request", f"container for {out.format} must be one of {list(CONTAINERS[out.format])}"
        )
    if info.output_check is not None:
        problem = info.output_check(out, info.native_rate)
        if problem:
            raise ProtocolError("bad_request", problem)
    return out


_NAME_CHARS = 128  # a voice, mode, format, container, transport or pacing name
_FREE_TEXT = {"prompt_text", "instruct_text"}


def _check_type(key: str, value: object, max_text_chars: int = _NAME_CHARS) -> None:
    types, _ = _OPTION_TYPES[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = "number" if float in types else {"str": "string", "int": "integer"}[types[0].__name__]
        raise ProtocolError("bad_request", f"{key} must be a {names}")
    if isinstance(value, str) and key != "prompt_audio":  # the prompt's size is checked decoded
        limit = max_text_chars if key in _FREE_TEXT else _NAME_CHARS
        if len(value) > limit:
            raise ProtocolError("bad_request", f"{key} may hold at most {limit} characters")


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
