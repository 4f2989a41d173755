"""A Pipecat TTS service on our own WebSocket protocol (docs/protocol.md).

```python
from realtime.integrations.pipecat import RealtimeTTSService

tts = RealtimeTTSService(url="ws://localhost:8000", token="T",
                         settings=RealtimeTTSService.Settings(voice="joe", speed=1.1))
```

One socket per service, opened when the pipeline starts and reopened if it drops; every turn is
one context on it (Pipecat's turn context id is ours), so the text of a turn streams into the
model as the LLM writes it and the next turn needs no new connection.  Audio comes as JSON
messages that name their context (16-bit PCM at the pipeline's rate), so on an interruption the
turn's context is cancelled on the server (``cancel``) and anything of it still in flight is
dropped, while the socket and the next turn carry on.  Word timestamps come from the server's
``words`` messages when it has them (``timestamps: "words"``), otherwise from its ``mark``s; they
drive Pipecat's word frames, so an interrupted turn is remembered as far as it was heard.

Install with ``pip install 'cosyvoice-realtime[pipecat]'``."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

try:
    from loguru import logger
    from pipecat.audio.utils import create_stream_resampler
    from pipecat.frames.frames import (
        ErrorFrame,
        Frame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
    from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given
    from websockets.protocol import State
except ModuleNotFoundError as e:  # pragma: no cover - exercised where Pipecat is absent
    raise ImportError(
        "realtime.integrations.pipecat needs Pipecat: pip install 'cosyvoice-realtime[pipecat]'"
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

__all__ = ["RealtimeTTSService", "RealtimeTTSSettings"]


@dataclass
class RealtimeTTSSettings(TTSSettings):
    """Runtime-updatable settings; a change applies from the next turn (each turn's context opens
    with the voice options then in force, so no reconnect is needed).

    Parameters:
        voice: A voice id from ``GET /v1/voices`` (None: the server's default voice).
        mode: ``sft``, ``zero_shot``, ``cross_lingual`` or ``instruct2`` (None: ``sft``).
        speed: 0.25-4.0 (None: 1.0).
    """

    mode: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    speed: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


def _given(value: Any) -> Any:
    return value if is_given(value) else None


class RealtimeTTSService(WebsocketTTSService):
    """Pipecat TTS over ``/v1/tts/stream``: one pooled socket, one context per turn, word
    timestamps, interruption by ``cancel``, reconnection when the socket drops."""

    Settings = RealtimeTTSSettings
    _settings: RealtimeTTSSettings

    def __init__(
        self,
        *,
        url: str = "ws://127.0.0.1:8000",
        token: str | None = None,
        sample_rate: int | None = None,
        settings: RealtimeTTSSettings | None = None,
        word_timestamps: bool = True,
        text_aggregation_mode: TextAggregationMode | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            url: The server (``ws://host:8000``, ``http://host:8000``) or its stream endpoint.
            token: The server's token (``realtime serve --token``), sent as ``Authorization:
                Bearer``.
            sample_rate: Output rate; None takes the pipeline's.  A rate the server does not
                encode is asked of it once, then its native rate is resampled here.
            settings: Voice, mode and speed (see :class:`RealtimeTTSSettings`).
            word_timestamps: Ask for ``words`` messages (falling back to ``mark``s on a server
                without them).  Off, word frames still come, from marks.
            text_aggregation_mode: Pipecat's: ``SENTENCE`` (default) sends whole sentences,
                ``TOKEN`` streams every LLM token into the context as it arrives, which our
                engines are built for (lowest latency).
        """
        store = RealtimeTTSSettings(model=None, voice=None, language=None, mode=None, speed=None)
        if settings is not None:
            store.apply_update(settings)
        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            # words come timed from the server, so the base builds word frames from them (and an
            # interrupted turn is remembered as far as it was heard), not from the text sent
            push_text_frames=False,
            push_stop_frames=False,
            # sentences arrive without the space between them; the context's text must keep it
            append_trailing_space=True,
            sample_rate=sample_rate,
            settings=store,
            **kwargs,
        )
        self._url = stream_url(url)
        self._token = token
        self._want_words = word_timestamps
        self._ready: Ready | None = None
        self._receive_task = None
        self._timers: dict[str, WordTimer] = {}  # contexts open on the current socket
        self._cancelled: set[str] = set()  # contexts cancelled on it, until the server confirms
        self._resamplers: dict[str, Any] = {}  # per context, when the server's rate is not ours
        self._idle_closed = False  # the server said it is closing the socket for idleness

    # ---- what tests and dashboards may read ---------------------------------------------------
    @property
    def session_id(self) -> str | None:
        """The server's id for the current socket (one per connection, kept across turns)."""
        return self._ready.session_id if self._ready else None

    @property
    def word_timestamps_from_server(self) -> bool:
        """Whether word times come from ``words`` messages (True) or are derived from ``mark``s."""
        return bool(self._ready and self._ready.words)

    def can_generate_metrics(self) -> bool:
        return True

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and (self._receive_task is None or self._receive_task.done()):
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self) -> None:
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self) -> None:
        if self._websocket and self._websocket.state is State.OPEN:
            return
        try:
            ws = await self._websocket_connect(
                self._url, additional_headers=auth_headers(self._token), max_size=16 * 1024 * 1024
            )
            try:
                self._ready = await handshake(
                    ws.send, ws.recv, start_message(self.sample_rate or None, self._want_words)
                )
            except BaseException:
                await ws.close()
                raise
            self._websocket = ws
            await self._call_event_handler("on_connected")
        except HandshakeError as e:
            self._websocket = None
            # a wrong format cannot work on a retry; a full server may
            await self.push_error(
                error_msg=f"{self} refused: {e}", exception=e, force_treat_as_permanent=not e.retryable
            )
        except Exception as e:
            self._websocket = None
            await self.push_error(error_msg=f"{self} could not connect: {e}", exception=e)
            await self._call_event_handler("on_connection_error", str(e))

    async def _disconnect_websocket(self) -> None:
        ws, self._websocket = self._websocket, None
        self._timers.clear()
        self._cancelled.clear()
        self._resamplers.clear()
        if ws is None:
            return
        try:
            await self.stop_all_metrics()
            await ws.close()
        except Exception as e:  # already gone: nothing left to release
            logger.debug(f"{self} closing the socket: {e}")
        finally:
            await self._call_event_handler("on_disconnected")

    # ---- sending -----------------------------------------------------------------------------
    async def _send(self, msg: dict) -> None:
        if self._websocket is None:
            raise ConnectionError(f"{self} is not connected")
        await self._websocket.send(json.dumps(msg))

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send one piece of a turn's text to the turn's context, opening it (with the voice
        options now in force) on its first piece.  Audio arrives on the receive task."""
        if not self._websocket or self._websocket.state is not State.OPEN:
            await self._connect()
        if not self._websocket:
            yield ErrorFrame(error=f"{self}: not connected, turn not spoken")
            return
        msg: dict[str, Any] = {"type": "text", "context_id": context_id, "text": text}
        try:
            if context_id not in self._timers:
                if not self.audio_context_available(context_id):
                    await self.create_audio_context(context_id)
                    await self.start_ttfb_metrics()
                    yield TTSStartedFrame(context_id=context_id)
                self._timers[context_id] = WordTimer()
                msg.update(
                    voice_options(
                        _given(self._settings.voice),
                        _given(self._settings.mode),
                        _given(self._settings.speed),
                    )
                )
            self._timers[context_id].add_text(text)
            await self._send(msg)
            await self.start_tts_usage_metrics(text)
        except Exception as e:
            yield TTSStoppedFrame(context_id=context_id)
            yield ErrorFrame(error=f"{self}: {e}")
            return
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is complete: ``end`` its context, so its last words are spoken now and
        ``done`` follows them."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id in self._timers and self._websocket:
            await self._send({"type": "end", "context_id": context_id})

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Barge-in: stop the server's work on the turn, not just its playback here."""
        await self.stop_all_metrics()
        self._resamplers.pop(context_id, None)
        if context_id in self._timers and self._websocket:
            self._timers.pop(context_id, None)
            self._cancelled.add(context_id)
            try:
                await self._send({"type": "cancel", "context_id": context_id})
            except Exception as e:  # the socket is gone, and the context with it
                logger.debug(f"{self} cancel of {context_id}: {e}")
        await super().on_audio_context_interrupted(context_id)

    # ---- receiving ---------------------------------------------------------------------------
    async def _receive_messages(self) -> None:
        ws = self._websocket
        if ws is None:
            raise ConnectionError(f"{self} is not connected")
        self._idle_closed = False
        async for raw in ws:
            if isinstance(raw, str):
                await self._on_message(json.loads(raw))
        if self._idle_closed:
            # The server closed a socket no turn was using (its idle timeout): not a failure to
            # retry at once (each retry would idle out again), so the receive loop ends here, by
            # the normal-closure exception this raises, and the next turn reconnects.
            await ws.recv()

    async def _on_message(self, msg: dict) -> None:
        kind = msg.get("type")
        cid = msg.get("context_id")
        if cid in self._cancelled:
            if kind in ("cancelled", "done", "error"):
                self._cancelled.discard(cid)
            return  # late audio or timing of an interrupted turn: never played
        timer = self._timers.get(cid) if cid is not None else None
        if kind == "audio" and timer is not None:
            await self._add_audio(cid, await self._resample(cid, base64.b64decode(msg["data"])))
        elif kind == "words" and timer is not None:
            await self._add_words(cid, timer.on_words(msg.get("words", [])))
        elif kind == "mark" and timer is not None and not self.word_timestamps_from_server:
            await self._add_words(cid, timer.on_mark(int(msg["text_offset"]), float(msg["audio_ms"])))
        elif kind == "done" and timer is not None:
            if not self.word_timestamps_from_server:
                await self._add_words(cid, timer.finish(float(msg.get("stats", {}).get("audio_ms", 0.0))))
            self._timers.pop(cid, None)
            resampler = self._resamplers.pop(cid, None)
            if resampler is not None:  # the turn's last samples, held by the resampler's filter
                await self._add_audio(cid, await resampler.flush())
            if self.audio_context_available(cid):
                await self.append_to_audio_context(cid, TTSStoppedFrame(context_id=cid))
                await self.remove_audio_context(cid)
        elif kind == "error" and cid is None and msg.get("code") == "timeout" and msg.get("fatal"):
            logger.debug(f"{self}: the server closed the idle socket; the next turn reopens it")
            self._idle_closed = True
        elif kind == "error":
            await self._on_error(msg, cid)

    async def _resample(self, context_id: str, audio: bytes) -> bytes:
        """The server's audio at our rate: as is, or through the context's own stream resampler
        (one per context, so no turn's tail leaks into the next and each is flushed at its end)."""
        rate = self._ready.sample_rate if self._ready else self.sample_rate
        if rate == self.sample_rate:
            return audio
        resampler = self._resamplers.get(context_id)
        if resampler is None:
            resampler = self._resamplers[context_id] = create_stream_resampler()
        return await resampler.resample(audio, rate, self.sample_rate)

    async def _add_audio(self, context_id: str, audio: bytes) -> None:
        if audio:
            await self.append_to_audio_context(
                context_id, TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
            )

    async def _add_words(self, context_id: str, words: list[TimedWord]) -> None:
        if words:
            await self.add_word_timestamps([(w.text, w.start) for w in words], context_id)

    async def _on_error(self, msg: dict, context_id: str | None) -> None:
        text = f"{self}: {msg.get('code')}: {msg.get('message')}"
        if context_id is not None:  # that context is over (no done follows)
            self._timers.pop(context_id, None)
            self._resamplers.pop(context_id, None)
            if self.audio_context_available(context_id):
                await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                await self.remove_audio_context(context_id)
        # a fatal one closes the socket; the receive loop then reconnects
        await self.push_error(error_msg=text)
