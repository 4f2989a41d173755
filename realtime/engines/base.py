"""The contract between the service and a synthesis engine.

The service knows nothing of model internals and the engines know nothing of WebSockets: a session
pushes text into a :class:`TextStream` from the event loop, and the engine pulls from it in a worker
thread and yields :class:`AudioChunk` / :class:`Flushed` events.  The stream is the only object both
sides touch, so it is the one place that needs locking.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


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
    """Thread-safe queue of text deltas for one utterance.

    ``get`` blocks on a condition variable (no polling) and raises :class:`Cancelled` as soon as
    ``cancel`` is called, so an engine waiting for text unblocks at once on barge-in.  ``offset``
    counts the characters handed out so far, which lets an engine report what part of the text its
    audio covers.
    """

    def __init__(self) -> None:
        self._items: deque[str | Flush | End] = deque()
        self._cond = threading.Condition()
        self._cancelled = False
        self._ended = False
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
            if not self._cond.wait_for(lambda: self._items or self._cancelled, timeout):
                return None
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


@dataclass
class AudioChunk:
    """Mono float32 samples at the engine's ``sample_rate``.

    ``text_offset``, when set, says that the context's text up to that character (of the raw text
    the client sent) is fully spoken once this chunk has played; the service turns it into a
    ``mark`` message.
    """

    samples: np.ndarray
    text_offset: int | None = None


@dataclass(frozen=True)
class Flushed:
    """All audio for the text before a :data:`FLUSH` has been yielded."""


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


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    name: str
    language: str
    kind: str = "builtin"  # builtin | sft | zero_shot
    description: str = ""


class Engine(ABC):
    """One model shared by every session; ``synthesize`` runs once per context, in a worker thread."""

    name: str = "engine"
    sample_rate: int = 24000
    default_voice: str | None = None
    modes: tuple[str, ...] = ("sft",)

    @abstractmethod
    def voices(self) -> list[VoiceInfo]: ...

    def validate(self, options: SynthesisOptions) -> None:
        """Raise :class:`EngineError` for options this engine cannot honour (cheap, event-loop safe)."""
        if options.mode not in self.modes:
            raise EngineError("bad_request", f"mode {options.mode!r} is not supported by engine {self.name!r}")
        if options.voice is not None and options.voice not in {v.id for v in self.voices()}:
            raise EngineError("unknown_voice", f"unknown voice {options.voice!r}")

    @abstractmethod
    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        """Yield audio while pulling text from ``text``.

        Must call ``text.check()`` (or block in ``text.get``) at least once per synthesis step so
        that a cancel stops the work within one step, and must free every per-utterance cache on
        return, exception or ``GeneratorExit``.
        """

    def close(self) -> None:
        """Release shared resources at server shutdown."""
