"""realtime.integrations.pipecat.RealtimeTTSService, run by Pipecat's own pipeline against a real
server on a loopback port: a turn streamed in as LLM tokens comes back as audio with its words
timed in order; an interruption cancels the turn's context on the server and none of its audio
is played after it; the next turn goes over the same socket; a socket the server closed is
reopened; a server without ``words`` messages still gives word times (from marks).  Skipped where
pipecat-ai is not installed (it is in the dev extra and the ``pipecat`` extra).

``pytest tests/test_integrations_pipecat.py -s`` prints the first-audio and frames-after-
interruption figures (the ``native Pipecat`` row of issue 11's table)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed  # noqa: E402
from pipecat.services.tts_service import TextAggregationMode, TTSService  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from realtime.engines.tone import ToneEngine  # noqa: E402
from realtime.integrations.pipecat import RealtimeTTSService  # noqa: E402
from realtime.server import ServerConfig  # noqa: E402
from tests.framework_util import (
    SENTENCE,
    SENTENCE_PIECES,
    TONE_RATE,
    WORD_BYTES,
    drop_connections,
    import_without,
    report,
)  # noqa: E402
from tests.serving import serve, serve_server  # noqa: E402

TOKEN = "pipecat-native"


class Timeline(BaseObserver):
    """What the service pushed, in order, with the time it did (and when the first frame reached
    it): what a transport downstream would have played, and when."""

    def __init__(self, service: TTSService) -> None:
        super().__init__(observe_every_push=True)
        self.service = service
        self.pushed: list[tuple[float, object]] = []
        self.first_input: float | None = None
        self.sessions: set[str | None] = set()  # the server session each audio frame came over
        self.on_stopped = None  # called with the frame when the service pushes a TTSStoppedFrame

    async def on_push_frame(self, data: FramePushed) -> None:
        now = time.perf_counter()
        if data.destination is self.service and self.first_input is None:
            if isinstance(data.frame, (LLMTextFrame, TTSSpeakFrame)):
                self.first_input = now
        if data.source is self.service:
            self.pushed.append((now, data.frame))
            if isinstance(data.frame, TTSAudioRawFrame):
                self.sessions.add(getattr(self.service, "session_id", None))  # (ours has one)
            if isinstance(data.frame, TTSStoppedFrame) and self.on_stopped:
                self.on_stopped(data.frame)

    def audio(self, context_id: str | None = None) -> list[TTSAudioRawFrame]:
        return [
            f
            for _, f in self.pushed
            if isinstance(f, TTSAudioRawFrame) and (context_id is None or f.context_id == context_id)
        ]

    def first_audio_ms(self) -> float:
        first = next(t for t, f in self.pushed if isinstance(f, TTSAudioRawFrame))
        return (first - self.first_input) * 1000

    def index(self, kind: type) -> int:
        return next(i for i, (_, f) in enumerate(self.pushed) if isinstance(f, kind))


@pytest.fixture(scope="module")
def engine():
    return ToneEngine(sample_rate=TONE_RATE, step_delay=0.02)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, ServerConfig(token=TOKEN)) as base:
        yield base


def service(base: str, **kwargs) -> RealtimeTTSService:
    kwargs.setdefault("sample_rate", TONE_RATE)
    kwargs.setdefault("settings", RealtimeTTSService.Settings(voice="b"))
    return RealtimeTTSService(url=base, token=TOKEN, **kwargs)


def streamed_turn(*pieces: str) -> list:
    """An LLM's reply as Pipecat's LLM services push it: start, tokens, end."""
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(p) for p in pieces], LLMFullResponseEndFrame()]


def words_of(timeline: Timeline) -> list[TTSTextFrame]:
    return [f for _, f in timeline.pushed if isinstance(f, TTSTextFrame)]


async def test_a_streamed_turn_arrives_as_audio_with_its_words_in_order(server):
    tts = service(server, text_aggregation_mode=TextAggregationMode.TOKEN)
    timeline = Timeline(tts)
    await run_test(
        tts,
        frames_to_send=[*streamed_turn("One t", "wo thr", "ee fo", "ur."), SleepFrame(1.5)],
        observers=[timeline],
    )
    audio = timeline.audio()
    assert b"".join(f.audio for f in audio) and len(b"".join(f.audio for f in audio)) == 4 * WORD_BYTES
    assert {f.context_id for f in audio} == {audio[0].context_id}  # one context for the turn
    words = words_of(timeline)
    assert [w.text.strip(" .") for w in words] == ["One", "two", "three", "four"]
    times = [w.pts for w in words]
    assert None not in times and times == sorted(times) and len(set(times)) == 4
    # a word is never stamped before the audio it is in: the tone engine makes each word 200 ms
    assert [round((t - times[0]) / 1e6) for t in times] == [0, 200, 400, 600]
    report("native Pipecat", first_audio_ms=timeline.first_audio_ms())


async def test_sentences_of_one_turn_are_one_context_with_their_spaces(server):
    tts = service(server)  # Pipecat's default: whole sentences
    timeline = Timeline(tts)
    await run_test(
        tts,
        frames_to_send=[*streamed_turn("One two", ". Three", " four."), SleepFrame(1.5)],
        observers=[timeline],
    )
    audio = timeline.audio()
    assert len({f.context_id for f in audio}) == 1
    # "two." and "Three" stay two words: the sentences are sent with the space between them
    assert len(b"".join(f.audio for f in audio)) == 4 * WORD_BYTES
    assert [w.text.strip(" .") for w in words_of(timeline)] == ["One", "two", "Three", "four"]


async def test_an_interruption_cancels_the_turn_and_the_next_turn_uses_the_same_socket(server, engine):
    tts = service(server)
    timeline = Timeline(tts)
    long_text = " ".join(["word"] * 200) + "."  # 40 s of audio, 4 s of synthesis
    engine_busy_at_second_turn_end: list[int] = []
    timeline.on_stopped = lambda frame: engine_busy_at_second_turn_end.append(engine.active)
    await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame(long_text),
            SleepFrame(0.6),
            InterruptionFrame(),
            SleepFrame(0.3),
            TTSSpeakFrame("Five six."),
            SleepFrame(1.5),
        ],
        observers=[timeline],
    )
    first = timeline.audio()[0].context_id
    cut = timeline.index(InterruptionFrame)
    after = [f for _, f in timeline.pushed[cut:] if isinstance(f, TTSAudioRawFrame) and f.context_id == first]
    assert after == []  # nothing of the interrupted turn is played after the interruption
    heard = len(b"".join(f.audio for f in timeline.audio(first))) // WORD_BYTES
    assert 0 < heard < 200
    # the turn is remembered as far as it was heard: its word frames are the words whose audio
    # went out (a word's time comes once its audio has, so at most the last one is missing)
    remembered = [
        w for _, w in timeline.pushed[:cut] if isinstance(w, TTSTextFrame) and w.context_id == first
    ]
    assert heard - 1 <= len(remembered) <= heard
    assert all(w.text == "word" for w in remembered)
    second = [f for f in timeline.audio() if f.context_id != first]
    assert len(b"".join(f.audio for f in second)) == 2 * WORD_BYTES
    # the server stopped the interrupted turn's synthesis (else it would still be running: 4 s),
    # and both turns went over one socket
    assert engine_busy_at_second_turn_end == [0]
    assert len(timeline.sessions) == 1 and None not in timeline.sessions
    report("native Pipecat", frames_after_interruption=len(after))


async def test_a_new_voice_applies_from_the_next_turn_on_the_same_socket(server):
    tts = service(server)  # voice "b"
    timeline = Timeline(tts)
    await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame("One."),
            SleepFrame(0.5),
            TTSUpdateSettingsFrame(delta=RealtimeTTSService.Settings(voice="a", speed=1.0)),
            TTSSpeakFrame("One."),
            SleepFrame(0.5),
            TTSSpeakFrame("One."),
            SleepFrame(0.5),
        ],
        observers=[timeline],
    )
    turns: dict[str, bytes] = {}
    for f in timeline.audio():
        turns[f.context_id] = turns.get(f.context_id, b"") + f.audio
    b, a1, a2 = turns.values()
    assert len(b) == len(a1) == WORD_BYTES
    assert b != a1 and a1 == a2  # the tone engine's voices differ in pitch
    assert len(timeline.sessions) == 1


async def test_word_times_from_marks_when_words_are_not_asked_for(server):
    tts = service(server, word_timestamps=False)
    timeline = Timeline(tts)
    await run_test(
        tts, frames_to_send=[TTSSpeakFrame("One two three."), SleepFrame(1.0)], observers=[timeline]
    )
    assert not tts.word_timestamps_from_server
    assert len(b"".join(f.audio for f in timeline.audio())) == 3 * WORD_BYTES
    times = [w.pts for w in words_of(timeline)]
    assert [w.text.strip(" .") for w in words_of(timeline)] == ["One", "two", "three"]
    assert [round((t - times[0]) / 1e6) for t in times] == [0, 200, 400]


async def test_a_rate_the_server_does_not_encode_is_resampled_here(server):
    tts = service(server, sample_rate=11025)  # refused by the server: 24 kHz comes, 11.025 leaves
    timeline = Timeline(tts)
    await run_test(
        tts, frames_to_send=[TTSSpeakFrame("One two three four."), SleepFrame(1.0)], observers=[timeline]
    )
    audio = timeline.audio()
    assert {f.sample_rate for f in audio} == {11025}
    expected = 4 * 11025 * 200 // 1000 * 2  # four 200 ms words at 11.025 kHz
    assert abs(len(b"".join(f.audio for f in audio)) - expected) <= 4  # rounding at the ends
    assert [w.text.strip(" .") for w in words_of(timeline)] == ["One", "two", "three", "four"]


async def test_a_socket_the_server_closed_is_reopened(engine):
    with serve(engine, ServerConfig(token=TOKEN, idle_timeout=0.5)) as base:
        tts = service(base)
        timeline = Timeline(tts)
        await run_test(
            tts,
            frames_to_send=[
                TTSSpeakFrame("One two."),
                SleepFrame(1.5),  # idle past the server's timeout: it closes the socket
                TTSSpeakFrame("Three four."),
                SleepFrame(1.0),
            ],
            observers=[timeline],
        )
    turns = [f.context_id for f in timeline.audio()]
    assert len(set(turns)) == 2 and len(b"".join(f.audio for f in timeline.audio())) == 4 * WORD_BYTES
    assert len(timeline.sessions) == 2  # the second turn went over a new socket


async def test_a_dropped_socket_is_reconnected_for_the_next_turn(engine):
    with serve_server(engine, ServerConfig(token=TOKEN)) as (base, server):
        tts = service(base)
        timeline = Timeline(tts)
        timeline.on_stopped = lambda frame: drop_connections(server)  # after the first turn
        await run_test(
            tts,
            frames_to_send=[
                TTSSpeakFrame("One two."),
                SleepFrame(1.5),
                TTSSpeakFrame("Three four."),
                SleepFrame(1.0),
            ],
            observers=[timeline],
        )
    assert len({f.context_id for f in timeline.audio()}) == 2
    assert len(b"".join(f.audio for f in timeline.audio())) == 4 * WORD_BYTES
    assert len(timeline.sessions) == 2


async def test_a_wrong_token_is_an_error_not_a_hang(server):
    tts = RealtimeTTSService(url=server, token="wrong", sample_rate=24000)
    timeline = Timeline(tts)
    _, up = await run_test(
        tts, frames_to_send=[TTSSpeakFrame("Hello."), SleepFrame(0.5)], observers=[timeline]
    )
    assert timeline.audio() == []
    assert any(isinstance(f, ErrorFrame) and "403" in f.error for f in up)


async def test_an_unknown_voice_is_an_error_not_a_hang(server):
    tts = service(server, settings=RealtimeTTSService.Settings(voice="nobody"))
    timeline = Timeline(tts)
    _, up = await run_test(
        tts, frames_to_send=[TTSSpeakFrame("Hello."), SleepFrame(0.5)], observers=[timeline]
    )
    assert timeline.audio() == []
    assert any(isinstance(f, ErrorFrame) and "unknown_voice" in f.error for f in up)


@pytest.mark.parametrize("words", [True, False], ids=["words", "marks"])
async def test_the_default_voice_streams_a_turn_with_its_words_timed_in_order(words):
    from realtime.engines.piper import PiperEngine

    with serve(PiperEngine(), ServerConfig(token=TOKEN)) as base:
        tts = RealtimeTTSService(
            url=base,
            token=TOKEN,
            sample_rate=24000,
            text_aggregation_mode=TextAggregationMode.TOKEN,
            word_timestamps=words,
        )
        timeline = Timeline(tts)
        await run_test(
            tts, frames_to_send=[*streamed_turn(*SENTENCE_PIECES), SleepFrame(4.0)], observers=[timeline]
        )
    audio_s = len(b"".join(f.audio for f in timeline.audio())) / 2 / 24000
    timed = words_of(timeline)
    assert [w.text for w in timed] == SENTENCE.split()
    times = [(w.pts - timed[0].pts) / 1e9 for w in timed]
    assert times == sorted(times) and times[-1] < audio_s
    if words:
        report("native Pipecat (default voice)", first_audio_ms=timeline.first_audio_ms(), audio_s=audio_s)


def test_without_the_framework_the_import_error_names_the_extra():
    assert "cosyvoice-realtime[pipecat]" in import_without("pipecat", "realtime.integrations.pipecat")
