"""The contract between the service and a synthesis engine.

The service knows nothing of model internals and the engines know nothing of WebSockets.  A
context is one :class:`EngineStream`: the service opens it with the context's options and an
:class:`AudioSink`, pushes text, flush, end and cancel into it from the event loop (every call
returns at once), and the engine puts audio and acknowledgements into the sink from whatever
thread computes them.

Nothing here holds a thread or a model slot for a context that is waiting for text: an engine
computes for a stream only when it has text to speak and its sink has room.  Engines written as
one blocking generator per utterance (:class:`BlockingEngine`) run behind an adapter that gives a
thread to each stream and takes a compute slot only while the generator is not waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("realtime.engines")


class EngineError(Exception):
    """A request the engine refuses; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Cancelled(Exception):
    """Raised inside the engine's thread when its stream was cancelled: unwinds the synthesis."""


@dataclass(frozen=True)
class Flush:
    """Marker in a text stream: synthesise everything before it without waiting for more text."""


@dataclass(frozen=True)
class End:
    """Marker in a text stream: no more text will come."""


FLUSH = Flush()
END = End()


class TextStream:
    """Thread-safe queue of text deltas for one utterance of a :class:`BlockingEngine`.

    ``get`` blocks on a condition variable (no polling) and raises :class:`Cancelled` as soon as
    ``cancel`` is called, so an engine waiting for text unblocks at once on barge-in.  While it
    blocks it runs inside ``idle()``, a context manager the adapter uses to give the stream's
    compute slot back.  ``offset`` counts the characters handed out so far, which lets an engine
    report what part of the text its audio covers.
    """

    def __init__(self, idle: Callable[[], object] | None = None) -> None:
        self._items: deque[str | Flush | End] = deque()
        self._cond = threading.Condition()
        self._cancelled = False
        self._ended = False
        self._idle = idle
        self.offset = 0

    # -- producer side (event loop) --------------------------------------------------------
    def push(self, text: str) -> None:
        if not text:
            return
        with self._cond:
            if self._ended:
                raise RuntimeError("text pushed after end")
            self._items.append(text)
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            self._items.append(FLUSH)
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            if not self._ended:
                self._ended = True
                self._items.append(END)
                self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._items.clear()
            self._cond.notify_all()

    # -- consumer side (engine thread) -----------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        """Raise :class:`Cancelled` if the stream was cancelled; engines call it between steps."""
        if self._cancelled:
            raise Cancelled()

    def get(self, timeout: float | None = None) -> str | Flush | End | None:
        """Next delta or marker; ``None`` if ``timeout`` seconds pass with nothing new."""
        with self._cond:
            if self._items or self._cancelled:
                return self._take()
        if timeout == 0:
            return None
        # The wait happens outside any compute slot; the slot is taken back (outside the
        # condition's lock, so that a producer on the event loop never waits for it) once there
        # is something to compute.
        with self._idle() if self._idle is not None else _nothing():
            with self._cond:
                if not self._cond.wait_for(lambda: self._items or self._cancelled, timeout):
                    return None
                return self._take()

    def _take(self) -> str | Flush | End:  # under the lock, with an item or cancelled
        if self._cancelled:
            raise Cancelled()
        item = self._items.popleft()
        if isinstance(item, str):
            self.offset += len(item)
        return item

    def get_nowait(self) -> str | Flush | End | None:
        return self.get(timeout=0)

    def __iter__(self) -> Iterator[str | Flush]:
        """Deltas and flush markers until the end; for engines that need no timeout."""
        while True:
            item = self.get()
            if isinstance(item, End):
                return
            assert item is not None
            yield item


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass(frozen=True)
class WordTime:
    """When one word of the context's text is heard, as the model itself timed it.

    ``start``/``end`` are offsets into the raw text the client sent to the context (the
    concatenation of its deltas, end exclusive, counted like ``text_offset``), so a token the
    normaliser rewrote as several spoken words ("3:45") is one word.  ``start_s``/``end_s`` are
    seconds from the first sample of the chunk that carries the word: a word travels with the chunk
    holding its end (``end_s`` is at most that chunk's duration), and ``start_s`` is negative when
    the word began in an earlier chunk of the same stream.
    """

    start: int
    end: int
    start_s: float
    end_s: float


@dataclass
class AudioChunk:
    """Mono float32 samples at the engine's ``sample_rate``.

    ``text_offset``, when set, says that the context's text up to that character (of the raw text
    the client sent) is fully spoken once this chunk has played; the service turns it into a
    ``mark`` message.  ``words``: the words whose end this chunk's audio holds, in text order, for
    engines that can time words (see :class:`WordTime`); an engine that cannot leaves it empty.
    """

    samples: np.ndarray
    text_offset: int | None = None
    words: tuple[WordTime, ...] = ()


@dataclass(frozen=True)
class Flushed:
    """All audio for the text before a flush has been put."""


@dataclass(frozen=True)
class Finished:
    """The stream ended normally: all its audio has been put."""


@dataclass(frozen=True)
class Failed:
    """The stream gave up; ``code`` is one of the protocol's error codes."""

    code: str
    message: str
    retry_after_ms: int | None = None


Output = AudioChunk | Flushed | Finished | Failed


class AudioSink(ABC):
    """Where a stream's output goes, in order.  Thread-safe; nothing here blocks.

    Backpressure is the engine's to respect: it asks :meth:`has_room` before computing more for
    a stream and, when there is none, waits for the waker (called from any thread once the
    consumer has drained enough) instead of putting more.  A stream whose sink is full costs no
    compute, so one slow reader never stalls the others.
    """

    @abstractmethod
    def put(self, item: Output, samples: int = 0) -> bool:
        """Queue ``item`` (``samples`` of audio); False once the sink is closed (the stream is over)."""

    @abstractmethod
    def has_room(self) -> bool:
        """Whether the consumer wants more now; when not, the waker is called once it does."""

    @abstractmethod
    def set_waker(self, wake: Callable[[], None]) -> None:
        """``wake`` is called (from any thread) when a full sink has room again or is closed."""


@dataclass
class SynthesisOptions:
    """What a context asks of the engine; validated by the protocol before it gets here."""

    voice: str | None = None
    mode: str = "sft"
    prompt_text: str | None = None
    prompt_audio: bytes | None = None  # a WAV file's bytes
    instruct_text: str | None = None
    speed: float = 1.0
    token_hop_len: int | None = None
    seed: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")
SPEED_RANGE = (0.25, 4.0)


def check_options(
    options: SynthesisOptions, modes: Sequence[str], has_voice: Callable[[str | None], bool], engine: str
) -> None:
    """Raise :class:`EngineError` if ``options`` break a rule every engine shares.  The one place
    these rules live: the protocol applies them to a client's options before a context opens (as
    a typed error frame, on every route), and :meth:`Engine.validate` applies them again for
    callers that reach an engine directly."""
    if options.mode not in MODES:
        raise EngineError("bad_request", f"mode must be one of {list(MODES)}")
    if options.mode not in modes:
        raise EngineError(
            "bad_request",
            f"mode {options.mode!r} is not supported by engine {engine!r} (supported: {list(modes)})",
        )
    if not SPEED_RANGE[0] <= options.speed <= SPEED_RANGE[1]:
        raise EngineError("bad_request", f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}")
    if options.token_hop_len is not None and not 1 <= options.token_hop_len <= 200:
        raise EngineError("bad_request", "token_hop_len must be between 1 and 200")
    if options.voice is not None and options.mode == "sft" and not has_voice(options.voice):
        raise EngineError("unknown_voice", f"unknown voice {options.voice!r}; see GET /v1/voices")
    if options.mode != "sft" and options.prompt_audio is None and not has_voice(options.voice):
        raise EngineError("bad_request", f"mode {options.mode} needs prompt_audio (or a registered voice)")
    if options.mode == "zero_shot" and options.prompt_audio is not None and not options.prompt_text:
        raise EngineError(
            "bad_request", "zero_shot with prompt_audio needs prompt_text (the words spoken in it)"
        )
    if options.mode == "instruct2" and not options.instruct_text:
        raise EngineError("bad_request", "instruct2 needs instruct_text")


@dataclass(frozen=True)
class VoiceInfo:
    """``language`` is the voice's primary language; ``languages`` every language it speaks
    (codes as in :mod:`realtime.text.frontend`: "en", "zh", "ja", ...; default: the primary).
    Text in a script none of them is written in is not spoken, and the service says so."""

    id: str
    name: str
    language: str
    kind: str = "builtin"  # builtin | sft | zero_shot
    description: str = ""
    languages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.languages:
            object.__setattr__(self, "languages", (self.language.split("-")[0].lower(),))


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Distribution:
    """A histogram an engine keeps: ``counts`` maps an observed value (or a bucket's upper bound)
    to how often; ``total`` is the sum of the observations (None: sum of value x count)."""

    help: str
    counts: dict[float, int]
    buckets: tuple[float, ...] = BATCH_BUCKETS
    total: float | None = None


class EngineStream(ABC):
    """One utterance on an engine.  Every method is called from the event loop and returns at
    once; output goes to the stream's :class:`AudioSink`, ending with :class:`Finished` after
    ``end`` or :class:`Failed`.  Calls after ``cancel`` are ignored.

    ``compute_seconds``: model time spent on this stream so far (a batched call's time shared
    out among the streams in it), for its real-time factor; engines that cannot tell leave 0."""

    compute_seconds: float = 0.0

    @abstractmethod
    def push(self, text: str) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Speak everything pushed so far without waiting for more; answer with :class:`Flushed`."""

    @abstractmethod
    def end(self) -> None:
        """No more text: speak what is left, then :class:`Finished`."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop now and free every per-utterance cache; nothing more is put."""


class Engine(ABC):
    """One model shared by every session."""

    name: str = "engine"
    sample_rate: int = 24000
    default_voice: str | None = None
    modes: tuple[str, ...] = ("sft",)
    # How many streams may be speaking at once before those already admitted slow down: what the
    # service admits (``--max-streams`` overrides it).  Engines measure or estimate their own.
    capacity: int = 4
    # The most streams the engine can hold at all (memory it reserves per stream), which
    # ``--max-streams`` cannot raise: beyond it a stream could only fail.  None: no such limit.
    max_capacity: int | None = None

    @abstractmethod
    def voices(self) -> list[VoiceInfo]: ...

    def languages(self, voice: str | None) -> tuple[str, ...]:
        """The languages ``voice`` speaks (None: the default voice); () when the engine has no
        such voice, and then nothing is checked."""
        voices = self.voices()
        wanted = voice if voice is not None else self.default_voice
        for v in voices:
            if v.id == wanted:
                return v.languages
        return voices[0].languages if voices and voice is None else ()

    def validate(self, options: SynthesisOptions) -> None:
        """Raise :class:`EngineError` for options this engine cannot honour (cheap, event-loop safe)."""
        check_options(options, self.modes, lambda voice: any(v.id == voice for v in self.voices()), self.name)

    @abstractmethod
    def open(self, options: SynthesisOptions, sink: AudioSink) -> EngineStream:
        """Start a stream (non-blocking).  Options the engine can refuse cheaply raise
        :class:`EngineError` here; anything found later ends the stream with :class:`Failed`."""

    def stats(self) -> dict[str, float]:
        """Engine-specific figures for ``/metrics`` (name -> value; ``_total`` names are counters)."""
        return {}

    def distributions(self) -> dict[str, Distribution]:
        """Engine-specific histograms for ``/metrics`` (e.g. requests per batched step, step time)."""
        return {}

    def close(self) -> None:
        """Release shared resources at server shutdown."""


class ComputeSlots:
    """At most ``n`` streams computing at once (``None``: no limit), counted per holder so that a
    holder can give its slot back while it waits and take it again after."""

    def __init__(self, n: int | None) -> None:
        self._sem = threading.Semaphore(n) if n else None

    def acquire(self) -> None:
        if self._sem is not None:
            self._sem.acquire()

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()


class BlockingEngine(Engine):
    """An engine written as one blocking generator per utterance (``synthesize``).

    Each stream gets a thread of its own; it holds one of ``compute_slots`` while the generator
    runs and gives it back while it waits for text or for room in the sink, so that a context
    waiting for text never keeps another from computing.  (The thread itself stays: that is the
    price of the blocking style, which the tone engine and tests use.)
    """

    compute_slots: int | None = None

    def __init__(self) -> None:
        self._slots: ComputeSlots | None = None

    def open(self, options: SynthesisOptions, sink: AudioSink) -> EngineStream:
        self.validate(options)
        if getattr(self, "_slots", None) is None:
            self._slots = ComputeSlots(self.compute_slots)
        return _ThreadStream(self, options, sink, self._slots)

    @abstractmethod
    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        """Yield audio while pulling text from ``text``.

        Must call ``text.check()`` (or block in ``text.get``) at least once per synthesis step so
        that a cancel stops the work within one step, and must free every per-utterance cache on
        return, exception or ``GeneratorExit``.
        """


class _ThreadStream(EngineStream):
    """A :class:`BlockingEngine` generator in a thread of its own, behind the stream interface."""

    def __init__(
        self, engine: BlockingEngine, options: SynthesisOptions, sink: AudioSink, slots: ComputeSlots
    ) -> None:
        self.engine = engine
        self.options = options
        self.sink = sink
        self._slots = slots
        self._held = False
        self._room = threading.Event()
        sink.set_waker(self._room.set)
        self.text = TextStream(idle=self._idle)
        self.thread = threading.Thread(target=self._run, name=f"{engine.name}-stream", daemon=True)
        self.thread.start()

    def push(self, text: str) -> None:
        self.text.push(text)

    def flush(self) -> None:
        self.text.flush()

    def end(self) -> None:
        self.text.end()

    def cancel(self) -> None:
        self.text.cancel()
        self._room.set()

    def _hold(self, held: bool) -> None:
        if held != self._held:
            (self._slots.acquire if held else self._slots.release)()
            self._held = held

    @contextmanager
    def _idle(self) -> Iterator[None]:
        """Give the compute slot back for the body; take it again only if the body returns (an
        exception, such as a cancel, ends the stream without waiting for a slot)."""
        self._hold(False)
        yield
        self._hold(True)

    def _put(self, item: AudioChunk | Flushed) -> None:
        samples = len(item.samples) if isinstance(item, AudioChunk) else 0
        while not self.sink.has_room():
            self.text.check()
            with self._idle():
                self._room.wait()
                self._room.clear()
        self.text.check()
        if not self.sink.put(item, samples):
            raise Cancelled()

    def _run(self) -> None:
        gen = None
        self._hold(True)
        started = time.thread_time()  # this thread computes for this stream only
        try:
            if self.text.cancelled:
                return
            gen = self.engine.synthesize(self.text, self.options)
            for item in gen:
                self.compute_seconds = time.thread_time() - started
                self.text.check()
                self._put(item)
            self.sink.put(Finished())
        except Cancelled:
            pass
        except EngineError as e:
            self.sink.put(Failed(e.code, e.message))
        except Exception as e:  # the model broke: report it to this stream only
            log.exception("engine %s failed", self.engine.name)
            self.sink.put(Failed("internal", f"synthesis failed: {type(e).__name__}"))
        finally:
            try:
                if gen is not None:
                    gen.close()
            finally:
                self._hold(False)


class QueueSink(AudioSink):
    """A sink read by a thread (tests, benchmarks, scripts): ``get`` blocks for the next item and
    :meth:`items` iterates until the stream finishes.  ``capacity_samples`` None: never full."""

    def __init__(self, capacity_samples: int | None = None) -> None:
        self._cond = threading.Condition()
        self._items: deque[Output] = deque()
        self._samples = 0
        self._capacity = capacity_samples
        self._wake: Callable[[], None] | None = None
        self._closed = False

    def put(self, item: Output, samples: int = 0) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._items.append(item)
            self._samples += samples
            self._cond.notify_all()
            return True

    def has_room(self) -> bool:
        with self._cond:
            return self._capacity is None or self._samples < self._capacity or self._closed

    def set_waker(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
        if self._wake is not None:
            self._wake()

    def get(self, timeout: float | None = None) -> Output:
        """The next item; raises ``TimeoutError`` after ``timeout`` seconds without one."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise TimeoutError("no output from the engine")
            item = self._items.popleft()
            if isinstance(item, AudioChunk):
                self._samples -= len(item.samples)
        if self._wake is not None and self._capacity is not None and self._samples < self._capacity:
            self._wake()
        return item

    def items(self, timeout: float | None = None) -> Iterator[Output]:
        """Everything the stream puts, up to and including its :class:`Finished` or :class:`Failed`."""
        while True:
            item = self.get(timeout)
            yield item
            if isinstance(item, Finished | Failed):
                return
