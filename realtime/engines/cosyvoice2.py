"""The ``cosyvoice2`` engine: our CosyVoice2 on a model directory, fed by streamed LLM text.

One :class:`cosyvoice.CosyVoice2` (LM, flow, HiFT, frontend) is shared by every session, and its
two stages (the batched LM stage and the batched token2wav stage) do all the model work.  A
context is one or more *segments*: text up to a flush, or up to the end.  Each segment is one
bistream request with its own UUID (:class:`cosyvoice.model.SpeechStream`): deltas are normalised
and tokenized as they arrive (on the event loop: microseconds) and their ids pushed into the
request, so the LM generates speech while the text is still coming; audio chunks go into the
context's sink as the token2wav stage makes them.  A flush ends the segment's text, so the LM runs
its end phase and the vocoder its final flush; the next text starts a fresh segment with the same
prompt once the previous one has spoken.

A context holds no thread: its stream is a state machine advanced by whoever has news (the event
loop pushing text, a stage delivering audio, the sink draining), one at a time.  While it waits for
text or for its client to read, it costs a KV slot and nothing else.  Cancel stops the LM at its
next step and the token2wav stage before its next chunk; every cache is freed by the stages.

``--lm per-request`` keeps the previous path for comparison: a thread per context running the
LM and token2wav of its requests itself (:class:`~realtime.engines.base.BlockingEngine`).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
import secrets
import sys
import threading
import time
import uuid as uuid_lib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyvoice.lm_stage import LMHandle
from cosyvoice.model import DONE, flow_prompt
from cosyvoice.text import LANGUAGES

from .base import (
    END,
    FLUSH,
    AudioChunk,
    AudioSink,
    BlockingEngine,
    Distribution,
    End,
    EngineError,
    EngineStream,
    Failed,
    Finished,
    Flush,
    Flushed,
    SynthesisOptions,
    TextStream,
    VoiceInfo,
    WordTime,
)

log = logging.getLogger("realtime.engines.cosyvoice2")

VOICE_ID = re.compile(r"^[\w][\w .\-]{0,63}$")


def _one_thread() -> None:
    torch.set_num_threads(1)


def _is_zero_shot(entry: dict[str, Any]) -> bool:
    return "flow_prompt_speech_token" in entry


class CosyVoice2Engine(BlockingEngine):
    name = "cosyvoice2"
    sample_rate = 24000
    modes = ("sft", "zero_shot", "cross_lingual", "instruct2")

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "fp32",
        max_token_ratio: float = 20.0,
        min_tokens: int = 50,
        left_chunks: int | str | None = "auto",
        lm: str = "batched",
        prompt_cache_mb: float | str = "auto",
        t2w_budget_mb: float | str | None = "auto",
        kv_budget_mb: float = 2048,
        kv_max_slots: int = 32,
        cuda_graphs: bool | None = None,
        flow_slots: bool | None = None,
        flow_dtype: str = "fp32",
        lm_overlap: bool | None = None,
        warmup: bool = True,
        **kwargs: Any,
    ) -> None:
        from cosyvoice.api import CosyVoice2

        if kwargs:
            raise TypeError(f"unexpected engine option(s) {sorted(kwargs)}")
        super().__init__()
        self.cv = CosyVoice2(
            model_dir,
            device=device,
            dtype=dtype,
            max_token_ratio=max_token_ratio,
            min_tokens=min_tokens,
            left_chunks=left_chunks,
            lm=lm,
            prompt_cache_mb=prompt_cache_mb,
            t2w_budget_mb=t2w_budget_mb,
            kv_budget_mb=kv_budget_mb,
            kv_max_slots=kv_max_slots,
            cuda_graphs=cuda_graphs,
            flow_slots=flow_slots,
            flow_dtype=flow_dtype,
            lm_overlap=lm_overlap,
        )
        # Every stream's LM runs in the model's batched LM stage and its token2wav in the batched
        # token2wav stage, so admission counts the LM's KV slots and the streams the token2wav
        # budget holds (lm="per-request": a thread per stream runs its own LM and token2wav, as
        # before batching).
        self.capacity = self.max_capacity = self.cv.model.capacity
        t2w = self.cv.model.token2wav
        log.info(
            "cosyvoice2: flow window %s, up to %d MiB of token2wav state per stream, %d streams at once "
            "(%d KV slots)",
            "unbounded" if t2w.left_chunks is None else f"{t2w.left_chunks} chunks",
            t2w.max_stream_nbytes() >> 20,
            self.capacity,
            self.cv.model.lm_stage.pool.slots,
        )
        self.compute_slots = None
        # Off the event loop, bounded: analysing a prompt_audio (speaker embedding and speech
        # tokens) and the whole-utterance token2wav of speed != 1.
        # On a CPU the two stages share the cores (each stage thread sets its own intra-op thread
        # count: under OpenMP the count is per thread, and a thread that never sets it uses every
        # core).  This thread and the helpers take one core's worth each, so that a prompt being
        # analysed does not oversubscribe the cores under the stages.  (The per-request path's
        # stream threads keep torch's default, as they did before batching: one stream alone
        # uses every core.)
        on_cpu = self.cv.model.llm.speech_embedding.weight.device.type == "cpu"
        if on_cpu:
            _one_thread()
        self.helpers = ThreadPoolExecutor(
            max_workers=2,
            thread_name_prefix="cosyvoice2-helper",
            initializer=_one_thread if on_cpu else None,
        )
        # The two stage threads hand the GIL back and forth around every small op; at Python's
        # default 5 ms switch interval a stage that wants it back waits behind the other's Python
        # code (16 sessions on TINY: first audio p95 1.15-1.45 s, 0.94-1.01 s at 0.2 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
        self.sample_rate = self.cv.sample_rate
        # A context's text without flushes is spoken as segments (one request each) that end at the
        # first sentence end after segment_tokens[0] text tokens, or after segment_tokens[1] at any
        # pause or word (the official frontend splits its texts at 60-80 tokens): one request
        # holds about 70 s of speech in its KV slot, and a longer one would leave text unspoken.
        self.segment_tokens = (80, 120)
        if warmup and self.cv.model.lm_mode == "batched":  # before the server says it is ready
            from cosyvoice.lm_graphs import GraphCaptureFailed

            try:
                log.info("cosyvoice2: warm-up request in %.2f s", self.cv.model.warm_up())
            except GraphCaptureFailed as e:  # a setting this machine cannot run: say which, and stop
                self.close()
                raise ValueError(str(e)) from e
        sft = [v.id for v in self.voices() if v.kind == "sft"]
        self.default_voice = sft[0] if sft else None

    def close(self) -> None:
        self.helpers.shutdown(wait=False, cancel_futures=True)
        self.cv.model.close()

    def stats(self) -> dict[str, float]:
        model = self.cv.model
        lm, t2w = model.llm.stats, model.t2w_stage.group_sizes
        return {
            "cosyvoice_lm_calls_total": lm.calls,
            "cosyvoice_lm_requests_stepped_total": lm.requests,
            "cosyvoice_lm_rows_total": lm.rows,
            "cosyvoice_lm_graph_steps_total": 0
            if model.lm_stage.graphs is None
            else model.lm_stage.graphs.replays,
            "cosyvoice_flow_graph_rounds_total": model.token2wav.graph_rounds(),
            "cosyvoice_lm_rows_ahead_total": model.lm_stage.speculated,
            "cosyvoice_lm_rows_ahead_dropped_total": model.lm_stage.dropped,
            **self._flow_slot_stats(),
            "cosyvoice_kv_slots_free": model.lm_stage.free_slots,
            "cosyvoice_kv_slots": model.lm_stage.pool.slots,
            "cosyvoice_t2w_streams_max": model.capacity,
            "cosyvoice_t2w_stream_bound_bytes": model.token2wav.max_stream_nbytes(),
            "cosyvoice_flow_window_chunks": -1
            if model.token2wav.left_chunks is None
            else model.token2wav.left_chunks,
            "cosyvoice_t2w_calls_total": sum(t2w.values()),
            "cosyvoice_t2w_chunks_total": sum(size * n for size, n in t2w.items()),
            **self._prompt_cache_stats(),
        }

    def _flow_slot_stats(self) -> dict[str, float]:
        slots = self.cv.model.token2wav.slots
        if slots is None:
            return {}
        return {"cosyvoice_flow_slots": slots.slots, "cosyvoice_flow_slots_free": slots.free}

    def _prompt_cache_stats(self) -> dict[str, float]:
        prompts = self.cv.model.token2wav.prompts
        if prompts is None:
            return {}
        return {
            "cosyvoice_prompt_cache_hits_total": prompts.hits,
            "cosyvoice_prompt_cache_misses_total": prompts.misses,
            "cosyvoice_prompt_cache_bytes": prompts.nbytes(),
        }

    def distributions(self) -> dict[str, Distribution]:
        lm, t2w = self.cv.model.lm_stage, self.cv.model.t2w_stage
        return {
            "cosyvoice_lm_batch_size": Distribution("Requests per LM stage step", dict(lm.batch_sizes)),
            "cosyvoice_lm_step_seconds": Distribution(
                "Time of one LM stage step (all its requests)",
                dict(lm.step_seconds.counts),
                lm.step_seconds.BUCKETS,
                lm.step_seconds.total,
            ),
            "cosyvoice_t2w_round_size": Distribution(
                "Streams per token2wav flow round", dict(t2w.group_sizes)
            ),
            "cosyvoice_t2w_round_seconds": Distribution(
                "Time of one token2wav flow round (all its streams)",
                dict(t2w.round_seconds.counts),
                t2w.round_seconds.BUCKETS,
                t2w.round_seconds.total,
            ),
        }

    # -- voices ---------------------------------------------------------------------------------
    def _spk2info(self) -> dict[str, dict[str, Any]]:
        return self.cv.spkinfo()  # includes what other replicas sharing the directory registered

    def languages(self, voice: str | None) -> tuple[str, ...]:
        """Every voice of the model speaks the model's languages, a prompt given per request too."""
        return LANGUAGES

    def voices(self) -> list[VoiceInfo]:
        out = []
        for spk_id, entry in self._spk2info().items():
            if _is_zero_shot(entry):
                out.append(
                    VoiceInfo(spk_id, spk_id, "zh", "zero_shot", "registered zero-shot prompt", LANGUAGES)
                )
            else:
                out.append(VoiceInfo(spk_id, spk_id, "zh", "sft", "CosyVoice2 SFT speaker", LANGUAGES))
        return out

    def register_voice(self, voice_id: str, wav_bytes: bytes, prompt_text: str) -> VoiceInfo:
        """Analyse a prompt (WAV + the words spoken in it) and persist it in spk2info.pt."""
        if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
            raise EngineError("bad_request", "voice_id must be 1-64 letters, digits, spaces, '.', '_' or '-'")
        if not prompt_text or not prompt_text.strip():
            raise EngineError("bad_request", "prompt_text (the words spoken in prompt_wav) is required")
        if not wav_bytes:
            raise EngineError("bad_request", "prompt_wav is required")
        if voice_id in self._spk2info():
            raise EngineError("conflict", f"voice {voice_id!r} already exists")
        try:
            entry = self.cv.zero_shot_entry(prompt_text, wav_bytes)
        except Exception as e:
            raise EngineError("bad_request", f"prompt_wav could not be analysed: {e}") from None
        try:  # under spk2info.pt's file lock: replicas sharing the directory never overwrite each other
            self.cv.register_spk(voice_id, entry)
        except KeyError:
            raise EngineError("conflict", f"voice {voice_id!r} already exists") from None
        except Exception as e:
            raise EngineError("internal", f"could not save spk2info.pt: {type(e).__name__}") from None
        return VoiceInfo(voice_id, voice_id, "zh", "zero_shot", "registered zero-shot prompt", LANGUAGES)

    # -- synthesis ------------------------------------------------------------------------------
    def validate(self, options: SynthesisOptions) -> None:
        super().validate(options)
        chunk = self.cv.model.flow.cfg.chunk_tokens
        if options.token_hop_len is not None and options.token_hop_len % chunk:
            # other hops need the official loop that re-runs the flow over the whole prefix for
            # every chunk: a context's cost would grow with its length
            raise EngineError(
                "bad_request", f"token_hop_len must be a multiple of {chunk} (a whole flow chunk)"
            )
        if options.mode == "sft" and not (options.voice or self.default_voice):
            raise EngineError("bad_request", "sft needs a voice and this model directory has no SFT speakers")

    def _prompt(self, options: SynthesisOptions) -> dict[str, Any]:
        """The model input of the context minus its text (built once, reused by every segment)."""
        cv, mode = self.cv, options.mode
        entry = None
        voice = options.voice or (self.default_voice if options.prompt_audio is None else None)
        if voice is not None and options.prompt_audio is None:
            entry = self._spk2info().get(voice)
            if entry is None:
                raise EngineError("unknown_voice", f"unknown voice {voice!r}")
        if entry is not None and not _is_zero_shot(entry):  # an SFT speaker: only its embedding
            if mode == "zero_shot":
                raise EngineError(
                    "bad_request", f"voice {voice!r} is an SFT speaker; zero_shot needs prompt_audio"
                )
        elif entry is not None:  # a registered zero-shot voice (in sft mode too: it has no other use)
            mode = "zero_shot" if mode == "sft" else mode
        elif options.prompt_audio is None:
            raise EngineError("bad_request", f"mode {mode} needs prompt_audio or a registered voice")
        elif mode == "sft":  # a voice given only as audio: its timbre, without an LM prompt
            mode = "cross_lingual"
        texts = {}
        if mode == "zero_shot" and entry is None:
            texts["prompt_text"] = cv.frontend.text_normalize(options.prompt_text or "", split=False)
        elif mode == "instruct2":
            from cosyvoice.api import instruct_prompt

            texts["instruct_text"] = instruct_prompt(options.instruct_text or "")
        if entry is not None:
            return cv.frontend.prompt_input(mode, speaker=entry, **texts)
        try:
            return cv.frontend.prompt_input(
                mode, prompt_wav=options.prompt_audio, resample_rate=cv.sample_rate, **texts
            )
        except Exception as e:
            raise EngineError("bad_request", f"prompt_audio is not a usable WAV file: {e}") from None

    def open(self, options: SynthesisOptions, sink: AudioSink) -> EngineStream:
        if self.cv.model.lm_mode != "batched":
            return super().open(options, sink)
        self.validate(options)
        if options.prompt_audio is None:  # a registered voice: a lookup, done here
            return _Stream(self, options, sink, self._prompt(options))
        return _Stream(self, options, sink, self.helpers.submit(self._prompt, options))

    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        """The per-request path (``lm="per-request"``), in the stream's own thread."""
        self.validate(options)
        prompt = self._prompt(options)
        stream = options.speed == 1.0  # a changed speed stretches each segment's mel as a whole
        for index in itertools.count():
            marker: list[Flush | End] = []
            deltas = _segment_deltas(text, marker)
            ids = self.cv.frontend.stream_text_ids(deltas)
            first = next(ids, None)  # blocks until the segment has a token, or ends without one
            if first is not None:
                model_input = {
                    **prompt,
                    "text": itertools.chain([first], ids),
                    "text_len": torch.tensor([0], dtype=torch.int32),
                }
                seed = None if options.seed is None else options.seed + index
                request = self.cv.model.tts(
                    model_input,
                    stream=stream,
                    speed=options.speed,
                    seed=seed,
                    should_stop=lambda: text.cancelled,
                    token_hop_len=options.token_hop_len,
                )
                try:
                    for speech in request:
                        text.check()
                        yield AudioChunk(speech.reshape(-1).numpy())
                finally:
                    request.close()  # frees the segment's LM and token2wav state at once, however we leave
                text.check()
                for _ in deltas:  # text the LM did not take (token cap reached): skip to the marker
                    pass
            # everything handed out so far is spoken once the audio above has played
            yield AudioChunk(np.zeros(0, dtype=np.float32), text_offset=text.offset)
            if not marker or isinstance(marker[0], End):
                return
            yield Flushed()


def _segment_deltas(text: TextStream, marker: list[Flush | End]) -> Iterator[str]:
    """The context's deltas up to the next flush or end (recorded in ``marker``)."""
    while True:
        item = text.get()
        if isinstance(item, str):
            yield item
        else:
            marker.append(item)
            return


_TOKEN_S = 0.04  # one speech token is 40 ms of audio at speed 1 (25 tokens per second)
_WORD = re.compile(r"\S+")
_OPENERS, _CLOSERS = "\"'“‘([{*_", "\"'”’)]}*_.,;:!?…"


class _WordTiming:
    """Word times of one segment from the bistream schedule: as coarse as the model is honest.

    The LM reads text in groups of 5 tokens and writes up to 15 speech tokens (40 ms each) after
    each group, so all the schedule says of a word is after which speech token its text went in.
    A word is placed there: its text tokens are found from where its characters are in the text
    (ids of each pushed delta spread over the characters it released), and a token's place on the
    speech axis is interpolated between the speech tokens at which its group and the next went in.
    The LM may speak a word later than that (it looks ahead), never earlier.  A word is told once its
    end is on audio already put, and the segment's end tells the rest, so no time is ever later
    than the audio sent.
    """

    def __init__(self, start: int, speed: float) -> None:
        self.pieces: list[str] = []  # the segment's text, as pushed (joined when read)
        self.length = 0
        self.start = start  # raw offset of its first character in the context
        # raw characters released -> text ids returned for them, after each push
        self.released: list[float] = [0]
        self.ids: list[float] = [0]
        self.token_s = _TOKEN_S / speed
        self.audio_s = 0.0  # audio of the segment put so far
        self.told = 0  # raw characters up to the end of the last word told

    def pushed(self, text: str, ids: int, held: int) -> None:
        self.pieces.append(text)
        self.length += len(text)
        self._point(ids, self.length - held)

    def ended(self, ids: int) -> None:
        self._point(ids, self.length)

    def _point(self, ids: int, released: int) -> None:
        if ids > 0 and released > self.released[-1]:
            self.released.append(released)
            self.ids.append(self.ids[-1] + ids)

    def take(self, request: Any, chunk_s: float, final: bool) -> tuple[WordTime, ...]:
        """The words whose end is on the audio put so far (all of them when ``final``), with times
        from ``chunk_s`` (where the chunk carrying them starts in the segment)."""
        fed = list(getattr(request, "text_fed", ()))
        # text token -> speech token: group k (tokens fed[k-1][0]..fed[k][0]) went in at fed[k][1]
        tokens = [0 if k == 0 else fed[k - 1][0] for k in range(len(fed))]
        speech = [s for _, s in fed]
        if request is not None and request.finished and fed:
            tokens.append(fed[-1][0])
            speech.append(len(request.tokens))
        raw = "".join(self.pieces)
        self.pieces = [raw]
        out = []
        for m in _WORD.finditer(raw, self.told):
            a, b = _trim(raw, m.start(), m.end())
            if b <= a:
                continue
            t0, t1 = self._time(tokens, speech, a), self._time(tokens, speech, b)
            if not final and (t1 is None or t1 > self.audio_s):
                break
            t1 = self.audio_s if t1 is None else min(t1, self.audio_s)
            t0 = t1 if t0 is None else min(t0, t1)
            out.append(WordTime(self.start + a, self.start + b, t0 - chunk_s, t1 - chunk_s))
            self.told = m.end()
        return tuple(out)

    def _time(self, tokens: list[float], speech: list[float], raw: int) -> float | None:
        """Seconds into the segment at which the text token at raw character ``raw`` went in, or
        None while that is not known."""
        token = _interpolate(self.released, self.ids, raw)
        at = None if token is None else _interpolate(tokens, speech, token)
        return None if at is None else at * self.token_s


def _interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at ``x`` on the polyline through (``xs``, ``ys``) (``xs`` non-decreasing); None outside."""
    i = bisect.bisect_right(xs, x)
    if i == 0 or (i == len(xs) and x > xs[-1]):
        return None
    if i == len(xs):
        return ys[-1]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    """A whitespace-delimited token without the quotes, brackets and punctuation around it."""
    while a < b and text[a] in _OPENERS:
        a += 1
    while b > a and text[b - 1] in _CLOSERS:
        b -= 1
    return a, b


def _request(segment: _Segment) -> Any:
    """The LM request behind a segment's speech (a stream over the stages, or a token handle)."""
    speech = segment.speech
    handle = speech if isinstance(speech, LMHandle) else getattr(speech, "tokens", None)
    return getattr(handle, "request", None)


class _Break:
    """Where the engine ends a segment of its own accord (no ``Flushed`` for the client)."""


BREAK = _Break()
_SENTENCE_ENDS = ".!?;…"  # a sentence ends at one of these followed by whitespace
_CJK_ENDS = "。！？；"  # or at one of these
_PAUSES = ",:、，："  # past the hard limit, also after one of these (or at any space after a word)


def _break_at(delta: str, before: str, hard: bool) -> int | None:
    """Where in ``delta`` (the text after ``before``, its last character) a segment may end: after
    a sentence's end, or once ``hard``, after any pause or word; None: nowhere in it.  The text
    before the index stays in the segment."""
    for i, c in enumerate(delta):
        prev = delta[i - 1] if i else before
        if c.isspace() and (prev in _SENTENCE_ENDS or (hard and not prev.isspace())):
            return i
        if c in _CJK_ENDS or (hard and c in _PAUSES):
            return i + 1
    return None


class _Segment:
    """A context's text up to a flush, its end or a break: one request (opened at its first token id).

    A long context without flushes is broken into segments at sentence ends, ``segment_tokens``
    text tokens apart at least (see :class:`CosyVoice2Engine`): one request's KV slot holds 2048
    rows (prompt, text and speech tokens: about 70 s of speech) and the flow at most 300 s, and a
    request that outgrew them would end with its text unspoken."""

    def __init__(self, engine: CosyVoice2Engine, index: int, start: int = 0, speed: float = 1.0) -> None:
        self.index = index
        self.timing = _WordTiming(start, speed)
        self.text = engine.cv.frontend.text_ids()
        self.n_ids = 0  # text token ids pushed
        self.last = " "  # the last character pushed
        self.speech: Any = None  # SpeechStream (streamed) or LMHandle (speed != 1)
        self.marker: Flush | End | _Break | None = None  # how its text ended
        self.offset = 0  # characters of the context's text up to its end
        self.tokens: list[int] = []  # speed != 1: every token, vocoded at once
        self.whole: Future | None = None  # speed != 1: that vocoding
        self.whole_seconds = 0.0  # its time
        self.spoken = False  # all its audio is in the sink


class _Stream(EngineStream):
    """One context on the batched stages: a state machine with no thread of its own.

    The event loop's calls, the stages' listeners and the sink's waker all record what happened and
    then :meth:`_kick`: whoever gets the lock advances the machine (:meth:`_advance`) until nothing
    is left to do; whoever does not get it leaves that to the holder.  No caller ever waits for
    another, so a listener called from a stage's thread while that thread holds the stage's lock
    cannot deadlock with the event loop pushing text.
    """

    def __init__(
        self,
        engine: CosyVoice2Engine,
        options: SynthesisOptions,
        sink: AudioSink,
        prompt: dict[str, Any] | Future,
    ) -> None:
        self.engine = engine
        self.options = options
        self.sink = sink
        self.prompt = prompt
        self._inbox: deque[str | Flush | End] = deque()  # appended by the event loop
        self._segment: _Segment | None = None
        self._segments = itertools.count()
        self._offset = 0  # characters of text taken from the inbox
        self._cancelled = False
        self._over = False  # Finished, Failed or cancelled: nothing more is put
        self._lock = threading.Lock()
        self._dirty = False
        self._spent = 0.0  # compute of the segments that are over
        sink.set_waker(self._kick)
        if isinstance(prompt, Future):
            prompt.add_done_callback(lambda _: self._kick())

    # -- the service's calls (event loop) --------------------------------------------------------
    def push(self, text: str) -> None:
        if text:
            self._inbox.append(text)
            self._kick()

    def flush(self) -> None:
        self._inbox.append(FLUSH)
        self._kick()

    def end(self) -> None:
        self._inbox.append(END)
        self._kick()

    def cancel(self) -> None:
        self._cancelled = True
        self._kick()

    @property
    def compute_seconds(self) -> float:
        return self._spent + _compute(self._segment)

    # -- the machine -----------------------------------------------------------------------------
    def _kick(self) -> None:
        self._dirty = True
        while self._dirty and self._lock.acquire(blocking=False):
            try:
                self._dirty = False
                if not self._over:
                    self._advance_or_fail()
            finally:
                self._lock.release()

    def _advance_or_fail(self) -> None:
        try:
            if self._cancelled:
                self._stop()
                return
            self._advance()
        except EngineError as e:
            self._fail(Failed(e.code, e.message))
        except Exception as e:  # the model broke: this context only
            log.error("cosyvoice2 stream failed: %s: %s", type(e).__name__, e)
            self._fail(Failed("internal", f"synthesis failed: {type(e).__name__}"))

    def _advance(self) -> None:
        """Take text into the current segment, move its audio into the sink, and go on to the
        next segment once it has spoken, while there is anything to do."""
        if isinstance(self.prompt, Future):
            if not self.prompt.done():
                return
            self.prompt = self.prompt.result()  # raises the analysis' EngineError
        while True:
            segment = self._segment
            if segment is None:
                if not self._inbox:
                    return
                segment = self._segment = _Segment(
                    self.engine, next(self._segments), self._offset, self.options.speed
                )
            self._take_text(segment)
            self._take_audio(segment)
            if segment.marker is None or not segment.spoken:
                return
            self._spent += _compute(segment)
            words = segment.timing.take(_request(segment), segment.timing.audio_s, final=True)
            if not self._put(
                AudioChunk(np.zeros(0, dtype=np.float32), text_offset=segment.offset, words=words)
            ):
                return
            self._segment = None
            if isinstance(segment.marker, End):
                self._over = True
                self.sink.put(Finished())
                return
            if isinstance(segment.marker, Flush) and not self._put(Flushed()):
                return

    def _take_text(self, segment: _Segment) -> None:
        soft, hard = self.engine.segment_tokens
        while segment.marker is None and self._inbox:
            item = self._inbox.popleft()
            cut, ids = None, []
            # tokens so far: the front end holds characters back (a character is a token at most)
            n = segment.n_ids + segment.text.held
            if isinstance(item, str) and n >= soft:
                # past twice the hard limit (no word or pause in sight): before this delta
                cut = 0 if n >= 2 * hard else _break_at(item, segment.last, n >= hard)
                if cut is not None and cut < len(item):
                    self._inbox.appendleft(item[cut:])  # the next segment's
                    item = item[:cut]
            if isinstance(item, str) and item:
                self._offset += len(item)
                ids = segment.text.push(item)
                segment.n_ids += len(ids)
                segment.last = item[-1]
                segment.timing.pushed(item, len(ids), segment.text.held)
            if not isinstance(item, str) or cut is not None:
                segment.marker, segment.offset = (item if cut is None else BREAK), self._offset
                ids = segment.text.end()
                segment.timing.ended(len(ids))
            if ids:
                if segment.speech is None:
                    self._open(segment)
                segment.speech.push_text(ids)
            if segment.marker is not None:
                if segment.speech is None:
                    segment.spoken = True  # no token to speak
                else:
                    segment.speech.end_text()

    def _open(self, segment: _Segment) -> None:
        options, model = self.options, self.engine.cv.model
        seed = None if options.seed is None else options.seed + segment.index
        if options.speed != 1.0:  # the mel is stretched as a whole: tokens first, then one vocoding
            segment.speech = model.open_tokens(
                self.prompt, seed=seed if seed is not None else secrets.randbits(63)
            )
            if segment.speech is not None:
                segment.speech.subscribe(self._kick)
        else:
            segment.speech = model.open_stream(
                self.prompt,
                seed=seed,
                token_hop_len=options.token_hop_len,
                uuid=uuid_lib.uuid4().hex,
                listener=self._kick,
            )
        if segment.speech is None:
            raise EngineError("overloaded", "the model has no free place (KV slot or token2wav memory)")

    def _take_audio(self, segment: _Segment) -> None:
        if segment.speech is None or segment.spoken:
            return
        if self.options.speed != 1.0:
            self._take_whole(segment)
            return
        while self.sink.has_room():
            chunk = segment.speech.poll()
            if chunk is None:
                return
            if chunk is DONE:
                segment.spoken = True
                return
            at = segment.timing.audio_s
            segment.timing.audio_s += len(chunk) / self.engine.sample_rate
            words = segment.timing.take(_request(segment), at, final=False)
            if not self._put(AudioChunk(chunk, words=words), len(chunk)):
                return

    def _take_whole(self, segment: _Segment) -> None:
        if segment.whole is None:
            tokens, done = segment.speech.take()
            segment.tokens += tokens
            if not done:
                return
            model, seed = self.engine.cv.model, self.options.seed
            seed = secrets.randbits(63) if seed is None else seed + segment.index
            prompt, speed = flow_prompt(self.prompt), self.options.speed

            def vocode() -> np.ndarray:
                started = time.thread_time()
                audio = model.token2wav.token2wav(segment.tokens, *prompt, speed=speed, seed=seed)
                segment.whole_seconds = time.thread_time() - started
                return audio

            segment.whole = self.engine.helpers.submit(vocode)
            segment.whole.add_done_callback(lambda _: self._kick())
        if segment.whole.done():
            audio = segment.whole.result()
            segment.spoken = True
            segment.timing.audio_s = len(audio) / self.engine.sample_rate
            if len(audio):
                self._put(AudioChunk(audio), len(audio))

    def _put(self, item: AudioChunk | Flushed, samples: int = 0) -> bool:
        """False when the sink is closed: its reader is gone, so the context stops."""
        if self.sink.put(item, samples):
            return True
        self._stop()
        return False

    def _fail(self, failure: Failed) -> None:
        self._stop()
        self.sink.put(failure)

    def _stop(self) -> None:
        """No more output; the stages free the current request's slot and caches."""
        self._over = True
        segment, self._segment = self._segment, None
        if segment is not None and segment.speech is not None:
            segment.speech.cancel()
            if segment.whole is not None:
                segment.whole.cancel()
        if isinstance(self.prompt, Future):
            self.prompt.cancel()


def _compute(segment: _Segment | None) -> float:
    """A segment's model time so far: its request's share of the stages' calls, and the
    whole-utterance vocoding of speed != 1."""
    if segment is None or segment.speech is None:
        return 0.0
    return segment.speech.compute_seconds + segment.whole_seconds
