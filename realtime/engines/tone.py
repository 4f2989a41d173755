"""A trivial engine: one short tone per word.  Used by tests and the service-overhead benchmark,
where the cost of a real model would hide what the service itself costs."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from .base import (
    AudioChunk,
    BlockingEngine,
    End,
    Flush,
    Flushed,
    SynthesisOptions,
    TextStream,
    VoiceInfo,
    WordTime,
)

_WORD = re.compile(r"\S+\s")


class ToneEngine(BlockingEngine):
    """Each complete word (a run of non-space followed by a space) becomes ``word_ms`` of a sine
    whose pitch depends on the voice, so tests can tell the audio of two sessions apart; the
    sine is that word's time (its ``words``).
    ``step_delay`` simulates model time per word (seconds); ``capacity`` and ``compute_slots``
    are the admission and compute limits a test wants to exercise (a tone costs next to nothing)."""

    name = "tone"
    modes = ("sft",)

    def __init__(
        self,
        sample_rate: int = 24000,
        word_ms: int = 200,
        step_delay: float = 0.0,
        capacity: int = 1024,
        compute_slots: int | None = None,
    ) -> None:
        super().__init__()
        self.capacity = capacity
        self.compute_slots = compute_slots
        self.sample_rate = sample_rate
        self.word_ms = word_ms
        self.step_delay = step_delay
        self.default_voice = "a"
        self._pitch = {"a": 440.0, "b": 660.0}
        self._words: dict[tuple[float, int], np.ndarray] = {}
        self.active = 0  # syntheses running now: tests assert it drops to zero
        self.produced_samples = 0  # all audio ever yielded: tests check that backpressure stops it

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(id=v, name=f"tone {hz:.0f} Hz", language="en") for v, hz in self._pitch.items()]

    def _word(self, hz: float, phase: int) -> np.ndarray:
        """One word's tone (read-only).  Cached: a sine of whole hertz repeats every second, and
        the service-overhead benchmark should measure the service, not ``np.sin``."""
        key = (hz, phase % self.sample_rate)
        word = self._words.get(key)
        if word is None:
            word = self._words[key] = self._make_word(hz, phase)
            word.flags.writeable = False
        return word

    def _make_word(self, hz: float, phase: int) -> np.ndarray:
        n = self.sample_rate * self.word_ms // 1000
        t = (np.arange(n) + phase) / self.sample_rate
        env = np.minimum(1.0, np.minimum(np.arange(n), n - 1 - np.arange(n)) / (0.005 * self.sample_rate))
        return (0.3 * env * np.sin(2 * np.pi * hz * t)).astype(np.float32)

    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        import time

        hz = self._pitch[options.voice or self.default_voice]
        self.active += 1
        try:
            pending = ""
            consumed = 0  # characters of raw text already spoken
            phase = 0
            done = False
            while not done:
                item = text.get()
                force = False
                if isinstance(item, str):
                    pending += item
                elif isinstance(item, Flush):
                    force = True
                elif isinstance(item, End):
                    force = done = True
                # (offset in pending, word with its trailing space) of every complete word
                words = [(m.start(), m.group()) for m in _WORD.finditer(pending)]
                spoken = words[-1][0] + len(words[-1][1]) if words else 0
                if force and pending[spoken:].strip():
                    tail = pending[spoken:]
                    words.append((spoken + len(tail) - len(tail.lstrip()), tail.lstrip()))
                if force:
                    spoken = len(pending)
                for at, w in words:
                    text.check()
                    if self.step_delay:
                        time.sleep(self.step_delay)
                    audio = self._word(hz, phase)
                    # the tone is the word: it is heard for the whole chunk
                    start = consumed + at
                    word = WordTime(start, start + len(w.rstrip()), 0.0, len(audio) / self.sample_rate)
                    self.produced_samples += len(audio)
                    yield AudioChunk(audio, text_offset=start + len(w), words=(word,))
                    phase += self.sample_rate * self.word_ms // 1000
                consumed += spoken
                pending = pending[spoken:]
                if isinstance(item, Flush):
                    yield Flushed()
        finally:
            self.active -= 1
