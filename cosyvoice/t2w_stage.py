"""The token2wav stage: one thread per model and device turns the speech tokens of every stream
into audio, batching what can be batched (continuous batching, like the LM stage).

Each tick is one round (:class:`~cosyvoice.token2wav.Rounds`): every stream with a job in
progress or a chunk ready (a hop's tokens plus the lookahead, or the end) advances its flow one
25-token chunk, all of them in one estimator call per Euler step, whatever their hops; a chunk
whose flow is complete is vocoded at the end of the round with the others of as many mel frames
(one vocoder call) and delivered at once.  Streams join between rounds, so a first chunk waits for
at most one round, never for another stream's whole 100-token hop.  Most urgent first: a stream's deadline is when its listener, who started playing at its first chunk,
runs out of audio; a stream that has not spoken yet is due at once.  A stream whose
reader has unread chunks waits (one slow reader never holds the others), and a stream's tokens
come from its token source (the LM stage's handle, or a fixed list) as the stage needs them.

Nothing a caller does waits for model work: :meth:`T2WStage.open` only registers the stream (its
flow prompt is computed by the stage's thread at its next tick) and :meth:`T2WStream.cancel`
only marks it (the stage frees its caches between chunks), so both may be called from an event
loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import numpy as np
import torch

from .config import device_stream, stream_event, wait_for
from .llm import Timings
from .token2wav import HopSchedule, Job, Rounds, Token2Wav

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

    def __init__(
        self,
        stage: T2WStage,
        uuid: Hashable,
        source: TokenSource,
        prompt: tuple,
        schedule: HopSchedule | None,
        seed: int | None,
        listener: Callable[[], None] | None,
    ) -> None:
        self.stage = stage
        self.uuid = uuid
        self.source = source
        self.listener = listener
        self.pending_open: tuple | None = (prompt, schedule, seed)  # until the stage has opened it
        self.out: deque[np.ndarray] = deque()  # chunks not yet read
        self.event = threading.Event()  # set whenever the reader may have something to do
        self.tokens_done = False  # the source will give no more tokens
        self.finished = False  # the final chunk is out (or the stream failed or was cancelled)
        self.cancelled = False
        self.error: BaseException | None = None
        self.busy = False  # a job of it is in the rounds
        self.compute_seconds = 0.0  # its share of the flow rounds and vocoder calls it was in
        self.first_ready: float | None = None  # when it first had a chunk to compute
        self.started: float | None = None  # when its first chunk was delivered
        self.delivered_s = 0.0  # seconds of audio delivered
        source.subscribe(self._changed)

    def _changed(self) -> None:  # the token source: the stage may compute, a reading thread may feed text
        self.event.set()
        self.stage.wake()

    def signal(self) -> None:
        """Tell the reader that :meth:`poll` may have something new."""
        self.event.set()
        if self.listener is not None:
            self.listener()

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
        """Stop (idempotent, never waits for a chunk being computed): no more chunks; the stage
        frees the stream's caches before its next chunk."""
        with self.stage.lock:
            if self.cancelled:
                return
            self.cancelled = True
            self.finished = True
            self.out.clear()
        self.stage.token2wav.cancel(self.uuid)
        self.stage.wake()
        self.event.set()


class T2WStage:
    """Computes the token2wav of every open stream of one :class:`Token2Wav`, in one thread."""

    def __init__(
        self, token2wav: Token2Wav, max_unread: int = 2, slack: float = 1.0, threads: int | None = None
    ) -> None:
        self.token2wav = token2wav
        self.threads = threads  # torch intra-op threads of the stage's thread (None: leave as is)
        self.max_unread = max_unread  # chunks a reader may leave unread before its stream waits
        # a stream whose listener has more than this many seconds of audio left sits out the
        # rounds while others have less (a round's cost grows with its streams)
        self.slack = slack
        self.lock = threading.Lock()
        self.group_sizes: Counter[int] = Counter()  # streams per round -> rounds
        self.round_seconds = Timings()  # how long each flow round took
        self._rounds = Rounds(token2wav)
        self._jobs: dict[int, T2WStream] = {}  # id(job) -> its stream, for the jobs in the rounds
        self._vocoding: dict[int, T2WStream] = {}  # the same, for the jobs handed to the vocoder
        self._streams: dict[Hashable, T2WStream] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._vocoder: threading.Thread | None = None
        self._to_vocode: list[tuple[Job, torch.Tensor]] = []  # flow done, for the vocoder's thread
        self._flow_events: list = []  # on CUDA: after the flow work that wrote those mels
        self._vocoder_wake = threading.Condition()
        self._closed = False

    def open(
        self,
        uuid: Hashable,
        source: TokenSource,
        prompt_token,
        prompt_feat,
        embedding,
        schedule: HopSchedule | None = None,
        seed: int | None = None,
        listener: Callable[[], None] | None = None,
    ) -> T2WStream:
        """Register a stream (cheap: its flow prompt is computed in the stage's thread).
        ``listener`` is called, from any thread and without blocking, whenever its reader may have
        something new to :meth:`~T2WStream.poll`."""
        stream = T2WStream(
            self, uuid, source, (prompt_token, prompt_feat, embedding), schedule, seed, listener
        )
        with self.lock:
            if uuid in self._streams:
                raise ValueError(f"stream {uuid!r} is already open")
            if not self._has_room():
                raise self.token2wav.full()
            self._streams[uuid] = stream
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="t2w-stage", daemon=True)
                self._vocoder = threading.Thread(target=self._run_vocoder, name="t2w-vocoder", daemon=True)
                self._thread.start()
                self._vocoder.start()
        self.wake()
        return stream

    def wake(self) -> None:
        self._wake.set()

    def has_room(self) -> bool:
        """Another stream may open now (the token2wav memory budget, if any, holds it)."""
        with self.lock:
            return self._has_room()

    def _has_room(self) -> bool:  # under the lock
        limit = self.token2wav.max_streams
        return limit is None or len(self._streams) < limit

    def owns(self, stream: T2WStream) -> bool:
        return self._streams.get(stream.uuid) is stream

    def forget(self, stream: T2WStream) -> None:
        with self.lock:
            if self.owns(stream):
                del self._streams[stream.uuid]

    def close(self) -> None:
        self._closed = True
        self.wake()
        with self._vocoder_wake:
            self._vocoder_wake.notify()
        for thread in (self._thread, self._vocoder):
            if thread is not None:
                thread.join(timeout=10)

    # -- the stage's thread ---------------------------------------------------------------------
    def _open(self, stream: T2WStream) -> bool:
        """Open a newly registered stream's token2wav state (its flow prompt is computed here);
        False if it was cancelled or failed meanwhile."""
        (prompt_token, prompt_feat, embedding), schedule, seed = stream.pending_open
        stream.pending_open = None
        try:
            self.token2wav.open(
                stream.uuid, prompt_token, prompt_feat, embedding, schedule=schedule, mode="cached", seed=seed
            )
        except BaseException as e:
            self._fail(stream, e)
            return False
        return True

    def _ready_jobs(self, now: float) -> list[tuple[float, Job, T2WStream]]:
        """(deadline, job, stream) of every stream that can compute a chunk now; cancelled
        streams are dropped and their caches freed."""
        ready = []
        with self.lock:
            streams = list(self._streams.values())
        for stream in streams:
            if stream.cancelled:
                if not stream.busy:  # (a busy one is let go by the rounds first)
                    self.forget(stream)
                    self.token2wav.close(stream.uuid)  # no job of it in the rounds: never waits
                continue
            if stream.pending_open is not None and not self._open(stream):
                continue
            if stream.busy or stream.finished or len(stream.out) >= self.max_unread:
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
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        with device_stream(self.token2wav.flow_device):
            self._loop()

    def _run_vocoder(self) -> None:
        """The vocoder's thread: every chunk whose flow is done, chunks of as many frames in one
        call, while the flow goes on with the next round."""
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)
        with device_stream(self.token2wav.hift_device):
            while not self._closed:
                with self._vocoder_wake:
                    while not self._to_vocode and not self._closed:
                        self._vocoder_wake.wait()
                    done, self._to_vocode = self._to_vocode, []
                    events, self._flow_events = self._flow_events, []
                if not done:
                    continue
                wait_for(events, self.token2wav.hift_device, [mel for _, mel in done])
                self._vocode(done)
                self.wake()  # the flow's thread may start their next chunks

    def _vocode(self, done: list[tuple[Job, torch.Tensor]]) -> None:
        """Vocode the chunks whose flow is done, the most urgent first, delivering each vocoder
        call's audio as soon as it is made (a first chunk does not wait behind others' long hops)."""
        streams = {id(job): self._vocoding.pop(id(job)) for job, _ in done}
        now = time.monotonic()
        done.sort(key=lambda item: streams[id(item[0])].deadline(now))
        delivered: set[int] = set()
        started = time.perf_counter()

        def deliver(group: list[tuple[Job, np.ndarray]]) -> None:
            nonlocal started
            share = (time.perf_counter() - started) / len(group)
            for job, chunk in group:
                streams[id(job)].compute_seconds += share
                if job.hop is None:  # a final chunk: once its stream's state is freed (below)
                    continue
                self._deliver(streams[id(job)], job, chunk)
                delivered.add(id(job))
            started = time.perf_counter()

        try:
            chunks = self.token2wav.vocode(done, on_group=deliver)
        except BaseException as e:  # a broken call fails the streams in it, not the stage
            log.exception("vocoder step failed")
            for job, _ in done:  # (those already given a chunk too: their state is closed)
                streams[id(job)].busy = False
                self._fail(streams[id(job)], e)
            return
        for job, chunk in chunks:  # their locks are released now: the flow may take them again
            streams[id(job)].busy = False
            if id(job) not in delivered:  # final chunks: a reader told DONE finds the stream closed
                self._deliver(streams[id(job)], job, chunk)

    def _loop(self) -> None:
        rounds = self._rounds
        while not self._closed:
            self._wake.clear()
            rounds.drop_cancelled()
            self._release_jobs()
            ready = self._ready_jobs(time.monotonic())
            ready.sort(key=lambda item: item[0])  # most urgent first (the vocoder's groups keep this order)
            for _, job, stream in ready:
                try:
                    rounds.add(job)
                    stream.busy = True
                    self._jobs[id(job)] = stream
                except BaseException as e:
                    self._fail(stream, e)
            if not rounds:
                self._wake.wait()
                continue
            self._round()

    def _round(self) -> None:
        """The flow of one round of the jobs in progress; the chunks whose flow is done go to the
        vocoder's thread (their streams stay busy until they are delivered).  When some listener
        is about to run dry (or has not heard anything yet), only the streams within
        :attr:`slack` of running dry take part: the others have audio to play meanwhile."""
        rounds = self._rounds
        now = time.monotonic()
        due = {key: stream.deadline(now) - now for key, stream in self._jobs.items()}
        urgent = {key for key, left in due.items() if left <= self.slack}
        only = None if not urgent or len(urgent) == len(due) else (lambda job: id(job) in urgent)
        self.group_sizes[len(urgent) if only else len(rounds)] += 1
        streams = list(self._jobs.values())
        taking_part = [s for key, s in self._jobs.items() if only is None or key in urgent]
        t0 = time.perf_counter()
        try:
            done = rounds.advance(only)
        except BaseException as e:  # a broken step fails the streams in it, not the stage
            log.exception("token2wav step failed")
            self._jobs.clear()
            for stream in streams:
                stream.busy = False
                if not stream.finished:
                    self._fail(stream, e)
            return
        elapsed = time.perf_counter() - t0
        self.round_seconds.observe(elapsed)
        for stream in taking_part:  # the round's time, shared out evenly
            stream.compute_seconds += elapsed / len(taking_part)
        if done:
            for job, _ in done:
                self._vocoding[id(job)] = self._jobs.pop(id(job))
            event = stream_event(self.token2wav.flow_device)  # the mels are written once it is reached
            with self._vocoder_wake:
                self._to_vocode += done
                if event is not None:
                    self._flow_events.append(event)
                self._vocoder_wake.notify()
        self._release_jobs()

    def _release_jobs(self) -> None:
        """Streams whose job the rounds dropped (cancelled) are no longer busy."""
        in_rounds = {id(plan.job) for plan in self._rounds.plans}
        for key in [key for key in self._jobs if key not in in_rounds]:
            self._jobs.pop(key).busy = False

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
        stream.signal()

    def _fail(self, stream: T2WStream, error: BaseException) -> None:
        with self.lock:
            stream.error = error
            stream.finished = True
        self.token2wav.close(stream.uuid)  # its state first: then its place, which a new stream may take
        self.forget(stream)
        stream.signal()
