"""The default voice's word times read independently of the engine's own word-timing code, for the
tests and the word-timing benchmark: every chunk the engine makes is recorded with its model call
(phoneme ids, audio, the durations the graph exposes), the ids are decoded back to symbols, words
are the runs of symbols between spaces and punctuation, and a word lasts from its first symbol's
first frame to the end of its last symbol's PAD, frames times hop, shifted by where the trim cut
the model's audio (found by matching samples) and by the chunks before it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from realtime.engines import piper
from realtime.text import spans

_NOT_LETTERS = " ,.;:!?\"'“”‘’()—–-…"


def decoded_word_frames(
    ids: list[int], durations: np.ndarray, id_map: dict[str, list[int]]
) -> list[tuple[float, float]]:
    """(first frame, end frame) of every word of one model call: the ids decoded back to symbols
    (BOS, PAD, then symbol and PAD pairs, EOS), words split at spaces with punctuation dropped."""
    symbol = {v[0]: k for k, v in id_map.items()}
    assert len(ids) % 2 == 1 and symbol[ids[0]] == "^" and symbol[ids[-1]] == "$"
    starts = np.concatenate([[0], np.cumsum(durations)])
    words, current = [], None
    for i in range(2, len(ids) - 1, 2):
        letter = symbol[ids[i]] not in _NOT_LETTERS
        if letter and current is None:
            current = [float(starts[i]), float(starts[i + 2])]
        elif letter:
            current[1] = float(starts[i + 2])
        elif current is not None:
            words.append((current[0], current[1]))
            current = None
    if current is not None:
        words.append((current[0], current[1]))
    return words


def trim_offset(raw: np.ndarray, chunk: np.ndarray) -> int:
    """Where the chunk's audio starts in the model's output (found by matching samples)."""
    probe = chunk[:64]
    for k in range(len(raw) - 63):
        if np.array_equal(raw[k : k + 64], probe):
            return k
    raise AssertionError("chunk not found in the model's audio")


def spoken_words_per_source_word(text: str) -> list[tuple[int, int, int]]:
    """(start, end, IPA words it becomes) of every spoken source word, from the text front end's
    spans and the G2P: how many of the decoded words make one source word."""
    out = []
    for s in spans(text):
        if not any(c.isalnum() for c in s.spoken):
            continue
        source = text[s.start : s.end]
        if s.spoken == source:  # kept as written: its words are words of their own
            out += [(s.start + m.start(), s.start + m.end(), 1) for m in re.finditer(r"[\w'’-]+", source)]
        else:
            out.append((s.start, s.end, len(piper.phonemize(s.spoken).split())))
    return out


@dataclass
class Made:
    """One chunk the engine made and the model call behind it."""

    ids: list[int]
    raw: np.ndarray
    durations: np.ndarray
    samples: np.ndarray
    tail_s: float


@contextlib.contextmanager
def recording_chunks() -> Iterator[list[Made]]:
    """Every chunk any default-voice engine makes while inside, in order (one context at a time)."""
    made: list[Made] = []
    real = piper.SegmentSpeech.chunk

    def chunk(self, call, raw, durations=None):
        out = real(self, call, raw, durations)
        made.append(Made(list(call.ids), raw, durations, out.samples, call.tail_s))
        return out

    piper.SegmentSpeech.chunk = chunk
    try:
        yield made
    finally:
        piper.SegmentSpeech.chunk = real


def reference_words(made: list[Made], text: str, id_map: dict[str, list[int]], rate: int):
    """(start, end, start_ms, end_ms) of every spoken source word of ``text`` on the context's
    audio clock, from the recorded chunks alone."""
    decoded, at = [], 0
    for m in made:
        hop = len(m.raw) / float(np.sum(m.durations))
        cut = trim_offset(m.raw, m.samples) if len(m.samples) else 0
        voiced = len(m.samples) - int(m.tail_s * rate)
        for first, end in decoded_word_frames(m.ids, m.durations, id_map):
            start = min(max(0.0, first * hop - cut), voiced)
            finish = min(max(0.0, end * hop - cut), voiced)
            decoded.append(((at + start) * 1000 / rate, (at + finish) * 1000 / rate))
        at += len(m.samples)
    out, k = [], 0
    for start, end, n in spoken_words_per_source_word(text):
        out.append((start, end, decoded[k][0], decoded[k + n - 1][1]))
        k += n
    assert k == len(decoded), "the decoded words do not add up to the text's"
    return out
