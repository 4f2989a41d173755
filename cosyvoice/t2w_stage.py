"""The token2wav stage: one thread per model and device turns the speech tokens of every stream
into audio, batching what can be batched (continuous batching, like the LM stage).

Each tick takes every stream that has a chunk ready (a hop's tokens plus the lookahead, or the
end) and advances their flow one 25-token chunk per round, all of them in one estimator call per
Euler step, whatever their hops; a chunk whose flow is complete is vocoded at the end of its
round with the others of as many mel frames (one vocoder call) and delivered at once, so a first
chunk (one or two flow chunks) is heard before a 100-token hop of another stream is done.  Most
urgent first: a stream's deadline is when its listener, who started playing at its first chunk,
runs out of audio; a stream that has not spoken yet is due at once.  A stream whose
reader has unread chunks waits (one slow reader never holds the others), and a stream's tokens
come from its token source (the LM stage's handle, or a fixed list) as the stage needs them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import numpy as np

from .token2wav import HopSchedule, Job, Token2Wav

__all__ = ["DONE", "StaticTokens", "T2WStage", "T2WStream", "TokenSource"]

log = logging.getLogger("cosyvoice.t2w_stage")

DONE = "done"


class TokenSource(Protocol):
    """Where a stream's speech tokens come from."""

    def take(self) -> tuple[list[int], bool]:
        """The tokens produced since the last call, and whether no more will come (raises the
        producer's error, if it failed)."""

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener`` is called (from any thread, it must not block) when something changes."""


class StaticTokens:
    """A token source for tokens known in advance (voice conversion)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self._tokens = [int(t) for t in tokens]

    def take(self) -> tuple[list[int], bool]:
        tokens, self._tokens = self._tokens, []
        return tokens, True

    def subscribe(self, listener: Callable[[], None]) -> None:
        pass


class T2WStream:
    """One stream in the stage, seen by the thread that reads its audio."""

    def __init__(self, stage: T2WStage, uuid: Hashable, source: TokenSource) -> None:
        self.stage = stage
        self.uuid = uuid
        self.source = source
        self.out: deque[np.ndarray] = deque()  # chunks not yet read
        self.event = threading.Event()  # set whenever the reader may have something to do
        self.tokens_done = False  # the source will give no more tokens
        self.finished = False  # the final chunk is out (or the stream failed or was cancelled)
        self.cancelled = False
        self.error: BaseException | None = None
        self.first_ready: float | None = None  # when it first had a chunk to compute
        self.started: float | None = None  # when its first chunk was delivered
        self.delivered_s = 0.0  # seconds of audio delivered
        source.subscribe(self._changed)

    def _changed(self) -> None:
        self.event.set()
        self.stage.wake()

    def deadline(self, now: float) -> float:
        """When its listener runs out of audio (not spoken yet: now, it is waiting)."""
        if self.started is None:
            return self.first_ready if self.first_ready is not None else now
        return self.started + self.delivered_s

    def poll(self) -> np.ndarray | str | None:
        """The next audio chunk, :data:`DONE`, or None for now (then wait on :attr:`event`, which
        is cleared by the reader before it looks, set by the stage and the token source)."""
        with self.stage.lock:
            if self.out:
                chunk = self.out.popleft()
                self.stage.wake()  # it may compute the next one
                return chunk
            if self.error is not None:
                raise self.error
            if self.finished:
                return DONE
            return None

    def cancel(self) -> None:
        """Stop (idempotent): no more chunks, the stream's caches freed."""
        with self.stage.lock:
            self.cancelled = True
            self.finished = True
        self.stage.token2wav.close(self.uuid)
        self.stage.forget(self)
        self.event.set()


class T2WStage:
    """Computes the token2wav of every open stream of one :class:`Token2Wav`, in one thread."""

    def __init__(self, token2wav: Token2Wav, max_unread: int = 2) -> None:
        self.token2wav = token2wav
        self.max_unread = max_unread  # chunks a reader may leave unread before its stream waits
        self.lock = threading.Lock()
        self.group_sizes: Counter[int] = Counter()  # streams per tick -> ticks
        self._streams: dict[Hashable, T2WStream] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def open(self, uuid: Hashable, source: TokenSource, prompt_token, prompt_feat, embedding,
             schedule: HopSchedule | None = None, seed: int | None = None) -> T2WStream:
        self.token2wav.open(uuid, prompt_token, prompt_feat, embedding, schedule=schedule, mode="cached", seed=seed)
        stream = T2WStream(self, uuid, source)
        with self.lock:
            self._streams[uuid] = stream
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="t2w-stage", daemon=True)
                self._thread.start()
        self.wake()
        return stream

    def wake(self) -> None:
        self._wake.set()

    def owns(self, stream: T2WStream) -> bool:
        return self._streams.get(stream.uuid) is stream

    def forget(self, stream: T2WStream) -> None:
        with self.lock:
            if self.owns(stream):
                del self._streams[stream.uuid]

    def close(self) -> None:
        self._closed = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the stage's thread ---------------------------------------------------------------------
    def _ready_jobs(self, now: float) -> list[tuple[float, Job, T2WStream]]:
        """(deadline, job, stream) of every stream that can compute a chunk now."""
        ready = []
        with self.lock:
            streams = list(self._streams.values())
        for stream in streams:
            if stream.finished or len(stream.out) >= self.max_unread:
                continue
            try:
                if not stream.tokens_done:
                    tokens, stream.tokens_done = stream.source.take()
                    if tokens:
                        self.token2wav.push(stream.uuid, tokens)
                job = self.token2wav.next_job(stream.uuid, finished=stream.tokens_done)
            except KeyError:  # cancelled meanwhile
                continue
            except BaseException as e:  # the token source failed: so does this stream
                self._fail(stream, e)
                continue
            if job is None:
                continue
            if stream.first_ready is None:
                stream.first_ready = now
            ready.append((stream.deadline(now), job, stream))
        return ready

    def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            now = time.monotonic()
            ready = self._ready_jobs(now)
            if not ready:
                self._wake.wait()
                continue
            ready.sort(key=lambda item: item[0])  # most urgent first (the vocoder's groups keep this order)
            self._compute(ready)

    def _compute(self, ready: list[tuple[float, Job, T2WStream]]) -> None:
        """One tick: every ready job, the flow a chunk per round for all of them at once, each
        chunk delivered as soon as it is vocoded."""
        streams = {id(job): stream for _, job, stream in ready}
        self.group_sizes[len(ready)] += 1
        try:
            self.token2wav.run([job for _, job, _ in ready], lambda job, chunk: self._deliver(streams[id(job)], job, chunk))
        except BaseException as e:  # a broken step fails the streams in it, not the stage
            log.exception("token2wav step failed")
            for _, _, stream in ready:
                if not stream.finished:
                    self._fail(stream, e)

    def _deliver(self, stream: T2WStream, job: Job, chunk: np.ndarray | None) -> None:
        now = time.monotonic()
        with self.lock:
            if stream.cancelled:
                return
            if chunk is not None and len(chunk):
                stream.out.append(chunk)
                if stream.started is None:
                    stream.started = now
                stream.delivered_s += len(chunk) / self.token2wav.hift.cfg.sampling_rate
            if job.hop is None:
                stream.finished = True
                if self.owns(stream):
                    del self._streams[stream.uuid]
        stream.event.set()

    def _fail(self, stream: T2WStream, error: BaseException) -> None:
        with self.lock:
            stream.error = error
            stream.finished = True
            if self.owns(stream):
                del self._streams[stream.uuid]
        self.token2wav.close(stream.uuid)
        stream.event.set()
