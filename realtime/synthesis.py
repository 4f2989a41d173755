"""One utterance's synthesis: the engine in a worker thread, joined to the event loop by a bounded
audio buffer.  Used by both the WebSocket contexts and the HTTP routes, so there is one way to run
an engine.

Backpressure: the buffer holds about a second of audio; when it is full the engine's thread blocks
inside ``put`` and the model stops generating, so a slow reader slows the producer instead of
growing memory.  Cancellation closes the text stream (an engine waiting for text wakes at once)
and the buffer (an engine blocked on a full buffer wakes at once); either way the engine unwinds
within one synthesis step and its ``finally`` frees the per-utterance caches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from .engines.base import AudioChunk, Cancelled, Engine, EngineError, Flushed, SynthesisOptions, TextStream
from .protocol import VoiceOptions

log = logging.getLogger("realtime.synthesis")


@dataclass(frozen=True)
class Finished:
    """The engine returned normally: all audio has been queued."""


@dataclass(frozen=True)
class Failed:
    code: str
    message: str


Item = AudioChunk | Flushed | Finished | Failed


def synthesis_options(v: VoiceOptions) -> SynthesisOptions:
    """The engine's view of a context's validated voice options."""
    return SynthesisOptions(voice=v.voice, mode=v.mode, prompt_text=v.prompt_text, prompt_audio=v.prompt_audio,
                            instruct_text=v.instruct_text, speed=float(v.speed), token_hop_len=v.token_hop_len,
                            seed=v.seed)


class AudioBuffer:
    """Bounded hand-off from one producer thread to one asyncio consumer, counted in samples.

    Both sides are woken only when it matters, because every wake-up is a GIL hand-off between an
    engine thread and the event loop (with hundreds of sessions they were most of the service's
    context switches): the loop is signalled only while its consumer is actually waiting, and a
    producer blocked on a full buffer resumes only once it has drained to three quarters.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity_samples: int) -> None:
        self._loop = loop
        self._capacity = max(1, capacity_samples)
        self._resume_below = max(1, self._capacity * 3 // 4)
        self._cond = threading.Condition()
        self._items: deque[tuple[Item, int]] = deque()
        self._samples = 0
        self._closed = False
        self._producer_waiting = False
        self._consumer_waiting = False
        self._ready = asyncio.Event()

    @property
    def buffered_samples(self) -> int:
        return self._samples

    def put(self, item: Item, samples: int = 0) -> None:
        """Producer side: blocks while the buffer is full; raises :class:`Cancelled` once closed."""
        with self._cond:
            while self._samples >= self._capacity and not self._closed:
                self._producer_waiting = True
                self._cond.wait()
            self._producer_waiting = False
            if self._closed:
                raise Cancelled()
            self._append(item, samples)

    def put_final(self, item: Item) -> None:
        """Queue a terminal item even when full (it carries no audio); dropped once closed."""
        with self._cond:
            if not self._closed:
                self._append(item, 0)

    def _append(self, item: Item, samples: int) -> None:  # under the lock
        self._items.append((item, samples))
        self._samples += samples
        if self._consumer_waiting:
            self._consumer_waiting = False
            self._loop.call_soon_threadsafe(self._ready.set)

    def close(self) -> None:
        """Drop what is queued and wake both sides: the producer and the consumer get Cancelled."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._samples = 0
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> Item:
        """Next item; raises :class:`Cancelled` once the buffer is closed."""
        while True:
            with self._cond:
                if self._closed:
                    raise Cancelled()
                if self._items:
                    item, samples = self._items.popleft()
                    self._samples -= samples
                    if self._producer_waiting and self._samples < self._resume_below:
                        self._cond.notify_all()
                    return item
                # nothing yet: the next put signals the loop (clear() first, on this thread, so
                # that signal cannot be lost)
                self._ready.clear()
                self._consumer_waiting = True
            await self._ready.wait()


class Synthesis:
    """The engine's run for one context: ``start`` submits it to the executor, ``get`` yields its
    items on the loop, ``cancel`` stops it within one step."""

    def __init__(self, engine: Engine, options: SynthesisOptions, loop: asyncio.AbstractEventLoop,
                 buffer_seconds: float = 1.0) -> None:
        self.engine = engine
        self.options = options
        self.text = TextStream()
        self.buffer = AudioBuffer(loop, int(buffer_seconds * engine.sample_rate))
        self.future: Future | None = None
        self.worker_done = asyncio.Event()
        self.synth_seconds = 0.0  # engine start → last audio queued (includes waiting for streamed text)
        self._loop = loop

    def start(self, executor: Executor) -> None:
        self.future = executor.submit(self._run)
        self.future.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self.worker_done.set))

    def _run(self) -> None:
        t0 = time.perf_counter()
        gen = None
        try:
            if self.text.cancelled:
                return
            gen = self.engine.synthesize(self.text, self.options)
            for item in gen:
                self.text.check()
                if isinstance(item, AudioChunk):
                    self.buffer.put(item, len(item.samples))
                else:
                    self.buffer.put(item)
            self.synth_seconds = time.perf_counter() - t0  # before Finished, so `done` can report it
            self.buffer.put_final(Finished())
        except Cancelled:
            pass
        except EngineError as e:
            self.buffer.put_final(Failed(e.code, e.message))
        except Exception as e:  # the model broke: report it to this context only
            log.exception("engine %s failed", self.engine.name)
            self.buffer.put_final(Failed("internal", f"synthesis failed: {type(e).__name__}"))
        finally:
            if gen is not None:
                gen.close()

    async def get(self) -> Item:
        return await self.buffer.get()

    def cancel(self) -> None:
        self.text.cancel()
        self.buffer.close()

    async def wait_stopped(self, timeout: float | None = None) -> bool:
        """True once the engine's thread has let go (it was never started counts as stopped)."""
        if self.future is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.worker_done.wait()
            return True
        except TimeoutError:
            return False
