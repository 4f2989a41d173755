"""The client side of our WebSocket protocol (docs/protocol.md) that the framework integrations
and the Twilio bridge (examples/twilio_bridge.py) share, with no framework imported: where to connect and how to authenticate, the ``start``/``ready`` handshake
(and what to do when a server is older than the options we ask for), the voice options a context
opens with, and turning ``words`` or ``mark`` messages into timed words.

Both integrations keep one socket per service and speak one context per turn on it, with
``audio_transport: "json"`` so every audio chunk names its context: that is what lets an
interrupted turn be cancelled (and its late audio dropped) without touching the next turn."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

STREAM_PATH = "/v1/tts/stream"

# Options a server may not know yet, in the order they are given up: each is dropped only when a
# `bad_request` answer to `start` names it, and the handshake is tried again without it.
#  - timestamps: word times from `words` messages (newer servers); without it, from `mark`s.
#  - sample_rate: an output rate the server does not encode; without it the server's native rate
#    arrives and the integration resamples.
OPTIONAL_START_KEYS = ("timestamps", "sample_rate")

_WORD = re.compile(r"\S+")


class HandshakeError(RuntimeError):
    """The server answered ``start`` with an error we cannot work around (a wrong voice, a refused
    format): ``code`` and ``message`` are the server's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether trying again later can help (a full server), or not (a bad option)."""
        return self.code in ("overloaded", "internal", "timeout")

    @property
    def status(self) -> int:
        """The HTTP status of the code (docs/protocol.md, "Errors and close codes")."""
        return {"unauthorized": 401, "unknown_voice": 404, "overloaded": 503, "internal": 500}.get(
            self.code, 400
        )


def stream_url(url: str) -> str:
    """The WebSocket address of the stream endpoint for ``url``: a server's base address
    (``http://host:8000``, ``ws://host:8000``) or the endpoint itself."""
    url = url.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif not url.startswith(("ws://", "wss://")):
        raise ValueError(f"not a server address: {url!r} (expected ws://, wss://, http:// or https://)")
    if not url.endswith(STREAM_PATH):
        url += STREAM_PATH
    return url


def auth_headers(token: str | None) -> dict[str, str]:
    """The upgrade's headers: the token as ``Authorization: Bearer`` (never in the URL, where
    proxies log it)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def voice_options(
    voice: str | None = None, mode: str | None = None, speed: float | None = None
) -> dict[str, object]:
    """The voice options a context's first message carries (only those set), so a change of voice
    or speed between turns needs no new socket."""
    options: dict[str, object] = {}
    if voice is not None:
        options["voice"] = voice
    if mode is not None:
        options["mode"] = mode
    if speed is not None:
        options["speed"] = float(speed)
    return options


def start_message(sample_rate: int | None, word_timestamps: bool = True) -> dict[str, object]:
    """``start`` for an integration: 16-bit PCM at the pipeline's rate, audio as JSON messages
    that carry their context id, word times when the server has them."""
    start: dict[str, object] = {"type": "start", "format": "pcm_s16le", "audio_transport": "json"}
    if sample_rate is not None:
        start["sample_rate"] = int(sample_rate)
    if word_timestamps:
        start["timestamps"] = "words"
    return start


@dataclass(frozen=True)
class Ready:
    """What the handshake settled: the server's session id, the rate the audio will arrive at, and
    whether word times come as ``words`` messages (else they are derived from ``mark``s)."""

    session_id: str
    sample_rate: int
    words: bool


async def handshake(
    send: Callable[[str], Awaitable[None]],
    recv: Callable[[], Awaitable[str | bytes]],
    start: dict,
    optional: tuple[str, ...] = OPTIONAL_START_KEYS,
) -> Ready:
    """Send ``start`` and wait for ``ready``.  A ``bad_request`` that names one of ``optional``
    (``timestamps``, ``sample_rate``) is answered by sending ``start`` again without it: a
    refused ``start`` leaves the session unstarted, so it may be sent again.  Any other error is
    a :class:`HandshakeError`."""
    start = dict(start)
    while True:
        await send(json.dumps(start))
        while True:
            raw = await recv()
            if isinstance(raw, bytes):
                continue  # no audio can precede ready; a stray frame is not ours to interpret
            msg = json.loads(raw)
            if msg.get("type") in ("ready", "error"):
                break
        if msg["type"] == "ready":
            return Ready(
                session_id=str(msg.get("session_id", "")),
                sample_rate=int(msg["sample_rate"]),
                words=start.get("timestamps") == "words",
            )
        code, message = str(msg.get("code")), str(msg.get("message", ""))
        named = [k for k in optional if k in start and k in message]
        if code != "bad_request" or msg.get("fatal") or not named:
            raise HandshakeError(code, message)
        del start[named[0]]


@dataclass(frozen=True)
class TimedWord:
    """A word of the text sent to a context (``text[char_start:char_end]`` of that text), with its
    time in that context's audio (seconds from its first sample)."""

    text: str
    start: float
    end: float
    char_start: int
    char_end: int


class WordTimer:
    """Timed words for one context, from whichever the server sends.

    ``words`` messages (a server with ``timestamps: "words"``) carry each word's own time and are
    passed through.  Otherwise each ``mark`` says the text up to ``text_offset`` is spoken by
    ``audio_ms``: the words completed since the previous mark share the audio between the two
    marks in proportion to their characters.  That is exact where marks come per word and a clause-
    level estimate where they come per clause (the default voice before word timing), and never
    places a word later than audio already sent."""

    def __init__(self) -> None:
        self.text = ""  # everything sent to the context, as sent (mark offsets count over it)
        self._offset = 0  # text before this has been timed (both sources: one or the other is used)
        self._ms = 0.0  # audio time of the last mark

    def add_text(self, delta: str) -> None:
        self.text += delta

    def on_words(self, words: Iterable[dict]) -> list[TimedWord]:
        """The server's timed words as the frameworks count words: runs of non-space (the
        server's words leave punctuation out, "Sure" of "Sure,"; Pipecat matches its word frames
        against whitespace-separated text and LiveKit joins them into the transcript).  Words of
        one run ("well-known") become one, timed from the first's start to the last's end."""
        out: list[TimedWord] = []
        for w in words:
            start, end = int(w["start"]), int(w["end"])
            t0, t1 = w["start_ms"] / 1000.0, w["end_ms"] / 1000.0
            if end <= self._offset:  # in a run already given out
                if out and end > out[-1].char_start:
                    out[-1] = TimedWord(
                        out[-1].text,
                        out[-1].start,
                        max(out[-1].end, t1),
                        out[-1].char_start,
                        out[-1].char_end,
                    )
                continue
            while start > self._offset and not self.text[start - 1].isspace():
                start -= 1
            while end < len(self.text) and not self.text[end].isspace():
                end += 1
            out.append(TimedWord(self.text[start:end], t0, t1, start, end))
            self._offset = end
        return out

    def on_mark(self, text_offset: int, audio_ms: float, final: bool = False) -> list[TimedWord]:
        """The words a mark completes.  A word the mark may have cut (the text sent so far shows
        no boundary after it) waits for the next mark, unless ``final``."""
        offset = min(max(text_offset, self._offset), len(self.text))
        span = self.text[self._offset : offset]
        words = list(_WORD.finditer(span))
        cut = None
        if words and not final and words[-1].end() == len(span) and not self._ends_word(offset):
            cut = words.pop()
        t0, t1 = self._ms, max(self._ms, audio_ms)
        per_char = (t1 - t0) / len(span) if span else 0.0
        base = self._offset
        out = [
            TimedWord(
                m.group(),
                (t0 + m.start() * per_char) / 1000.0,
                (t0 + m.end() * per_char) / 1000.0,
                base + m.start(),
                base + m.end(),
            )
            for m in words
        ]
        if cut is None:
            self._offset, self._ms = offset, t1
        else:  # the cut word keeps its characters and their share of the audio for later
            self._offset, self._ms = self._offset + cut.start(), t0 + cut.start() * per_char
        return out

    def finish(self, audio_ms: float) -> list[TimedWord]:
        """At the context's end: the words no mark has covered yet, up to its last audio."""
        return self.on_mark(len(self.text), audio_ms, final=True)

    def _ends_word(self, offset: int) -> bool:
        """Whether the text sent so far shows a word boundary at ``offset``."""
        return offset < len(self.text) and self.text[offset].isspace()
