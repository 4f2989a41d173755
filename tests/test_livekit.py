"""LiveKit Agents' own ElevenLabs plugin, unchanged, pointed at our server (``base_url=``): a
streamed turn (text pushed as an LLM would, then the end of input) comes back as the audio of
every word, with the words of the transcript.  Its word *times* read ElevenLabs' alignment as
cumulative across messages, which Pipecat reads as restarting per message; we follow Pipecat (see
docs/protocol.md), so only the words, not their times, are checked here.  Skipped where
livekit-plugins-elevenlabs is not installed (it is in the dev extra)."""

from __future__ import annotations

import pytest

elevenlabs = pytest.importorskip("livekit.plugins.elevenlabs")

import aiohttp  # noqa: E402

from realtime.engines.tone import ToneEngine  # noqa: E402
from realtime.server import ServerConfig  # noqa: E402
from tests.serving import serve  # noqa: E402

TOKEN = "livekit-key"


async def test_a_streamed_turn_comes_back_with_its_words():
    with serve(ToneEngine(sample_rate=24000, step_delay=0.01), ServerConfig(token=TOKEN)) as base:
        async with aiohttp.ClientSession() as session:
            tts = elevenlabs.TTS(
                api_key=TOKEN, voice_id="b", base_url=base + "/v1", encoding="pcm_24000", http_session=session
            )
            stream = tts.stream()
            for piece in ("One t", "wo thr", "ee fo", "ur."):
                stream.push_text(piece)
            stream.end_input()
            audio, words = b"", []
            async for event in stream:
                audio += event.frame.data.tobytes()
                words += [str(w).strip(" .") for w in event.frame.userdata.get("lk.timed_transcripts", [])]
            await stream.aclose()
            await tts.aclose()
    assert len(audio) == 4 * 4800 * 2  # four 200 ms words, 24 kHz 16-bit
    assert words == ["One", "two", "three", "four"]
