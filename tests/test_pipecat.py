"""Pipecat's own ElevenLabsTTSService, unchanged, pointed at our server (``url=``): a spoken turn
arrives as audio frames with word timestamps, and an interruption mid-turn stops that turn's
audio.  Skipped where pipecat-ai is not installed (it is in the dev extra)."""

from __future__ import annotations

import pytest

pipecat = pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from realtime.engines.tone import ToneEngine  # noqa: E402
from realtime.server import ServerConfig  # noqa: E402
from tests.framework_util import report  # noqa: E402
from tests.serving import serve  # noqa: E402
from tests.test_integrations_pipecat import Timeline, streamed_turn  # noqa: E402

TOKEN = "pipecat-key"


@pytest.fixture(scope="module")
def server():
    with serve(ToneEngine(sample_rate=24000, step_delay=0.02), ServerConfig(token=TOKEN)) as base:
        yield base.replace("http://", "ws://")


def service(url: str) -> ElevenLabsTTSService:
    return ElevenLabsTTSService(
        api_key=TOKEN, url=url, sample_rate=24000, settings=ElevenLabsTTSService.Settings(voice="b")
    )


async def test_a_spoken_turn_arrives_with_word_timestamps(server):
    tts = service(server)
    timeline = Timeline(tts)
    down, _ = await run_test(
        tts, frames_to_send=[TTSSpeakFrame("One two three four."), SleepFrame(3.0)], observers=[timeline]
    )
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert len(audio) == 4 * 4800 * 2  # four 200 ms words, 24 kHz 16-bit
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [w.text.strip(" .") for w in words] == ["One", "two", "three", "four"]
    times = [w.pts for w in words if w.pts is not None]
    assert times == sorted(times)
    report("Pipecat ElevenLabs", first_audio_ms=timeline.first_audio_ms())


async def test_an_llm_turn_streamed_token_by_token_arrives_with_its_words(server):
    """The reply as an LLM streams it (pieces that cut words), sentence-aggregated by Pipecat as
    its ElevenLabs service does by default, which sends each sentence without the space the
    protocol asks for: all of its audio, the words in order ("three." and "Four" stay two)."""
    tts = service(server)
    timeline = Timeline(tts)
    down, _ = await run_test(
        tts,
        frames_to_send=[*streamed_turn("One t", "wo thr", "ee. Fo", "ur five."), SleepFrame(3.0)],
        observers=[timeline],
    )
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert len(audio) == 5 * 4800 * 2  # five 200 ms words
    assert [w.text.strip(" .") for w in words] == ["One", "two", "three", "Four", "five"]
    times = [w.pts for w in words if w.pts is not None]
    assert len(times) == 5 and times == sorted(times)


async def test_an_interruption_stops_the_turn(server):
    long_text = " ".join(["word"] * 40) + "."
    tts = service(server)
    timeline = Timeline(tts)
    down, _ = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(long_text), SleepFrame(0.5), InterruptionFrame(), SleepFrame(1.0)],
        observers=[timeline],
    )
    audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
    assert 0 < len(audio) < 40 * 4800 * 2  # some of it, not the whole turn
    cut = timeline.index(InterruptionFrame)
    after = [f for _, f in timeline.pushed[cut:] if isinstance(f, TTSAudioRawFrame)]
    assert after == []  # nothing of the interrupted turn is pushed after the interruption
    report("Pipecat ElevenLabs", frames_after_interruption=len(after))
