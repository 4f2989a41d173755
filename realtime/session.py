"""asyncio glue for one WebSocket: frames in → :class:`Protocol` → engine syntheses → frames out.

Everything protocol-shaped is decided by :mod:`realtime.protocol`; this module only moves bytes,
owns the tasks, and makes sure that whatever happens (end, cancel, disconnect, a client that stops
reading, a context or a socket left idle) every context's engine stream is stopped, its buffers
are dropped and its admission place is given back.  One watchdog per session keeps every timeout
(a send the client does not take, a context with no text, a socket with no message or ping).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .admission import Admission
from .audio.encoders import make_encoder
from .engines.base import Cancelled, Engine, Finished, Flushed, SynthesisOptions
from .lifecycle import RETRY_AFTER_MS, Lifecycle
from .metrics import Metrics
from .protocol import (
    CancelContext,
    Close,
    EndContext,
    FlushContext,
    OpenContext,
    Protocol,
    PushText,
    Send,
    floor_ms,
)
from .synthesis import Audio, LanguageWarning, Mark, Synthesis, Unspeakable

log = logging.getLogger("realtime.session")

_FRAMES_PER_YIELD = 25  # 0.5 s of 20 ms frames: a paced batch, lead included, goes out in one piece
_PACING_MARGIN = 0.03  # seconds: a paced session wakes this much before its next frame is due


@dataclass(frozen=True)
class Runtime:
    """What every session shares: the engine, admission and the service limits."""

    engine: Engine
    admission: Admission
    buffer_seconds: float = 1.0
    frame_ms: int = 20
    send_timeout: float = 10.0  # a client that takes longer than this to accept a frame is dropped
    idle_timeout: float = 300.0  # no message (pings count) and no open context for this long → close
    context_idle_timeout: float = 30.0  # an open context with no text and no audio for this long → ended
    realtime_lead_ms: int = 300
    realtime_batch_ms: int = (
        100  # paced frames go out between lead and lead + batch + margin ahead (see _Pacer)
    )
    lifecycle: Lifecycle = field(default_factory=Lifecycle)  # serving or draining, and the open sessions
    metrics: Metrics = field(default_factory=Metrics)


class ClientGone(Exception):
    """The client disconnected or stopped reading; the session ends."""


class ContextRunner:
    """One context: its synthesis and the task that encodes and sends its audio."""

    def __init__(
        self, session: Session, context_id: str, options: SynthesisOptions, previous: ContextRunner | None
    ) -> None:
        self.session = session
        self.id = context_id
        rt = session.rt
        self.synthesis = Synthesis(
            rt.engine, options, rt.admission, session.protocol.session_id, rt.buffer_seconds, rt.metrics
        )
        self.previous = previous  # binary transport: speak after this one
        self.finished = asyncio.Event()  # done/cancelled/error frame sent (or abandoned)
        self.ended = False  # the client sent `end`: no more input will come
        self.first_text_at: float | None = None
        self.first_audio_at: float | None = None
        self._stalled_s = 0.0  # how long a listener would have stalled so far (underruns)
        self._audio_end_s = 0.0  # where the audio sent so far ends on the playback clock
        self.last_activity = session.loop.time()  # last input from the client or audio to it
        self._unyielded = 0  # frames sent since this task last let the loop run
        self.task = session.loop.create_task(self._run(), name=f"context-{context_id}")

    # called from the session's receive loop
    def push(self, text: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.last_activity = self.session.loop.time()
        self.synthesis.push(text)

    def flush(self) -> None:
        self.last_activity = self.session.loop.time()
        self.synthesis.flush()

    def end(self) -> None:
        self.ended = True
        self.synthesis.end()

    def idle_for(self, now: float) -> float:
        """Seconds this context has waited on its client: no input and no audio, not ended."""
        if self.ended or (self.previous is not None and not self.previous.finished.is_set()):
            return 0.0
        return now - self.last_activity

    def stop(self) -> None:
        """Stop synthesis and sending now (synchronous); :meth:`wait` for the task to end."""
        self.synthesis.close()
        self.task.cancel()

    async def wait(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def cancel(self) -> None:
        self.stop()
        await self.wait()

    async def _run(self) -> None:
        s = self.session
        outcome = "error"
        try:
            if self.previous is not None:  # binary frames carry no context id: one context speaks at a time
                await self.previous.finished.wait()
                self.last_activity = s.loop.time()
            outcome = await self._pump()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except ClientGone:
            outcome = "disconnected"
        except Cancelled:
            outcome = "cancelled"
        except Exception:  # a bug in encoding/sending must cost this context only, never the session
            log.exception("context %s failed", self.id)
            with contextlib.suppress(ClientGone):
                await s.send_text(s.protocol.failed(self.id, "internal", "synthesis failed"))
            s.rt.metrics.errors.labels("internal").inc()
        finally:
            self.synthesis.close()  # synchronous: engine stopped, buffer dropped, place given back
            self.finished.set()
            s.rt.metrics.contexts.labels(outcome).inc()

    async def _pump(self) -> str:
        s = self.session
        out = s.protocol.output
        encoder = make_encoder(
            out.format, s.protocol.sample_rate, out.container, s.rt.engine.sample_rate, frame_ms=s.rt.frame_ms
        )
        pacer = _Pacer(
            out.pacing == "realtime",
            s.rt.realtime_lead_ms / 1000,
            s.rt.realtime_batch_ms / 1000,
            s.rt.metrics,
        )
        async with contextlib.aclosing(self.synthesis.deliver(encoder)) as deliveries:
            async for item in deliveries:
                if isinstance(item, Audio):
                    self._playback_check(item)
                    step = item.seconds / max(1, len(item.frames))
                    for k, frame in enumerate(item.frames):
                        # frame k's start on the playback clock, spreading the chunk evenly: exact for
                        # PCM, and never later than the truth when a container header comes first
                        if await pacer.wait(item.start_s + k * step):
                            self._unyielded = 0
                        await self._send_audio(frame)
                        pacer.sent()
                    self.last_activity = s.loop.time()
                    if item.words:  # after the frames holding their ends
                        await s.send_text(s.protocol.words(self.id, item.words))
                elif isinstance(item, Mark):
                    await s.send_text(s.protocol.mark(self.id, item.text_offset, item.audio_ms))
                elif isinstance(item, Flushed):
                    await s.send_text(s.protocol.flushed(self.id))
                elif isinstance(item, LanguageWarning):
                    await s.send_text(s.protocol.warning(self.id, item.code, item.message, item.fields))
                elif isinstance(item, Finished):
                    stats = self._stats(encoder.samples_out * 1000 / encoder.sample_rate)
                    await s.send_text(s.protocol.done(self.id, stats))
                    if stats["rtf"] is not None:
                        s.rt.metrics.rtf.observe(stats["rtf"])
                    if self.first_audio_at is not None and self._audio_end_s > 0:
                        s.rt.metrics.delivery.observe(
                            (time.perf_counter() - self.first_audio_at) / self._audio_end_s
                        )
                    return "done"
                else:
                    await s.send_text(
                        s.protocol.failed(
                            self.id,
                            item.code,
                            item.message,
                            item.retry_after_ms,
                            item.fields if isinstance(item, Unspeakable) else None,
                        )
                    )
                    return "overloaded" if item.code == "overloaded" else "error"
        return "error"

    def _playback_check(self, item: Audio) -> None:
        """Count an underrun when this audio leaves later than a listener who started playing at
        the first audio needs it (the listener then stalls until it arrives)."""
        if item.seconds <= 0:
            return
        if self.first_audio_at is not None:
            needed_at = self.first_audio_at + item.start_s + self._stalled_s
            late = time.perf_counter() - needed_at
            if late > 0.005:
                self.session.rt.metrics.underruns.inc()
                self._stalled_s += late
        self._audio_end_s = item.start_s + item.seconds

    async def _send_audio(self, frame: bytes) -> None:
        data = self.session.protocol.audio(self.id, frame)
        if data is None:
            return
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
            if self.first_text_at is not None:
                self.session.rt.metrics.ttfa.observe(self.first_audio_at - self.first_text_at)
        await self.session.send(data)
        self.session.rt.metrics.frames_sent.inc()
        self.session.rt.metrics.bytes_sent.inc(len(frame))
        # a send into a writable socket does not suspend: yield every few frames so that a burst
        # cannot delay other sessions or this socket's own cancel (yielding after every frame cost
        # a loop iteration per frame)
        self._unyielded += 1
        if self._unyielded >= _FRAMES_PER_YIELD:
            self._unyielded = 0
            await asyncio.sleep(0)

    def _stats(self, audio_ms: float) -> dict:
        """``audio_ms``: the audio this client got (at its rate, so a resampler's rounding never
        makes it longer than what arrived)."""
        wall_ms = self.synthesis.synth_seconds * 1000
        compute_ms = self.synthesis.compute_seconds * 1000
        ttfa = None
        if self.first_audio_at is not None and self.first_text_at is not None:
            ttfa = round((self.first_audio_at - self.first_text_at) * 1000, 1)
        return {
            "ttfa_ms": ttfa,
            "audio_ms": floor_ms(audio_ms),
            "wall_ms": round(wall_ms, 1),  # engine opened -> last audio, waiting for streamed text included
            "compute_ms": round(compute_ms, 1),  # model time spent on it (its share of batched calls)
            "rtf": round(compute_ms / audio_ms, 3)
            if audio_ms
            else None,  # compute / audio: a real-time factor
            "synth_ms": round(wall_ms, 1),  # deprecated: the old name of wall_ms, kept for one release
        }


class _Pacer:
    """``realtime`` pacing: every frame leaves by ``lead`` seconds before its playback time (its
    due time), and none leaves more than ``batch + margin`` before that.

    Frames are released in batches: when the next frame is not yet due, the session sleeps until
    ``margin`` before its due time, then releases it and every frame due within ``batch`` after
    it.  One wake-up per batch instead of one per 20 ms frame is what makes hundreds of paced
    sessions affordable, and the margin absorbs a busy loop's wake-up latency.
    """

    def __init__(
        self,
        enabled: bool,
        lead: float,
        batch: float,
        metrics: Metrics | None = None,
        margin: float = _PACING_MARGIN,
    ) -> None:
        self.enabled = enabled
        self.metrics = metrics
        self.lead = lead
        self.batch = batch
        self.margin = margin
        self.t0: float | None = None
        self.due = 0.0  # the last frame's due time
        self._release_until = float("-inf")  # frames due by then go without waiting

    def sent(self) -> None:
        """Record how late the frame just sent left (the service's frame send delay)."""
        if self.enabled and self.metrics is not None:
            self.metrics.pacing_lateness.observe(max(0.0, time.perf_counter() - self.due))

    async def wait(self, start_s: float) -> bool:
        """Hold until the frame starting at ``start_s`` (playback clock) may go; True if it slept."""
        if not self.enabled:
            return False
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        # the first `lead` of audio is due at once
        self.due = due = self.t0 + max(0.0, start_s - self.lead)
        if due <= self._release_until:
            return False
        self._release_until = due + self.batch
        delay = due - self.margin - now
        if delay <= 0:
            return False
        await asyncio.sleep(delay)
        return True


class Session:
    """One WebSocket.  ``receive`` and ``send_raw`` are the only I/O it does, so tests and other
    transports can drive it with plain callables.  ``activity``, when given, returns the loop time
    of the client's last sign of life, WebSocket pings included (a pooled connection idle between
    turns pings and is not idle); without it only messages count."""

    def __init__(
        self,
        rt: Runtime,
        protocol: Protocol,
        receive: Callable[[], Awaitable[str | bytes | None]],
        send_raw: Callable[[str | bytes], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        activity: Callable[[], float] | None = None,
    ) -> None:
        self.rt = rt
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()
        self._receive = receive
        self._send_raw = send_raw
        self._close = close
        self._activity = activity
        self._last_message = self.loop.time()
        self._send_lock = asyncio.Lock()
        self.runners: dict[str, ContextRunner] = {}
        self._last_runner: ContextRunner | None = None
        self._closing = False
        self._close_with: tuple[int, str] | None = None  # close frame to attempt once torn down
        self._main: asyncio.Task | None = None
        self._sending: tuple[asyncio.Task, float] | None = None  # the send in progress and its start
        self._stalled: asyncio.Task | None = None  # the task whose send the watchdog gave up on
        self._watchdog: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()  # timeouts being reported
        self._idle_closing = False
        self._draining = False  # the service is draining: no new contexts, close once none is open
        self._going_away = False

    async def send(self, data: str | bytes) -> None:
        """Send one frame, failing the session if the client does not take it in time.

        The time limit is kept by :meth:`_watch`, not by a timeout around every send: a send into
        a writable socket never suspends, and arming and disarming a timer for each of thousands
        of frames a second was a large share of the loop's work.
        """
        if self._closing:
            raise ClientGone()
        async with self._send_lock:
            if self._closing:
                raise ClientGone()
            task = asyncio.current_task()
            self._sending = (task, self.loop.time())
            try:
                await self._send_raw(data)
            except asyncio.CancelledError:
                if self._stalled is task:  # the watchdog gave up on this send
                    task.uncancel()
                    raise ClientGone() from None
                raise
            except Exception:
                self._fail(None)
                raise ClientGone() from None
            finally:
                self._sending = None

    @property
    def _tick(self) -> float:
        """How often the watchdog looks: a quarter of the shortest timeout it keeps, within 50 ms..1 s."""
        shortest = min(self.rt.send_timeout, self.rt.idle_timeout, self.rt.context_idle_timeout)
        return min(1.0, max(0.05, shortest / 4))

    def _watch(self) -> None:
        """Every tick: close a client that has left a send blocked too long, end contexts that
        wait on their client for longer than the context timeout, close an idle session."""
        now = self.loop.time()
        sending = self._sending
        if sending is not None and now - sending[1] > self.rt.send_timeout:
            log.warning(
                "session %s: client did not read for %.1fs; closing",
                self.protocol.session_id,
                self.rt.send_timeout,
            )
            self._stalled = sending[0]
            self._fail((1008, "client is not reading"))  # cancels the main task unless it is the one stuck
            sending[0].cancel()
            return
        for runner in list(self.runners.values()):
            if runner.idle_for(now) > self.rt.context_idle_timeout:
                del self.runners[runner.id]  # once: the next tick must not expire it again
                runner.stop()  # now, not in the task: a teardown may cancel that before it runs
                self._spawn(self._expire(runner))
        last = max(self._last_message, self._activity() if self._activity is not None else 0.0)
        if (
            not self.runners
            and now - last > self.rt.idle_timeout
            and not self._closing
            and not self._idle_closing
        ):
            self._idle_closing = True
            self._spawn(self._idle_close())
        # keep watching: the frames that say why a context or the socket ends are sends too
        self._watchdog = self.loop.call_later(self._tick, self._watch)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, runner: ContextRunner) -> None:
        """A context that waited on its client too long (already stopped): say why."""
        await runner.wait()
        with contextlib.suppress(ClientGone):
            await self.send_text(
                self.protocol.failed(
                    runner.id,
                    "timeout",
                    f"no text for {self.rt.context_idle_timeout:g} s: context ended "
                    "(send end when an utterance is complete)",
                )
            )

    # -- draining (realtime.lifecycle) ----------------------------------------------------------
    def drain(self) -> None:
        self._draining = True
        if not self.runners:
            self.go_away()

    def go_away(self) -> None:
        if not self._going_away and not self._closing:
            self._going_away = True
            self._spawn(self._go_away())

    async def _go_away(self) -> None:
        with contextlib.suppress(ClientGone):
            await self.send_text(
                self.protocol.error_frame(
                    "going_away",
                    "the server is shutting down: reconnect (another replica will answer)",
                    fatal=True,
                    retry_after_ms=RETRY_AFTER_MS,
                )
            )
        self._fail((1001, "going away"))

    async def _idle_close(self) -> None:
        with contextlib.suppress(ClientGone):
            await self.send_text(
                self.protocol.error_frame(
                    "timeout", f"no message for {self.rt.idle_timeout:g} s: closing", fatal=True
                )
            )
        self._fail((1000, "idle timeout"))

    def _fail(self, close_with: tuple[int, str] | None) -> None:
        """The client is gone, stuck or idle: stop the receive loop too, wherever it is waiting."""
        self._closing = True
        self._close_with = close_with
        if (
            self._main is not None
            and self._main is not asyncio.current_task()
            and self._stalled is not self._main
        ):
            self._main.cancel()

    async def send_text(self, frame: str | None) -> None:
        if frame is not None:
            await self.send(frame)

    async def run(self) -> None:
        self.rt.metrics.sessions_active.inc()
        self.rt.metrics.sessions_total.inc()
        self._main = asyncio.current_task()
        self.rt.lifecycle.join(self)
        self._watchdog = self.loop.call_later(self._tick, self._watch)
        try:
            while not self._closing:
                msg = await self._receive()
                if msg is None:  # disconnected
                    return
                self._last_message = self.loop.time()
                events = (
                    self.protocol.receive_bytes(msg)
                    if isinstance(msg, bytes)
                    else self.protocol.receive_text(msg)
                )
                for ev in events:
                    if not await self._apply(ev):
                        return
        except ClientGone:
            return
        except asyncio.CancelledError:
            if not self._closing:  # not ours (server shutdown): let it propagate after cleanup
                raise
            self._main.uncancel()  # ours: the session ends normally
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._teardown()
            self.rt.lifecycle.leave(self)
            self.rt.metrics.sessions_active.dec()
            if self._close_with is not None:
                await self._abort(*self._close_with)

    async def _apply(self, ev) -> bool:
        if isinstance(ev, Send):
            if ev.error is not None:
                self.rt.metrics.errors.labels(ev.error).inc()
            await self.send(ev.data)
        elif isinstance(ev, Close):
            await self._abort(ev.code, ev.reason)
            return False
        elif isinstance(ev, OpenContext) and self._draining:
            self.rt.metrics.errors.labels("going_away").inc()
            await self.send_text(
                self.protocol.failed(
                    ev.context_id,
                    "going_away",
                    "the server is shutting down: no new contexts on this socket; reconnect",
                    RETRY_AFTER_MS,
                )
            )
        elif isinstance(ev, OpenContext):
            options = ev.options
            previous = self._last_runner if self.protocol.output.audio_transport == "binary" else None
            if previous is not None and previous.finished.is_set():
                previous = None
            runner = ContextRunner(self, ev.context_id, options, previous)
            self.runners[ev.context_id] = runner
            self._last_runner = runner
            runner.task.add_done_callback(lambda _t, r=runner: self._forget(r))
        elif isinstance(ev, (PushText, FlushContext, EndContext)):
            runner = self.runners.get(ev.context_id)
            if runner is None:  # it already failed and said so; the protocol has forgotten it too
                return True
            if isinstance(ev, PushText):
                runner.push(ev.text)
            elif isinstance(ev, FlushContext):
                runner.flush()
            else:
                runner.end()
        elif isinstance(ev, CancelContext):
            runner = self.runners.pop(ev.context_id, None)
            if runner is not None:
                await runner.cancel()
            await self.send_text(self.protocol.cancelled(ev.context_id))
        return True

    def _forget(self, runner: ContextRunner) -> None:
        if self.runners.get(runner.id) is runner:
            del self.runners[runner.id]
        if self._draining and not self.runners:
            self.go_away()

    async def _abort(self, code: int, reason: str) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._close(code, reason)

    async def _teardown(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        runners = list(self.runners.values())
        for r in runners:
            r.stop()
        for r in runners:
            await r.wait()
        self.runners.clear()
        self._last_runner = None
