"""realtime.integrations.livekit.TTS, driven through LiveKit Agents' own ``SynthesizeStream`` and
``ChunkedStream`` machinery against a real server on a loopback port: a streamed turn comes back
as audio whose frames carry the words, timed in order (the aligned transcript); closing a stream
mid-turn (what the agent does on an interruption) cancels its context on the server and nothing
more of it is delivered; the next stream goes over the same socket; a socket the server closed is
reopened; a wrong token or voice is an error, not a hang.  Skipped where livekit-agents is not
installed (it is in the dev extra and the ``livekit`` extra).

``pytest tests/test_integrations_livekit.py -s`` prints the first-audio and frames-after-
interruption figures (the ``native LiveKit`` row of issue 11's table)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("livekit.agents")

from livekit.agents import APIConnectOptions, APIError, APIStatusError  # noqa: E402

from realtime.engines.tone import ToneEngine  # noqa: E402
from realtime.integrations.livekit import TTS  # noqa: E402
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

TOKEN = "livekit-native"
NO_RETRY = APIConnectOptions(max_retry=0, timeout=5)


@pytest.fixture(scope="module")
def engine():
    return ToneEngine(sample_rate=TONE_RATE, step_delay=0.02)


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, ServerConfig(token=TOKEN)) as base:
        yield base


async def speak(stream, pieces: list[str]) -> tuple[bytes, list, float]:
    """Push ``pieces`` as an LLM would, end the input, read everything: (audio, the frames' timed
    strings in order, ms from the first push to the first audio)."""
    t0 = time.perf_counter()
    for piece in pieces:
        stream.push_text(piece)
    stream.end_input()
    audio, timed, first = b"", [], None
    async for event in stream:
        first = first if first is not None else (time.perf_counter() - t0) * 1000
        audio += event.frame.data.tobytes()
        timed += event.frame.userdata.get("lk.timed_transcripts", [])
    return audio, timed, first


async def test_a_streamed_turn_comes_back_with_its_words_timed_in_order(server):
    tts = TTS(url=server, token=TOKEN, voice="b", sample_rate=TONE_RATE)
    assert tts.capabilities.streaming and tts.capabilities.aligned_transcript
    async with tts:
        stream = tts.stream()
        audio, timed, first_ms = await speak(stream, ["One t", "wo thr", "ee fo", "ur."])
        await stream.aclose()
    assert len(audio) == 4 * WORD_BYTES
    assert [w.strip(" .") for w in timed] == ["One", "two", "three", "four"]
    assert "".join(timed) == "One two three four."  # the strings together are the text as sent
    starts = [w.start_time for w in timed]
    assert starts == sorted(starts)
    # each tone word is 200 ms; a word never starts before the audio it is in
    assert [round(s * 1000) for s in starts] == [0, 200, 400, 600]
    assert all(w.end_time > w.start_time for w in timed)
    report("native LiveKit", first_audio_ms=first_ms)


async def test_closing_a_stream_mid_turn_cancels_it_and_the_next_stream_uses_the_same_socket(server, engine):
    tts = TTS(url=server, token=TOKEN, voice="b", sample_rate=TONE_RATE)
    async with tts:
        first = tts.stream()
        first.push_text(" ".join(["word"] * 200) + ".")  # 40 s of audio, 4 s of synthesis
        first.end_input()
        received: list[int] = []  # bytes per frame, as the agent would play them
        interrupted_at: list[int] = []

        async def play() -> None:
            async for event in first:
                received.append(len(event.frame.data.tobytes()))

        player = asyncio.create_task(play())
        while sum(received) < 3 * WORD_BYTES:  # some of the turn has been heard
            await asyncio.sleep(0.01)
        session = tts.session_id
        interrupted_at.append(len(received))
        await first.aclose()  # the agent's interruption
        await player
        after = len(received) - interrupted_at[0]

        second = tts.stream()
        audio, timed, _ = await speak(second, ["Five ", "six."])
        await second.aclose()
        # the server stopped the first turn (else its 4 s of synthesis would still be running)
        busy = engine.active
        assert tts.session_id == session  # one pooled socket for both turns
    assert after == 0
    assert 0 < sum(received) < 200 * WORD_BYTES
    assert len(audio) == 2 * WORD_BYTES and [w.strip(" .") for w in timed] == ["Five", "six"]
    assert busy == 0
    report("native LiveKit", frames_after_interruption=after)


async def test_flush_speaks_what_has_arrived_without_ending_the_input(server):
    async with TTS(url=server, token=TOKEN, sample_rate=TONE_RATE) as tts:
        stream = tts.stream()
        stream.push_text("One two")  # "two" may go on ("twofold"): the engine waits for more
        stream.flush()
        audio = b""
        async with asyncio.timeout(10):  # a hang guard: without the flush "two" never comes
            async for event in stream:
                audio += event.frame.data.tobytes()
                if len(audio) >= 2 * WORD_BYTES:
                    break
        stream.end_input()
        await stream.aclose()
    assert len(audio) == 2 * WORD_BYTES


async def test_streams_side_by_side_share_the_socket_and_keep_their_own_audio(server):
    tts = TTS(url=server, token=TOKEN, voice="b", sample_rate=TONE_RATE)
    async with tts:
        a, b = tts.stream(), tts.stream()
        (audio_a, timed_a, _), (audio_b, timed_b, _) = await asyncio.gather(
            speak(a, ["One two ", "three."]), speak(b, ["Four five."])
        )
        await a.aclose()
        await b.aclose()
    assert len(audio_a) == 3 * WORD_BYTES and "".join(timed_a) == "One two three."
    assert len(audio_b) == 2 * WORD_BYTES and "".join(timed_b) == "Four five."


async def test_prewarm_opens_the_socket_and_new_options_apply_to_the_next_stream(server):
    async with TTS(url=server, token=TOKEN, voice="b", sample_rate=TONE_RATE) as tts:
        tts.prewarm()
        while tts.session_id is None:
            await asyncio.sleep(0.01)
        session = tts.session_id
        audio_b, _, _ = await speak(tts.stream(), ["One."])
        tts.update_options(voice="a")
        audio_a, _, _ = await speak(tts.stream(), ["One."])
        assert tts.session_id == session
    assert len(audio_a) == len(audio_b) == WORD_BYTES and audio_a != audio_b


async def test_synthesize_gives_the_whole_text_with_its_transcript(server):
    async with TTS(url=server, token=TOKEN, sample_rate=TONE_RATE) as tts:
        chunked = tts.synthesize("Seven eight nine.")
        audio, timed = b"", []
        async for event in chunked:
            audio += event.frame.data.tobytes()
            timed += event.frame.userdata.get("lk.timed_transcripts", [])
        await chunked.aclose()
    # the three words, then at most LiveKit's own end-of-segment marker (10 ms of silence)
    assert 3 * WORD_BYTES <= len(audio) <= 3 * WORD_BYTES + TONE_RATE // 100 * 2
    assert not any(audio[3 * WORD_BYTES :])
    assert "".join(timed) == "Seven eight nine."


async def test_a_socket_the_server_closed_is_reopened_for_the_next_stream(engine):
    with serve(engine, ServerConfig(token=TOKEN, idle_timeout=0.3)) as base:
        async with TTS(url=base, token=TOKEN, sample_rate=TONE_RATE) as tts:
            first = tts.stream()
            audio1, _, _ = await speak(first, ["One two."])
            await first.aclose()
            session = tts.session_id
            while tts.connected:  # the server's idle timeout closes the socket
                await asyncio.sleep(0.05)
            second = tts.stream()
            audio2, timed2, _ = await speak(second, ["Three four."])
            await second.aclose()
            assert tts.session_id not in (None, session)
    assert len(audio1) == len(audio2) == 2 * WORD_BYTES
    assert "".join(timed2) == "Three four."


async def test_a_dropped_socket_is_reopened_for_the_next_stream(engine):
    with serve_server(engine, ServerConfig(token=TOKEN)) as (base, server):
        async with TTS(url=base, token=TOKEN, sample_rate=TONE_RATE) as tts:
            first = tts.stream()
            await speak(first, ["One two."])
            await first.aclose()
            session = tts.session_id
            drop_connections(server)
            while tts.connected:
                await asyncio.sleep(0.05)
            second = tts.stream()
            audio, timed, _ = await speak(second, ["Three four."])
            await second.aclose()
            assert tts.session_id not in (None, session)
    assert len(audio) == 2 * WORD_BYTES and "".join(timed) == "Three four."


async def test_word_times_from_marks_when_words_are_not_asked_for(server):
    async with TTS(url=server, token=TOKEN, sample_rate=TONE_RATE, word_timestamps=False) as tts:
        stream = tts.stream()
        audio, timed, _ = await speak(stream, ["One two ", "three."])
        await stream.aclose()
        assert not tts.word_timestamps_from_server
    assert len(audio) == 3 * WORD_BYTES
    assert [round(w.start_time * 1000) for w in timed] == [0, 200, 400]


async def test_a_wrong_token_is_an_error_not_a_hang(server):
    async with TTS(url=server, token="wrong", sample_rate=TONE_RATE) as tts:
        stream = tts.stream(conn_options=NO_RETRY)
        with pytest.raises(APIStatusError) as err:
            await speak(stream, ["Hello."])
        await stream.aclose()
    assert err.value.status_code == 403


async def test_an_unknown_voice_is_an_error_not_a_hang(server):
    async with TTS(url=server, token=TOKEN, voice="nobody", sample_rate=TONE_RATE) as tts:
        stream = tts.stream(conn_options=NO_RETRY)
        with pytest.raises(APIError, match="unknown_voice"):
            await speak(stream, ["Hello."])
        await stream.aclose()


async def test_a_rate_the_server_cannot_encode_is_refused_up_front(server):
    async with TTS(url=server, token=TOKEN, sample_rate=11025) as tts:
        stream = tts.stream(conn_options=NO_RETRY)
        with pytest.raises(APIStatusError, match="sample_rate|rate"):
            await speak(stream, ["Hello."])
        await stream.aclose()


@pytest.mark.parametrize("words", [True, False], ids=["words", "marks"])
async def test_the_default_voice_streams_a_turn_with_its_words_timed_in_order(words):
    from realtime.engines.piper import PiperEngine

    with serve(PiperEngine(), ServerConfig(token=TOKEN)) as base:
        async with TTS(url=base, token=TOKEN, sample_rate=24000, word_timestamps=words) as tts:
            stream = tts.stream()
            audio, timed, first_ms = await speak(stream, SENTENCE_PIECES)
            await stream.aclose()
    audio_s = len(audio) / 2 / 24000
    assert "".join(timed) == SENTENCE
    assert [w.strip() for w in timed] == SENTENCE.split()
    starts = [w.start_time for w in timed]
    assert starts == sorted(starts) and all(w.start_time <= w.end_time <= audio_s for w in timed)
    if words:
        report("native LiveKit (default voice)", first_audio_ms=first_ms, audio_s=audio_s)


def test_without_the_framework_the_import_error_names_the_extra():
    assert "cosyvoice-realtime[livekit]" in import_without("livekit", "realtime.integrations.livekit")
