"""One utterance's synthesis, the same for every route (WebSocket contexts and HTTP requests):
admission, the engine stream, and a bounded audio buffer between the engine and the event loop.

The engine stream is opened at the first text, once admission grants a place: a context that
waits for its first text costs no place, no thread and no compute; one that waits for more text
keeps its place, and costs no compute.  Flushes and an end that come before any text are answered
here without an engine.

Backpressure: the buffer holds about a second of audio; while it is full the engine computes
nothing for this stream (it asks :meth:`AudioBuffer.has_room` and waits for the waker), so a slow
reader slows only its own stream and never grows memory.

Cleanup is synchronous (:meth:`Synthesis.close`): cancel the engine stream, drop the buffer, give
the admission place back.  It never awaits, so a cancelled task's ``finally`` cannot skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

import numpy as np

from .admission import Admission, Overloaded, Ticket
from .audio.encoders import AudioEncoder
from .engines.base import (
    AudioChunk,
    AudioSink,
    Cancelled,
    Engine,
    EngineError,
    EngineStream,
    Failed,
    Finished,
    Flushed,
    Output,
    SynthesisOptions,
    WordTime,
)
from .metrics import Metrics
from .text.frontend import ScriptWatch

log = logging.getLogger("realtime.synthesis")


class AudioBuffer(AudioSink):
    """Bounded hand-off from engine threads to one asyncio consumer, counted in samples.

    Both sides are woken only when it matters, because every wake-up is a GIL hand-off between an
    engine thread and the event loop (with hundreds of sessions they were most of the service's
    context switches): the loop is signalled only while its consumer is actually waiting, and the
    engine's waker is called only once a full buffer has drained to three quarters.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity_samples: int) -> None:
        self._loop = loop
        self._capacity = max(1, capacity_samples)
        self._resume_below = max(1, self._capacity * 3 // 4)
        self._lock = threading.Lock()
        self._items: deque[tuple[Output, int]] = deque()
        self._samples = 0
        self._closed = False
        self._producer_waiting = False
        self._consumer_waiting = False
        self._waker: Callable[[], None] | None = None
        self._ready = asyncio.Event()

    @property
    def buffered_samples(self) -> int:
        return self._samples

    def put(self, item: Output, samples: int = 0) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._items.append((item, samples))
            self._samples += samples
            signal = self._consumer_waiting
            self._consumer_waiting = False
        if signal:
            self._loop.call_soon_threadsafe(self._ready.set)
        return True

    def has_room(self) -> bool:
        with self._lock:
            if self._samples < self._capacity or self._closed:
                return True
            self._producer_waiting = True
            return False

    def set_waker(self, wake: Callable[[], None]) -> None:
        self._waker = wake

    def close(self) -> None:
        """Drop what is queued; the consumer gets :class:`Cancelled`, the producer's puts fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._samples = 0
        if self._waker is not None:
            self._waker()
        self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> Output:
        """Next item; raises :class:`Cancelled` once the buffer is closed."""
        while True:
            wake = None
            with self._lock:
                if self._closed:
                    raise Cancelled()
                if self._items:
                    item, samples = self._items.popleft()
                    self._samples -= samples
                    if self._producer_waiting and self._samples < self._resume_below:
                        self._producer_waiting = False
                        wake = self._waker
                else:
                    # nothing yet: the next put signals the loop (clear() first, on this thread,
                    # so that signal cannot be lost)
                    self._ready.clear()
                    self._consumer_waiting = True
                    item = None
            if item is not None:
                if wake is not None:
                    wake()
                return item
            await self._ready.wait()


@dataclass(frozen=True)
class Word:
    """A word of the context's raw text (``start:end``) and when it is heard (ms of the context's
    audio, after speed)."""

    start: int
    end: int
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Audio:
    """Encoded frames of one engine chunk; ``start_s`` is where it starts on the playback clock;
    ``text_offset``: the engine's mark for it, when it has one (the :class:`Mark` that follows);
    ``words``: the words whose end this audio (or audio already delivered) holds, to be told to the
    client once these frames have gone."""

    frames: list[bytes]
    start_s: float
    seconds: float
    text_offset: int | None = None
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Mark:
    text_offset: int
    audio_ms: float


def _skipped_message(skipped: str, languages: tuple[str, ...]) -> str:
    shown = skipped if len(skipped) <= 80 else skipped[:77] + "..."
    return f"the voice speaks {', '.join(languages)}; text in another script is not spoken: {shown!r}"


@dataclass(frozen=True)
class LanguageWarning:
    """Text in a script none of the voice's languages is written in was skipped (not spoken)."""

    skipped: str
    languages: tuple[str, ...]
    code: str = "unsupported_language"

    @property
    def message(self) -> str:
        return _skipped_message(self.skipped, self.languages)

    @property
    def fields(self) -> dict[str, object]:
        return {"skipped": self.skipped, "languages": list(self.languages)}


@dataclass(frozen=True)
class Unspeakable(Failed):
    """Nothing of the context's text is in a script the voice can say: it ends with this error
    rather than with silence and a normal end."""

    skipped: str = ""
    languages: tuple[str, ...] = ()

    @property
    def fields(self) -> dict[str, object]:
        return {"skipped": self.skipped, "languages": list(self.languages)}


Delivery = Audio | Mark | Flushed | Finished | Failed | LanguageWarning


class Synthesis:
    """One utterance: push text, flush, end; read :meth:`deliver`; :meth:`close` when done."""

    def __init__(
        self,
        engine: Engine,
        options: SynthesisOptions,
        admission: Admission,
        owner: Hashable,
        buffer_seconds: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics  # None: not counted (tests, scripts)
        self.options = options
        self.admission = admission
        self.owner = owner
        self.buffer = AudioBuffer(asyncio.get_running_loop(), int(buffer_seconds * engine.sample_rate))
        self.stream: EngineStream | None = None
        self.samples_out = 0  # engine samples delivered
        self.synth_seconds = 0.0  # engine opened → its last audio (includes waiting for streamed text)
        self.compute_seconds = 0.0  # model time the engine spent on it (see EngineStream.compute_seconds)
        self._pending: list[tuple[str, str]] = []  # input that came while admission was pending
        self._opening: asyncio.Task | None = None
        self._ticket: Ticket | None = None
        self._opened_at: float | None = None
        self._closed = False
        self._watch: ScriptWatch | None = None  # text the voice cannot say (made at the first text)
        self._refused = False  # nothing of the text could be said: ended with Unspeakable
        self._skipped: list[str] = []  # every run warned about so far
        self._word_offset = 0  # raw offset where the last word delivered ends
        self._word_ms = 0.0  # and its end on the audio clock

    # -- input (event loop) -----------------------------------------------------------------------
    def push(self, text: str) -> None:
        if self._closed or self._refused or not text:
            return
        self._check_script(text)
        if self.stream is not None:
            self.stream.push(text)
            return
        self._pending.append(("push", text))
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open(), name="synthesis-open")

    def flush(self) -> None:
        if self._watch is not None and not self._refused:
            self._warn(self._watch.close())
        self._control("flush", Flushed())

    def end(self) -> None:
        if self._watch is not None and not self._closed and not self._refused:
            runs = self._watch.close()
            if (runs or self._skipped) and not self._watch.spoke:  # all of it skipped, flushes included
                self._refuse(" ".join(self._skipped + runs))
                return
            self._warn(runs)
        self._control("end", Finished())

    # -- text the voice cannot say ------------------------------------------------------------------
    def _check_script(self, text: str) -> None:
        """Skipped text is never dropped in silence: a run of text in a script none of the voice's
        languages is written in (the front end does not read it) becomes a warning as soon as it
        is complete, or, when nothing of the text can be said, the context's error at its end."""
        if self._watch is None:
            self._watch = ScriptWatch(self.engine.languages(self.options.voice))
        if self._watch.languages:
            self._warn(self._watch.push(text))

    def _warn(self, runs: list[str]) -> None:
        for run in runs:
            self.buffer.put(LanguageWarning(run, self._watch.languages))
            self._skipped.append(run)

    def _refuse(self, skipped: str) -> None:
        self._refused = True
        self._pending = []
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.cancel()
        languages = self._watch.languages
        message = "nothing to say: " + _skipped_message(skipped, languages)
        self.buffer.put(Unspeakable("unsupported_language", message, None, skipped, languages))

    def _control(self, op: str, answer: Flushed | Finished) -> None:
        if self._closed:
            return
        if self.stream is not None:
            getattr(self.stream, op)()
        elif self._opening is not None:
            self._pending.append((op, ""))
        else:  # no text yet: nothing to speak, nothing to compute
            self.buffer.put(answer)

    async def _open(self) -> None:
        asked = time.perf_counter()
        try:
            self._ticket = await self.admission.acquire(self.owner)
            if self._refused:  # nothing to say after all: the place goes back
                self._release()
                return
            self._opened_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.queue_wait.observe(self._opened_at - asked)
            self.stream = self.engine.open(self.options, self.buffer)
        except Overloaded as e:
            self.buffer.put(Failed("overloaded", e.message, e.retry_after_ms))
            return
        except EngineError as e:
            self.buffer.put(Failed(e.code, e.message))
            return
        except Exception as e:  # an engine that cannot start must fail this stream only
            log.exception("engine %s could not open a stream", self.engine.name)
            self.buffer.put(Failed("internal", f"synthesis failed: {type(e).__name__}"))
            return
        pending, self._pending = self._pending, []
        for op, text in pending:
            if op == "push":
                self.stream.push(text)
            else:
                getattr(self.stream, op)()

    # -- output (event loop) ------------------------------------------------------------------------
    async def get(self) -> Output:
        item = await self.buffer.get()
        if isinstance(item, AudioChunk):
            self.samples_out += len(item.samples)
        elif isinstance(item, Finished | Failed):
            if isinstance(item, Finished) and self._opened_at is not None:
                self.synth_seconds = time.perf_counter() - self._opened_at
                self.compute_seconds = self.stream.compute_seconds if self.stream is not None else 0.0
            self._release()  # the engine computes nothing more for it: the place is free
        return item

    async def deliver(self, encoder: AudioEncoder) -> AsyncIterator[Delivery]:
        """The utterance as the client gets it: encoded audio, marks on the audio clock, flush
        acknowledgements (after the flushed audio is decodable), then :class:`Finished` (after the
        encoder's tail) or :class:`Failed`.  Raises :class:`Cancelled` once closed."""
        rate = self.engine.sample_rate
        while True:
            start = self.samples_out / rate
            item = await self.get()
            if isinstance(item, AudioChunk):
                samples = np.asarray(item.samples, dtype=np.float32).reshape(-1)
                frames = encoder.encode(samples)  # the whole chunk in one pass, cut into frames
                # what the client has once these frames are sent: a resampler holds back a few ms
                # of the engine's audio, so a word or mark is never placed past the audio sent
                sent_ms = min(self.samples_out / rate, encoder.samples_out / encoder.sample_rate) * 1000
                words = self._words(item.words, start * 1000, sent_ms)
                yield Audio(frames, start, len(samples) / rate, item.text_offset, words)
                if item.text_offset is not None:
                    yield Mark(item.text_offset, sent_ms)
            elif isinstance(item, Flushed):
                yield Audio(encoder.flush(), start, 0.0)  # Opus holds < 20 ms until flushed
                yield item
            elif isinstance(item, LanguageWarning):
                yield item
            elif isinstance(item, Finished):
                yield Audio(encoder.finish(), start, 0.0)
                if self.metrics is not None:
                    self.metrics.audio_seconds.inc(self.samples_out / rate)
                yield item
                return
            else:
                if self.metrics is not None:
                    self.metrics.errors.labels(item.code).inc()
                yield item
                return

    def _words(self, words: tuple[WordTime, ...], start_ms: float, end_ms: float) -> tuple[Word, ...]:
        """The engine's word times of a chunk starting at ``start_ms`` on the context's audio clock,
        held to what a client may be told whatever the engine says: in text order, each word once,
        times monotonic and never past ``end_ms``, the end of the audio delivered with it."""
        out = []
        for w in words:
            if w.end <= self._word_offset or w.end <= w.start:
                continue  # already told (or empty)
            begin = max(start_ms + w.start_s * 1000, self._word_ms)
            finish = min(max(start_ms + w.end_s * 1000, begin), end_ms)
            begin = min(begin, finish)
            out.append(Word(max(w.start, self._word_offset), w.end, begin, finish))
            self._word_offset, self._word_ms = w.end, finish
        return tuple(out)

    # -- cleanup --------------------------------------------------------------------------------
    def _release(self) -> None:
        ticket, self._ticket = self._ticket, None
        self.admission.release(ticket)

    def close(self) -> None:
        """Stop everything of this utterance now (idempotent, never awaits)."""
        if self._closed:
            return
        self._closed = True
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.cancel()
        self.buffer.close()
        self._release()
