"""LiveKit Agents' own ElevenLabs plugin, unchanged, pointed at our server (``base_url=``): a
streamed turn (text pushed as an LLM would, then the end of input) comes back as the audio of
every word, with the words of the transcript.  Its word *times* read ElevenLabs' alignment as
cumulative across messages, which Pipecat reads as restarting per message; we follow Pipecat (see
docs/protocol.md), so only the words, not their times, are checked here.  Skipped where
livekit-plugins-elevenlabs is not installed (it is in the dev extra)."""

from __future__ import annotations

import pytest

elevenlabs = pytest.importorskip("livekit.plugins.elevenlabs")

import asyncio  # noqa: E402

import aiohttp  # noqa: E402

from realtime.engines.tone import ToneEngine  # noqa: E402
from realtime.server import ServerConfig  # noqa: E402
from tests.framework_util import WORD_BYTES, report  # noqa: E402
from tests.serving import serve  # noqa: E402
from tests.test_integrations_livekit import speak  # noqa: E402

TOKEN = "livekit-key"


async def test_a_streamed_turn_comes_back_with_its_words():
    with serve(ToneEngine(sample_rate=24000, step_delay=0.01), ServerConfig(token=TOKEN)) as base:
        async with aiohttp.ClientSession() as session:
            tts = elevenlabs.TTS(
                api_key=TOKEN, voice_id="b", base_url=base + "/v1", encoding="pcm_24000", http_session=session
            )
            stream = tts.stream()
            audio, timed, first_ms = await speak(stream, ["One t", "wo thr", "ee fo", "ur."])
            await stream.aclose()
            await tts.aclose()
    assert len(audio) == 4 * WORD_BYTES  # four 200 ms words, 24 kHz 16-bit
    assert [str(w).strip(" .") for w in timed] == ["One", "two", "three", "four"]
    report("LiveKit ElevenLabs", first_audio_ms=first_ms)


async def test_closing_a_stream_mid_turn_stops_its_audio():
    """The agent's interruption (``aclose`` before the end) stops the turn's audio."""
    with serve(ToneEngine(sample_rate=24000, step_delay=0.02), ServerConfig(token=TOKEN)) as base:
        async with aiohttp.ClientSession() as session:
            tts = elevenlabs.TTS(
                api_key=TOKEN, voice_id="b", base_url=base + "/v1", encoding="pcm_24000", http_session=session
            )
            stream = tts.stream()
            stream.push_text(" ".join(["word"] * 200) + ".")  # 40 s of audio, 4 s of synthesis
            stream.end_input()
            received: list[int] = []

            async def play() -> None:
                async for event in stream:
                    received.append(len(event.frame.data.tobytes()))

            player = asyncio.create_task(play())
            while sum(received) < 3 * WORD_BYTES:
                await asyncio.sleep(0.01)
            interrupted_at = len(received)
            await stream.aclose()
            await player
            await tts.aclose()
    after = len(received) - interrupted_at
    # the plugin stops taking the context's audio at once; what may still come out is its own
    # emitter flushing the audio it had already received (at most a frame or two), never the rest
    # of the 40 s turn that the server was still speaking
    assert after <= 2 and 0 < sum(received) < 200 * WORD_BYTES
    report("LiveKit ElevenLabs", frames_after_interruption=after)
