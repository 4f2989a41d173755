"""The embedded default voice end to end: real ONNX model, real G2P, short texts, through the
stream interface the service uses (push from one thread, audio out of a sink)."""

import threading
import time

import numpy as np
import pytest

from realtime.engines.base import (
    AudioChunk,
    EngineError,
    Failed,
    Finished,
    Flushed,
    QueueSink,
    SynthesisOptions,
)
from realtime.engines.piper import (
    LeadConfig,
    PiperEngine,
    SchedulerPolicy,
    phoneme_ids,
    phonemize,
    piece_budget,
    split_phonemes,
    trim_silence,
)
from realtime.text.segment import PlaybackClock, Segment

WAIT = 60.0  # generous: the CI box may be busy; no assertion here is about speed


@pytest.fixture(scope="module")
def engine() -> PiperEngine:
    e = PiperEngine()
    yield e
    e.close()


class RecordingSink(QueueSink):
    """A QueueSink that also counts every put, read or not."""

    def __init__(self, capacity_samples: int | None = None) -> None:
        super().__init__(capacity_samples)
        self.puts = 0

    def put(self, item, samples: int = 0) -> bool:
        self.puts += 1
        return super().put(item, samples)


def open_stream(engine: PiperEngine, options: SynthesisOptions | None = None, capacity: int | None = None):
    sink = RecordingSink(capacity)
    return engine.open(options or SynthesisOptions(), sink), sink


def drain(sink: QueueSink) -> list:
    """Everything up to and including Finished (or Failed)."""
    return list(sink.items(WAIT))


def until_offset(sink: QueueSink) -> list[AudioChunk]:
    """Chunks up to and including the first that carries a text offset: a segment may arrive in
    several pieces when the engine has little lead over playback."""
    out = []
    while True:
        ev = sink.get(WAIT)
        assert isinstance(ev, AudioChunk), ev
        out.append(ev)
        if ev.text_offset is not None:
            return out


def voiced_seconds(samples: np.ndarray, sr: int) -> float:
    frame = sr // 100
    n = len(samples) // frame
    rms = np.sqrt(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1))
    return float((rms > 0.01).sum()) / 100


def test_engine_metadata(engine):
    assert engine.name == "piper"
    assert engine.sample_rate == 22050
    assert engine.default_voice == "joe"
    assert engine.modes == ("sft",)
    [voice] = engine.voices()
    assert voice.id == "joe" and voice.language == "en-US"


def test_validate_rejects_bad_options(engine):
    engine.validate(SynthesisOptions())
    engine.validate(SynthesisOptions(voice="joe", speed=1.5))
    with pytest.raises(EngineError) as err:
        engine.validate(SynthesisOptions(voice="nobody"))
    assert err.value.code == "unknown_voice"
    with pytest.raises(EngineError) as err:
        engine.validate(SynthesisOptions(mode="zero_shot"))
    assert err.value.code == "bad_request"
    with pytest.raises(EngineError) as err:
        engine.validate(SynthesisOptions(speed=0.0))
    assert err.value.code == "bad_request"


def test_open_with_an_unknown_voice_fails_before_any_work(engine):
    with pytest.raises(EngineError) as err:
        open_stream(engine, SynthesisOptions(voice="nobody"))
    assert err.value.code == "unknown_voice"


def test_phoneme_id_framing(engine):
    id_map = engine.config.phoneme_id_map
    ids = phoneme_ids("hə", id_map)
    pad = id_map["_"][0]
    assert ids == [id_map["^"][0], pad, id_map["h"][0], pad, id_map["ə"][0], pad, id_map["$"][0]]
    assert phoneme_ids("h\u2603", id_map) == phoneme_ids("h", id_map)  # unknown symbols skipped


def test_phonemize_gives_ipa_and_empty_for_nothing():
    assert "h" in phonemize("Hello world") and "w" in phonemize("Hello world")
    assert phonemize("") == ""
    assert phonemize("   ") == ""


def test_split_phonemes_caps_length_and_keeps_words():
    ipa = " ".join(["həlˈoʊ", "wˈɜːld,"] * 30)
    parts = split_phonemes(ipa, 40)
    assert len(parts) > 1
    assert all(len(p) <= 40 for p in parts)
    assert " ".join(parts).split() == ipa.split()
    assert split_phonemes("hi", 40) == ["hi"]


def test_trim_silence_limits_gaps():
    sr = 22050
    tone = (0.3 * np.sin(np.arange(sr // 2) * 2 * np.pi * 220 / sr)).astype(np.float32)
    audio = np.concatenate([np.zeros(sr, np.float32), tone, np.zeros(sr, np.float32)])
    out = trim_silence(audio, sr, lead_s=0.02, tail_s=0.1)
    assert abs(len(out) - (0.02 + 0.5 + 0.1) * sr) <= 0.011 * sr
    assert np.abs(out[int(0.02 * sr) + 50 : int(0.5 * sr)]).max() > 0.25  # the tone survived
    assert np.abs(out[-int(0.1 * sr) :]).max() == 0.0
    assert len(trim_silence(np.zeros(sr, np.float32), sr, 0.02, 0.1)) == 0


def test_real_chunks_have_no_long_silences(engine):
    seg = Segment("Hello there, friend.", 0, 20)
    [chunk] = list(engine.speak(seg, 1.0))
    frame = engine.sample_rate // 100
    n = len(chunk.samples) // frame
    loud = np.flatnonzero(np.sqrt(np.mean(chunk.samples[: n * frame].reshape(n, frame) ** 2, axis=1)) > 0.01)
    assert loud[0] <= 5  # at most ~50 ms before the voice starts
    assert n - loud[-1] <= 40  # sentence-end pause kept short (~0.3 s)


def test_hello_world_through_a_stream(engine):
    stream, sink = open_stream(engine)
    text = "Hello world. This is a test."
    for piece in ["Hel", "lo wor", "ld. Thi", "s is a te", "st."]:
        stream.push(piece)
    stream.end()
    out = drain(sink)
    assert isinstance(out[-1], Finished)
    chunks = [e for e in out if isinstance(e, AudioChunk)]
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in chunks)
    audio = np.concatenate([c.samples for c in chunks])
    assert voiced_seconds(audio, engine.sample_rate) >= 1.0
    assert np.abs(audio).max() <= 1.0
    offsets = [c.text_offset for c in chunks if c.text_offset is not None]
    assert offsets == sorted(offsets) and offsets[0] == len("Hello world.") and offsets[-1] == len(text)


def test_first_audio_arrives_before_the_rest_of_the_text(engine):
    stream, sink = open_stream(engine)
    stream.push("Good morning to you. ")
    first = until_offset(sink)  # nothing else was pushed and the stream is still open
    assert len(first[0].samples) > 0
    assert first[-1].text_offset == len("Good morning to you.")
    stream.push("Goodbye.")
    stream.end()
    rest = drain(sink)
    assert isinstance(rest[-1], Finished)
    assert [e for e in rest if isinstance(e, AudioChunk)][-1].text_offset == len(
        "Good morning to you. Goodbye."
    )


def test_flushed_comes_after_the_audio_of_the_flushed_text(engine):
    stream, sink = open_stream(engine)
    stream.push("Thanks for waiting")
    stream.flush()
    before = []
    while not isinstance(ev := sink.get(WAIT), Flushed):
        before.append(ev)
    assert before and voiced_seconds(np.concatenate([c.samples for c in before]), engine.sample_rate) > 0.3
    assert before[-1].text_offset == len("Thanks for waiting")
    stream.push(" again.")
    stream.end()
    after = drain(sink)
    assert not any(isinstance(e, Flushed) for e in after)
    assert [e for e in after if isinstance(e, AudioChunk)][-1].text_offset == len("Thanks for waiting again.")


def test_cancel_stops_within_one_call_and_nothing_follows(engine):
    stream, sink = open_stream(engine)
    stream.push("One sentence here. Two sentences here. Three sentences here. Four sentences here.")
    stream.end()
    first = sink.get(WAIT)  # the whole first sentence, or its first piece when the lead is small
    assert isinstance(first, AudioChunk) and first.text_offset in (None, len("One sentence here."))
    stream.cancel()
    puts = sink.puts
    time.sleep(1.0)  # a call in flight when the cancel came is thrown away
    assert sink.puts == puts
    assert not any(s is stream for s in engine.scheduler.streams.values())


def test_cancel_while_waiting_for_text_leaves_nothing_behind(engine):
    stream, sink = open_stream(engine)
    stream.push("still typing")
    stream.cancel()
    time.sleep(0.5)
    assert sink.puts == 0 and not any(s is stream for s in engine.scheduler.streams.values())


def test_speed_changes_duration(engine):
    seg = Segment("The quick brown fox jumps over the lazy dog.", 0, 44)
    normal = np.concatenate([c.samples for c in engine.speak(seg, 1.0)])
    fast = np.concatenate([c.samples for c in engine.speak(seg, 2.0)])
    assert len(fast) < 0.75 * len(normal)


def test_long_segment_is_split_into_several_model_calls(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_phonemes", 40)
    text = "This sentence is long enough that it needs more than one call to the model."
    chunks = list(engine.speak(Segment(text, 0, len(text)), 1.0))
    assert len(chunks) >= 2
    assert [c.text_offset for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].text_offset == len(text)


def test_markup_only_text_gives_no_audio_but_reaches_the_end(engine):
    stream, sink = open_stream(engine)
    stream.push("**  ** --- 🎉\n")
    stream.end()
    out = drain(sink)
    assert isinstance(out[-1], Finished)
    chunks = out[:-1]
    assert chunks and all(isinstance(e, AudioChunk) for e in chunks)
    assert sum(len(e.samples) for e in chunks) == 0
    assert chunks[-1].text_offset == len("**  ** --- 🎉\n")


def test_slow_producer_is_not_stalled(engine):
    # No punctuation and no end: the segmenter's clock must release the complete words.
    stream, sink = open_stream(engine)
    stream.push("one two three four five six ")
    chunks = until_offset(sink)
    assert len(chunks[0].samples) > 0
    assert chunks[-1].text_offset == len("one two three four five six")
    stream.end()
    assert isinstance(drain(sink)[-1], Finished)


def test_two_contexts_at_once_share_the_engine(engine):
    opened = [open_stream(engine) for _ in range(2)]
    for (stream, _), text in zip(opened, ["First voice here.", "Second one."], strict=True):
        stream.push(text)
        stream.end()
    for (_, sink), text in zip(opened, ["First voice here.", "Second one."], strict=True):
        out = drain(sink)
        assert isinstance(out[-1], Finished)
        assert [e for e in out if isinstance(e, AudioChunk)][-1].text_offset == len(text)


def test_streams_waiting_for_text_hold_no_thread_and_no_core(engine):
    """A hundred open contexts with nothing (or nothing more) to say cost no thread: the
    scheduler's workers are the only threads, however many streams are open."""
    before = threading.active_count()
    waiting = [open_stream(engine) for _ in range(100)]
    for stream, _ in waiting[:50]:
        stream.push("Hi")  # half have a word pending (released after the segmenter's timeout)
    stream, sink = open_stream(engine)
    stream.push("Still served while a hundred others wait.")
    stream.end()
    assert isinstance(drain(sink)[-1], Finished)
    assert threading.active_count() <= max(before, engine.policy.workers + 1) + 1
    for stream, _ in waiting:
        stream.cancel()
    assert engine.scheduler.busy == 0


def test_a_reader_that_does_not_read_costs_no_compute_and_resumes_when_it_does(engine):
    slow_stream, slow = open_stream(engine, capacity=engine.sample_rate // 2)  # half a second
    slow_stream.push("This listener has stopped reading. " * 20)
    slow_stream.end()
    fast_stream, fast = open_stream(engine)
    fast_stream.push("Another listener is served meanwhile.")
    fast_stream.end()
    assert isinstance(drain(fast)[-1], Finished)
    time.sleep(0.5)
    stalled = slow.puts
    time.sleep(1.0)
    assert slow.puts == stalled  # full: nothing more was computed for it
    out = drain(slow)  # reading again wakes the engine, and the stream goes on to its end
    assert isinstance(out[-1], Finished) and slow.puts > stalled


# -- pieces sized by the lead over playback ----------------------------------------------------

LONG = "The quickest way to get there is by train, which leaves every twenty minutes from the station."


def test_piece_budget_starts_short_and_grows_with_the_lead():
    cfg = LeadConfig(first_s=0.12, safety=0.7, margin_s=0.03, max_s=2.0)
    assert piece_budget(0.0, cfg) == pytest.approx(0.12)
    assert piece_budget(0.1, cfg) == pytest.approx(0.12)  # never below the first piece's budget
    assert piece_budget(2.0, cfg) == pytest.approx(1.37)
    assert piece_budget(60.0, cfg) == pytest.approx(2.0)  # nor so long that it hogs a core


def test_no_lead_cuts_a_long_segment_into_pieces(engine, monkeypatch):
    monkeypatch.setattr(engine, "lead", LeadConfig(smoothing=0.0))  # keep the estimate fixed
    monkeypatch.setattr(engine, "cost_per_char", 0.01)  # 0.12 s buys 12 characters: two words
    seg = Segment(LONG, 0, len(LONG))
    whole = list(engine.speak(seg, 1.0))
    pieces = list(engine.speak(seg, 1.0, clock=PlaybackClock()))
    assert len(whole) == 1 and len(pieces) >= 3
    assert [c.text_offset for c in pieces] == [None] * (len(pieces) - 1) + [len(LONG)]
    assert all(voiced_seconds(c.samples, engine.sample_rate) > 0.2 for c in pieces)  # no empty cuts
    # Same words, just in several calls: the voiced time stays close to the one-call rendering.
    v_whole = voiced_seconds(whole[0].samples, engine.sample_rate)
    v_pieces = sum(voiced_seconds(c.samples, engine.sample_rate) for c in pieces)
    assert 0.75 * v_whole < v_pieces < 1.35 * v_whole


def test_comfortable_lead_keeps_the_clause_whole(engine, monkeypatch):
    monkeypatch.setattr(engine, "lead", LeadConfig(smoothing=0.0, max_s=10.0))
    monkeypatch.setattr(engine, "cost_per_char", 0.01)
    clock = PlaybackClock()
    clock.played(30.0, now=time.monotonic())  # half a minute queued: plenty of time for one call
    chunks = list(engine.speak(Segment(LONG, 0, len(LONG)), 1.0, clock=clock))
    assert len(chunks) == 1 and chunks[0].text_offset == len(LONG)
    assert clock.lead(time.monotonic()) > 30.0  # the clock counts what was handed out


def test_lead_cutting_can_be_switched_off(engine, monkeypatch):
    monkeypatch.setattr(engine, "lead", LeadConfig(enabled=False))
    monkeypatch.setattr(engine, "cost_per_char", 1.0)
    chunks = list(engine.speak(Segment(LONG, 0, len(LONG)), 1.0, clock=PlaybackClock()))
    assert len(chunks) == 1


def test_cost_estimate_follows_the_measured_calls(engine, monkeypatch):
    monkeypatch.setattr(engine, "lead", LeadConfig(smoothing=1.0))  # the last call only
    monkeypatch.setattr(engine, "cost_per_char", 100.0)  # absurd: no CPU is that slow
    list(engine.speak(Segment(LONG, 0, len(LONG)), 1.0))
    assert 0.0 < engine.cost_per_char < 1.0


# -- least-slack-first scheduling of model calls ---------------------------------------------


def test_policy_keeps_a_slot_for_listeners_about_to_run_dry_and_lends_one_to_those_in_silence():
    p = SchedulerPolicy(slots=2, urgent_slots=1, reserve_slack=0.8)
    now = 100.0
    assert p.may_start(now + 5.0, now, busy=0)  # comfortable: one core of two
    assert not p.may_start(now + 5.0, now, busy=1)  # ... the other stays free
    assert p.may_start(now + 0.5, now, busy=1)  # about to run dry: it takes it
    assert not p.may_start(now + 0.5, now, busy=2)
    assert p.may_start(now - 0.1, now, busy=2)  # already late: it shares a core
    assert not p.may_start(now - 0.1, now, busy=3)
    assert SchedulerPolicy(slots=1, urgent_slots=0).may_start(now + 5.0, now, busy=0)  # never below one


def test_a_first_piece_may_wait_briefly_but_a_later_one_is_due_when_playback_runs_dry(engine, monkeypatch):
    monkeypatch.setattr(engine, "lead", LeadConfig(first_grace_s=0.25))
    stream, sink = open_stream(engine)
    with engine.scheduler.cond:  # hold the workers off while we look at the stream's schedule
        stream.push("Hello there. ")
        now = time.monotonic()
        assert 0.0 < stream.start_by(now) - now <= 0.25  # nothing playing: a later start, not a gap
        stream.clock.played(5.0, now)
        assert stream.start_by(now) - now > 4.0  # playing: due when the queued audio runs out
    stream.cancel()


@pytest.fixture
def one_core():
    """An engine with one worker and a model call we control."""
    e = PiperEngine(parallel_calls=1, urgent_calls=0, warmup=False)
    yield e
    e.close()


def test_calls_go_least_slack_first(one_core, monkeypatch):
    order: list[int] = []
    gate = threading.Event()
    real = one_core.infer

    def infer(ids, speed):
        order.append(len(ids))
        if len(order) == 1:
            gate.wait(WAIT)  # the single core is busy until we say so
        return real(ids, speed)

    monkeypatch.setattr(one_core, "infer", infer)
    blocker, blocker_sink = open_stream(one_core)
    blocker.push("Hold the core. ")
    deadline = time.monotonic() + WAIT
    while not order:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    comfy, comfy_sink = open_stream(one_core)
    tight, tight_sink = open_stream(one_core)
    with one_core.scheduler.cond:
        comfy.clock.played(30.0, time.monotonic())  # half a minute queued
        tight.clock.played(0.2, time.monotonic())  # about to run dry
        comfy.push("Comfortable listener speaking now. ")
        tight.push("Hurry. ")
    gate.set()
    for stream, sink in ((comfy, comfy_sink), (tight, tight_sink), (blocker, blocker_sink)):
        stream.end()
        assert isinstance(drain(sink)[-1], Finished)
    hurry = len(phoneme_ids(phonemize("Hurry."), one_core.config.phoneme_id_map))
    assert order[1] == hurry  # the listener about to run dry went before the comfortable one


def test_words_go_out_while_a_long_clause_is_still_streaming(engine):
    """Deltas arriving faster than the segmenter's poll interval must not hold the first words
    back until the clause ends.  The text has no punctuation, so without the timed release only
    the 200-character cut would release anything."""
    stream, sink = open_stream(engine)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen " * 5
    sent = 0

    def feed() -> None:
        nonlocal sent
        for i in range(0, len(text), 4):
            stream.push(text[i : i + 4])
            sent = i + 4
            time.sleep(0.03)  # under the segmenter's poll interval
        stream.end()

    threading.Thread(target=feed, daemon=True).start()
    first = next(c for c in sink.items(WAIT) if isinstance(c, AudioChunk) and len(c.samples))
    assert sent < 160, sent  # spoken long before the clause (or the 200-character cut) was complete
    assert first.text_offset is None or first.text_offset < 160
    assert isinstance(drain(sink)[-1], Finished | Failed)
