"""The embedded default voice end to end: real ONNX model, real G2P, short texts."""

import queue
import threading
import time

import numpy as np
import pytest

from realtime.engines.base import (
    AudioChunk,
    Cancelled,
    EngineError,
    Flushed,
    SynthesisOptions,
    TextStream,
)
from realtime.engines.piper import (
    DeadlineGate,
    LeadConfig,
    PiperEngine,
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
    return PiperEngine()


def run_in_thread(engine: PiperEngine, stream: TextStream, options: SynthesisOptions | None = None):
    """Consume ``synthesize`` in a worker thread the way the service does; events land in a queue,
    followed by ("done", None) or ("error", exc)."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for ev in engine.synthesize(stream, options or SynthesisOptions()):
                events.put(("event", ev))
            events.put(("done", None))
        except BaseException as exc:  # handed to the test thread
            events.put(("error", exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return events, thread


def drain(events: queue.Queue) -> tuple[list, BaseException | None]:
    out = []
    while True:
        kind, value = events.get(timeout=WAIT)
        if kind == "event":
            out.append(value)
        else:
            return out, value


def until_offset(events: queue.Queue) -> list[AudioChunk]:
    """Chunks up to and including the first that carries a text offset: a segment may arrive in
    several pieces when the engine has little lead over playback."""
    out = []
    while True:
        kind, ev = events.get(timeout=WAIT)
        assert kind == "event" and isinstance(ev, AudioChunk), (kind, ev)
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


def test_synthesize_unknown_voice_fails_before_audio(engine):
    stream = TextStream()
    stream.push("Hello.")
    stream.end()
    with pytest.raises(EngineError):
        next(engine.synthesize(stream, SynthesisOptions(voice="nobody")))


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
    stream = TextStream()
    text = "Hello world. This is a test."
    events, thread = run_in_thread(engine, stream)
    for piece in ["Hel", "lo wor", "ld. Thi", "s is a te", "st."]:
        stream.push(piece)
    stream.end()
    out, err = drain(events)
    thread.join(WAIT)
    assert err is None
    chunks = [e for e in out if isinstance(e, AudioChunk)]
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in chunks)
    audio = np.concatenate([c.samples for c in chunks])
    assert voiced_seconds(audio, engine.sample_rate) >= 1.0
    assert np.abs(audio).max() <= 1.0
    offsets = [c.text_offset for c in chunks if c.text_offset is not None]
    assert offsets == sorted(offsets) and offsets[0] == len("Hello world.") and offsets[-1] == len(text)


def test_first_audio_arrives_before_the_rest_of_the_text(engine):
    stream = TextStream()
    events, thread = run_in_thread(engine, stream)
    stream.push("Good morning to you. ")
    first = until_offset(events)  # nothing else was pushed and the stream is still open
    assert len(first[0].samples) > 0
    assert first[-1].text_offset == len("Good morning to you.")
    stream.push("Goodbye.")
    stream.end()
    rest, err = drain(events)
    thread.join(WAIT)
    assert err is None
    assert rest[-1].text_offset == len("Good morning to you. Goodbye.")


def test_flushed_comes_after_the_audio_of_the_flushed_text(engine):
    stream = TextStream()
    events, thread = run_in_thread(engine, stream)
    stream.push("Thanks for waiting")
    stream.flush()
    before = []
    while True:
        kind, ev = events.get(timeout=WAIT)
        assert kind == "event"
        if isinstance(ev, Flushed):
            break
        before.append(ev)
    assert before and voiced_seconds(np.concatenate([c.samples for c in before]), engine.sample_rate) > 0.3
    assert before[-1].text_offset == len("Thanks for waiting")
    stream.push(" again.")
    stream.end()
    after, err = drain(events)
    thread.join(WAIT)
    assert err is None and not any(isinstance(e, Flushed) for e in after)
    assert after[-1].text_offset == len("Thanks for waiting again.")


def test_cancel_stops_within_one_segment(engine):
    stream = TextStream()
    stream.push("One sentence here. Two sentences here. Three sentences here. Four sentences here.")
    stream.end()
    gen = engine.synthesize(stream, SynthesisOptions())
    first = next(gen)  # the whole first sentence, or its first piece when the lead is small
    assert isinstance(first, AudioChunk) and first.text_offset in (None, len("One sentence here."))
    stream.cancel()
    with pytest.raises(Cancelled):
        next(gen)
    with pytest.raises(StopIteration):
        next(gen)


def test_cancel_while_waiting_for_text_unblocks(engine):
    stream = TextStream()
    events, thread = run_in_thread(engine, stream)
    stream.push("still typing")
    stream.cancel()
    out, err = drain(events)
    thread.join(WAIT)
    assert isinstance(err, Cancelled)
    assert not thread.is_alive()


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
    stream = TextStream()
    stream.push("**  ** --- 🎉\n")
    stream.end()
    out = list(engine.synthesize(stream, SynthesisOptions()))
    assert all(isinstance(e, AudioChunk) for e in out)
    assert sum(len(e.samples) for e in out) == 0
    assert out[-1].text_offset == len("**  ** --- 🎉\n")


def test_slow_producer_is_not_stalled(engine):
    # No punctuation and no end: poll() must release the complete words after a short wait.
    stream = TextStream()
    events, thread = run_in_thread(engine, stream)
    stream.push("one two three four five six ")
    chunks = until_offset(events)
    assert len(chunks[0].samples) > 0
    assert chunks[-1].text_offset == len("one two three four five six")
    stream.end()
    _, err = drain(events)
    thread.join(WAIT)
    assert err is None


def test_two_contexts_at_once_share_the_session(engine):
    streams = [TextStream(), TextStream()]
    runs = [run_in_thread(engine, s) for s in streams]
    for s, text in zip(streams, ["First voice here.", "Second one."], strict=True):
        s.push(text)
        s.end()
    for (events, thread), text in zip(runs, ["First voice here.", "Second one."], strict=True):
        out, err = drain(events)
        thread.join(WAIT)
        assert err is None and out[-1].text_offset == len(text)


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


# -- least-slack-first admission of model calls -----------------------------------------------


def wait_until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.001)


def occupy(gate: DeadlineGate) -> tuple[threading.Thread, threading.Event]:
    """A call holding one of ``gate``'s slots until the returned event is set."""
    release = threading.Event()

    def holder() -> None:
        with gate.slot(0.0):
            release.wait(WAIT)

    busy = gate._busy
    t = threading.Thread(target=holder)
    t.start()
    wait_until(lambda: gate._busy > busy)
    return t, release


def admission_order(gate: DeadlineGate, calls: list[tuple[str, float, float]]) -> list[str]:
    """Queue ``(name, deadline, cost)`` calls behind a held slot, release it, and return the order
    in which the gate let them in."""
    order: list[str] = []

    def call(name: str, deadline: float, cost: float) -> None:
        with gate.slot(deadline, cost=cost):
            order.append(name)

    holder, release = occupy(gate)
    waiters = [threading.Thread(target=call, args=c) for c in calls]
    for t in waiters:
        t.start()
    wait_until(lambda: len(gate._waiting) == len(calls))
    release.set()
    for t in [holder, *waiters]:
        t.join(WAIT)
    return order


def test_gate_admits_waiting_calls_earliest_deadline_first_at_equal_cost():
    gate = DeadlineGate(slots=1, urgent_slots=0)
    assert admission_order(gate, [("late", 30.0, 0.0), ("soon", 10.0, 0.0), ("mid", 20.0, 0.0)]) == ["soon", "mid", "late"]


def test_gate_runs_up_to_slots_at_once():
    gate = DeadlineGate(slots=2, urgent_slots=0)
    inside, peak, lock = 0, 0, threading.Lock()

    def call() -> None:
        nonlocal inside, peak
        with gate.slot(time.monotonic()):
            with lock:
                inside += 1
                peak = max(peak, inside)
            time.sleep(0.02)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert peak == 2 and gate._busy == 0 and not gate._waiting


def test_cancelled_waiter_leaves_the_gate_queue():
    gate = DeadlineGate(slots=1, urgent_slots=0)
    stream = TextStream()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with gate.slot(1.0, stream.check):
                pass
        except BaseException as exc:
            errors.append(exc)

    h, release = occupy(gate)
    w = threading.Thread(target=waiter)
    w.start()
    stream.cancel()
    w.join(WAIT)  # leaves while the slot is still held
    assert not w.is_alive() and isinstance(errors[0], Cancelled) and not gate._waiting
    release.set()
    h.join(WAIT)
    with gate.slot(2.0):  # the gate still works for everyone else
        assert gate._busy == 1


def test_gate_lets_a_listener_in_silence_share_a_core():
    gate = DeadlineGate(slots=1, urgent_slots=1)
    entered: list[str] = []

    def call(name: str, deadline: float) -> None:
        with gate.slot(deadline):
            entered.append(name)

    h, release = occupy(gate)
    later = threading.Thread(target=call, args=("queued", time.monotonic() + 60.0))
    later.start()
    wait_until(lambda: gate._waiting)
    call("dry", time.monotonic() - 1.0)  # its deadline has passed: it goes ahead, on the extra slot
    assert entered == ["dry"] and later.is_alive()  # the comfortable call still waits its turn
    release.set()
    for t in (h, later):
        t.join(WAIT)
    assert entered == ["dry", "queued"] and gate._busy == 0


def test_gate_orders_by_latest_start_not_deadline():
    """Same deadline, different cost: the call that needs longer must start first."""
    gate = DeadlineGate(slots=1, urgent_slots=0)
    deadline = time.monotonic() + 0.5  # within the reserve slack: no slot is held back
    assert admission_order(gate, [("short", deadline, 0.05), ("long", deadline, 0.4)]) == ["long", "short"]


def test_gate_keeps_a_slot_for_listeners_about_to_run_dry():
    gate = DeadlineGate(slots=2, urgent_slots=0, reserve_slack=0.8)
    entered: list[str] = []
    release = threading.Event()

    def call(name: str, deadline: float, hold: bool = False) -> None:
        with gate.slot(deadline):
            entered.append(name)
            if hold:
                release.wait(WAIT)

    comfy = threading.Thread(target=call, args=("comfortable", time.monotonic() + 60.0, True))
    comfy.start()
    wait_until(lambda: gate._busy == 1)
    second = threading.Thread(target=call, args=("also comfortable", time.monotonic() + 60.0))
    second.start()
    wait_until(lambda: gate._waiting)
    time.sleep(0.1)
    assert entered == ["comfortable"]  # the second core stays free ...
    call("tight", time.monotonic() + 0.3)  # ... for a listener about to run dry
    assert entered == ["comfortable", "tight"] and second.is_alive()
    release.set()
    for t in (comfy, second):
        t.join(WAIT)
    assert entered == ["comfortable", "tight", "also comfortable"] and gate._busy == 0


def test_a_waiting_call_turns_urgent_when_its_latest_start_comes():
    gate = DeadlineGate(slots=1, urgent_slots=1)
    release = threading.Event()
    entered_while_held: list[bool] = []

    def holder() -> None:
        with gate.slot(0.0):
            release.wait(WAIT)

    h, release = occupy(gate)
    t0 = time.monotonic()
    with gate.slot(t0 + 0.3, cost=0.1):  # must start within 0.2 s: it waits, then takes the extra slot
        entered_while_held.append(h.is_alive())
        waited = time.monotonic() - t0
    release.set()
    h.join(WAIT)
    assert entered_while_held == [True] and waited >= 0.19


def test_a_first_piece_may_wait_briefly_but_a_later_one_is_due_when_playback_runs_dry(engine, monkeypatch):
    calls: list[float] = []
    real_slot = engine.gate.slot

    def spy(deadline, check=None, cost=0.0):
        calls.append(deadline - time.monotonic())
        return real_slot(deadline, check, cost)

    monkeypatch.setattr(engine.gate, "slot", spy)
    monkeypatch.setattr(engine, "lead", LeadConfig(first_grace_s=0.25))
    clock = PlaybackClock()
    list(engine.speak(Segment("Hello there.", 0, 12), 1.0, clock=clock))
    clock.played(5.0, time.monotonic())
    list(engine.speak(Segment("And again.", 12, 22), 1.0, clock=clock))
    assert 0.0 < calls[0] <= 0.25  # nothing playing: a later start, not a gap
    assert calls[-1] > 4.0  # playing: due when the queued audio runs out


def test_words_go_out_while_a_long_clause_is_still_streaming(engine):
    """Deltas arriving faster than the engine's poll timeout must not hold the first words back
    until the clause ends (the segmenter's clock is read after every delta too).  The text has no
    punctuation, so without that only the 200-character cut would release anything."""
    stream = TextStream()
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen " * 5
    sent = 0

    def feed() -> None:
        nonlocal sent
        for i in range(0, len(text), 4):
            stream.push(text[i:i + 4])
            sent = i + 4
            time.sleep(0.03)  # under the engine's 50 ms poll timeout
        stream.end()

    threading.Thread(target=feed, daemon=True).start()
    chunks = engine.synthesize(stream, SynthesisOptions())
    first = next(c for c in chunks if isinstance(c, AudioChunk) and len(c.samples))
    assert sent < 160, sent  # spoken long before the clause (or the 200-character cut) was complete
    assert first.text_offset is None or first.text_offset < 160
    for _ in chunks:  # drain
        pass
