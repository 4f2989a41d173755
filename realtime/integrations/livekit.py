"""A LiveKit Agents TTS on our own WebSocket protocol (docs/protocol.md).

```python
from realtime.integrations import livekit as realtime_tts

session = AgentSession(tts=realtime_tts.TTS(url="ws://localhost:8000", token="T", voice="joe"), ...)
```

One socket per ``TTS``, shared by every stream (opened on first use or by ``prewarm()``, and again
after it drops); each ``SynthesizeStream`` is one context on it, so an LLM's tokens stream into the
model as they arrive (``push_text``), ``flush()`` speaks what has arrived, ``end_input()`` ends the
context, and ``aclose()`` before the end (an interruption) cancels the context on the server and
drops whatever of it is still in flight.  Audio is 16-bit PCM at ``sample_rate``; every frame
carries the words it completes as ``TimedString``s (``aligned_transcript``), from the server's
``words`` messages when it has them, otherwise from its ``mark``s.  ``synthesize()`` runs the same
path for a whole text.

Install with ``pip install 'cosyvoice-realtime[livekit]'``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import weakref
from dataclasses import dataclass, replace
from typing import Any

try:
    import websockets
    from livekit.agents import (
        DEFAULT_API_CONNECT_OPTIONS,
        APIConnectionError,
        APIConnectOptions,
        APIError,
        APIStatusError,
        APITimeoutError,
        tts,
        utils,
    )
    from livekit.agents.types import TimedString
except ModuleNotFoundError as e:  # pragma: no cover - exercised where LiveKit is absent
    raise ImportError(
        "realtime.integrations.livekit needs LiveKit Agents: pip install 'cosyvoice-realtime[livekit]'"
    ) from e

from .client import (
    HandshakeError,
    Ready,
    TimedWord,
    WordTimer,
    auth_headers,
    handshake,
    start_message,
    stream_url,
    voice_options,
)

__all__ = ["TTS", "SynthesizeStream"]


@dataclass(frozen=True)
class _Options:
    voice: str | None
    mode: str | None
    speed: float | None


class _Lost:
    """Put in a context's inbox when the socket under it closed."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Connection:
    """One socket and the contexts open on it: the receive loop routes each message to its
    context's inbox by ``context_id``; a context that was cancelled gets nothing more."""

    def __init__(self, ws: Any, ready: Ready) -> None:
        self.ws = ws
        self.ready = ready
        self.closed = False
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._cancelled: set[str] = set()
        self._unanswered: set[str] = set()  # contexts opened that have heard nothing back yet
        self._send_lock = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()
        self._recv_task = asyncio.create_task(self._recv_loop(), name="realtime-tts-recv")

    @classmethod
    async def open(cls, url: str, token: str | None, sample_rate: int, words: bool) -> _Connection:
        ws = await websockets.connect(url, additional_headers=auth_headers(token), max_size=16 * 1024 * 1024)
        try:
            # the rate is LiveKit's contract with the room, so a rate the server refuses is an error
            ready = await handshake(
                ws.send, ws.recv, start_message(sample_rate, words), optional=("timestamps",)
            )
        except BaseException:
            await ws.close()
            raise
        return cls(ws, ready)

    def register(self, context_id: str) -> asyncio.Queue:
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[context_id] = inbox
        return inbox

    def unregister(self, context_id: str) -> None:
        self._inboxes.pop(context_id, None)
        self._unanswered.discard(context_id)

    async def send(self, msg: dict, opens: bool = False) -> None:
        """Send a message; ``opens``: it is a context's first (see :meth:`_recv_loop`)."""
        if self.closed:
            raise APIConnectionError("the socket to the TTS server is closed")
        if opens:
            self._unanswered.add(msg["context_id"])
        async with self._send_lock:
            await self.ws.send(json.dumps(msg))

    def cancel(self, context_id: str) -> None:
        """Stop the server's work on a context now (from a stream being closed, so not awaited);
        anything of it still in flight is dropped on arrival."""
        self.unregister(context_id)
        self._cancelled.add(context_id)
        if self.closed:
            return
        task = asyncio.create_task(self._send_quietly({"type": "cancel", "context_id": context_id}))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send_quietly(self, msg: dict) -> None:
        with contextlib.suppress(Exception):  # a closed socket has cancelled everything already
            await self.send(msg)

    async def _recv_loop(self) -> None:
        error: Exception = APIConnectionError("the TTS server closed the socket")
        try:
            async for raw in self.ws:
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                cid = msg.get("context_id")
                inbox = self._inboxes.get(cid) if cid is not None else None
                if inbox is not None:
                    self._unanswered.discard(cid)
                    inbox.put_nowait(msg)
                elif cid is None and msg.get("type") == "error" and not msg.get("fatal"):
                    # a refused message names no context when the refusal is of the message
                    # itself (a wrong voice on a context's first text): it can only be about a
                    # context that has heard nothing since it was opened
                    for refused in list(self._unanswered):
                        self._unanswered.discard(refused)
                        if refused in self._inboxes:
                            self._inboxes[refused].put_nowait({**msg, "context_id": refused})
                elif cid in self._cancelled:  # late audio of an interrupted turn: dropped
                    if msg.get("type") in ("cancelled", "done", "error"):
                        self._cancelled.discard(cid)
                elif cid is None and msg.get("type") == "error":
                    # about the socket (a fatal one closes it): every context hears of it
                    error = APIError(f"{msg.get('code')}: {msg.get('message')}", retryable=True)
        except websockets.ConnectionClosed as e:
            error = APIConnectionError(f"the socket to the TTS server dropped ({e})")
        finally:
            self.closed = True
            for inbox in self._inboxes.values():
                inbox.put_nowait(_Lost(error))
            self._inboxes.clear()

    async def aclose(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            await self.ws.close()
        await utils.aio.cancel_and_wait(self._recv_task, *self._pending)


class TTS(tts.TTS):
    """LiveKit ``tts.TTS`` over ``/v1/tts/stream``: streaming with aligned transcripts, one pooled
    socket, a context per stream."""

    def __init__(
        self,
        *,
        url: str = "ws://127.0.0.1:8000",
        token: str | None = None,
        voice: str | None = None,
        mode: str | None = None,
        speed: float | None = None,
        sample_rate: int = 24000,
        word_timestamps: bool = True,
    ) -> None:
        """
        Args:
            url: The server (``ws://host:8000``, ``http://host:8000``) or its stream endpoint.
            token: The server's token (``realtime serve --token``), sent as ``Authorization:
                Bearer``.
            voice: A voice id from ``GET /v1/voices`` (None: the server's default voice).
            mode: ``sft``, ``zero_shot``, ``cross_lingual`` or ``instruct2`` (None: ``sft``).
            speed: 0.25-4.0 (None: 1.0).
            sample_rate: 8000, 16000, 24000, 48000 or the engine's native rate.
            word_timestamps: Ask for ``words`` messages (falling back to ``mark``s on a server
                without them).  Off, the transcript is still aligned, from marks.
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=sample_rate,
            num_channels=1,
        )
        self._url = stream_url(url)
        self._token = token
        self._words = word_timestamps
        self._opts = _Options(voice, mode, speed)
        self._conn: _Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._streams: weakref.WeakSet[SynthesizeStream] = weakref.WeakSet()
        self._prewarm_task: asyncio.Task | None = None

    @property
    def model(self) -> str:
        return "cosyvoice-realtime"

    @property
    def provider(self) -> str:
        return "cosyvoice-realtime"

    @property
    def session_id(self) -> str | None:
        """The server's id for the pooled socket (None before the first connection)."""
        return self._conn.ready.session_id if self._conn else None

    @property
    def word_timestamps_from_server(self) -> bool:
        """Whether word times come from ``words`` messages (True) or are derived from ``mark``s."""
        return bool(self._conn and self._conn.ready.words)

    @property
    def connected(self) -> bool:
        """Whether the pooled socket is open (the next stream then reuses it)."""
        return self._conn is not None and not self._conn.closed

    def update_options(
        self, *, voice: str | None = None, mode: str | None = None, speed: float | None = None
    ) -> None:
        """Change the voice options of the streams created from now on (same socket)."""
        changes = {k: v for k, v in (("voice", voice), ("mode", mode), ("speed", speed)) if v is not None}
        self._opts = replace(self._opts, **changes)

    async def _connection(self) -> tuple[_Connection, bool]:
        """The pooled socket, opened (again) when there is none: (connection, reused)."""
        async with self._conn_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn, True
            if self._conn is not None:
                await self._conn.aclose()
            self._conn = await _Connection.open(self._url, self._token, self.sample_rate, self._words)
            return self._conn, False

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        """A whole text, over the same socket and context path as a stream (so it gets the same
        aligned transcript)."""
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        stream = SynthesizeStream(tts=self, conn_options=conn_options)
        self._streams.add(stream)
        return stream

    def prewarm(self) -> None:
        """Open the socket before the first turn needs it."""
        if self._prewarm_task is None or self._prewarm_task.done():
            self._prewarm_task = asyncio.create_task(self._prewarm())

    async def _prewarm(self) -> None:
        with contextlib.suppress(Exception):  # the first stream retries and reports
            await self._connection()

    async def aclose(self) -> None:
        if self._prewarm_task is not None:
            await utils.aio.cancel_and_wait(self._prewarm_task)
        for stream in list(self._streams):
            await stream.aclose()
        self._streams.clear()
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None


class _Transcript:
    """A stream's timed strings for LiveKit: each runs from the end of the last one, so the strings
    put together are the text as sent, spaces and punctuation included."""

    def __init__(self, timer: WordTimer, emitter: tts.AudioEmitter) -> None:
        self.timer = timer
        self.emitter = emitter
        self.covered = 0  # text already handed out

    def emit(self, words: list[TimedWord], tail: bool = False) -> None:
        """Hand out ``words`` (those not covered yet); ``tail``: the text after the last word too."""
        text, timed = self.timer.text, []
        for w in words:
            if w.char_end <= self.covered:
                continue
            timed.append(TimedString(text[self.covered : w.char_end], start_time=w.start, end_time=w.end))
            self.covered = w.char_end
        if tail and self.covered < len(text) and timed:
            last = timed[-1]
            timed[-1] = TimedString(
                last + text[self.covered :], start_time=last.start_time, end_time=last.end_time
            )
            self.covered = len(text)
        if timed:
            self.emitter.push_timed_transcript(timed)


class SynthesizeStream(tts.SynthesizeStream):
    """One context on the pooled socket: text in as it is pushed, audio and timed words out."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts
        self._opts = tts._opts
        self._server_ended = False  # done or error: the server has finished with the context

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        context_id = utils.shortuuid()
        output_emitter.initialize(
            request_id=context_id,
            sample_rate=self._tts.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        output_emitter.start_segment(segment_id=context_id)
        conn = await self._connect()
        inbox = conn.register(context_id)
        timer = WordTimer()
        self._server_ended = False  # (a retried attempt starts afresh)
        sender = asyncio.create_task(self._send_text(conn, context_id, timer, inbox))
        try:
            await self._receive(conn, inbox, _Transcript(timer, output_emitter), output_emitter)
        finally:
            await utils.aio.cancel_and_wait(sender)
            if self._server_ended:
                conn.unregister(context_id)
            else:  # closed before its end (an interruption) or failed: stop the server's work
                conn.cancel(context_id)
            output_emitter.end_segment()

    async def _connect(self) -> _Connection:
        """The pooled connection, its failures as LiveKit's API errors (retryable where a retry
        may succeed)."""
        try:
            conn, self._connection_reused = await asyncio.wait_for(
                self._tts._connection(), self._conn_options.timeout
            )
        except TimeoutError as e:
            raise APITimeoutError() from e
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            raise APIStatusError(
                f"the TTS server refused the connection: HTTP {status}",
                status_code=status,
                retryable=status >= 500,
            ) from e
        except HandshakeError as e:
            raise APIStatusError(str(e), status_code=e.status, retryable=e.retryable) from e
        except Exception as e:
            raise APIConnectionError("could not connect to the TTS server") from e
        return conn

    async def _send_text(
        self, conn: _Connection, context_id: str, timer: WordTimer, inbox: asyncio.Queue
    ) -> None:
        """The input channel as our messages: the first text opens the context with the voice
        options, flush and the end of input follow as they come."""
        try:
            opened = False
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    if opened:
                        await conn.send({"type": "flush", "context_id": context_id})
                    continue
                msg: dict[str, Any] = {"type": "text", "context_id": context_id, "text": data}
                if not opened:
                    msg.update(voice_options(self._opts.voice, self._opts.mode, self._opts.speed))
                timer.add_text(data)
                await conn.send(msg, opens=not opened)
                opened = True
                self._mark_started()
            if opened:
                await conn.send({"type": "end", "context_id": context_id})
            else:  # nothing to say: no context was opened, so none to wait for
                inbox.put_nowait({"type": "done", "context_id": context_id, "stats": {"audio_ms": 0.0}})
        except Exception as e:  # the receiver is waiting on the inbox: tell it
            lost = APIConnectionError("could not send to the TTS server")
            lost.__cause__ = e
            inbox.put_nowait(_Lost(lost))

    async def _receive(
        self,
        conn: _Connection,
        inbox: asyncio.Queue,
        transcript: _Transcript,
        output_emitter: tts.AudioEmitter,
    ) -> None:
        """The context's messages until its done (returns) or error (raises)."""
        timer = transcript.timer
        while True:
            msg = await inbox.get()
            if isinstance(msg, _Lost):
                raise msg.error
            kind = msg.get("type")
            if kind == "audio":
                output_emitter.push(base64.b64decode(msg["data"]))
            elif kind == "words":
                transcript.emit(timer.on_words(msg.get("words", [])))
            elif kind == "mark" and not conn.ready.words:
                transcript.emit(timer.on_mark(int(msg["text_offset"]), float(msg["audio_ms"])))
            elif kind == "done":
                audio_ms = float(msg.get("stats", {}).get("audio_ms", 0.0))
                transcript.emit([] if conn.ready.words else timer.finish(audio_ms), tail=True)
                self._server_ended = True
                return
            elif kind == "error":
                self._server_ended = True
                code = str(msg.get("code"))
                raise APIError(f"{code}: {msg.get('message')}", retryable=code in ("overloaded", "internal"))
