"""The ElevenLabs-compatible streaming input, driven as its clients drive it (the messages Pipecat's
and LiveKit's ElevenLabs integrations send): a streamed turn per context, flush, barge-in with
close_context, the single-context form ending on an empty text, auth by xi-api-key or in the
first message, output formats; alignment inside the audio and in order."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from realtime.engines.tone import ToneEngine
from realtime.server import ServerConfig
from tests.serving import serve

TOKEN = "xi-secret"
WORDS = "one two three four "


@pytest.fixture(scope="module")
def server():
    with serve(ToneEngine(sample_rate=24000, step_delay=0.01), ServerConfig(token=TOKEN)) as base:
        yield base.replace("http://", "ws://")


async def until_final(ws, context: str | None = None) -> tuple[bytes, list[dict]]:
    audio, messages = b"", []
    async with asyncio.timeout(30):
        while True:
            m = json.loads(await ws.recv())
            messages.append(m)
            if m.get("audio") and (context is None or m.get("contextId") == context):
                audio += base64.b64decode(m["audio"])
            if m.get("isFinal") and (context is None or m.get("contextId") == context):
                return audio, messages


def check_alignment(messages: list[dict], text: str) -> None:
    """Every character once, in order; each message's times inside its own audio."""
    chars = []
    for m in messages:
        a = m.get("alignment")
        if not a:
            continue
        ms = len(base64.b64decode(m["audio"])) / 2 / 24  # pcm_24000, 16-bit
        starts, durations = a["charStartTimesMs"], a["charDurationsMs"]
        assert starts == sorted(starts) and len(starts) == len(durations) == len(a["chars"])
        assert all(0 <= s and s + d <= ms + 1 for s, d in zip(starts, durations, strict=True))
        chars += a["chars"]
    assert "".join(chars) == text


async def test_multi_stream_input_turns_flush_and_barge_in(server):
    url = f"{server}/v1/text-to-speech/b/multi-stream-input?output_format=pcm_24000&sync_alignment=true"
    async with connect(url, additional_headers={"xi-api-key": TOKEN}, max_size=None) as ws:
        await ws.send(
            json.dumps(
                {
                    "text": " ",
                    "context_id": "t1",
                    "voice_settings": {"stability": 0.5},
                    "generation_config": {"chunk_length_schedule": [50]},
                }
            )
        )
        for piece in ("one ", "two ", "three ", "four "):
            await ws.send(json.dumps({"text": piece, "context_id": "t1", "try_trigger_generation": True}))
        await ws.send(json.dumps({"context_id": "t1", "flush": True}))
        await ws.send(json.dumps({"context_id": "t1", "close_context": False, "text": ""}))  # keep-alive
        # a second turn starts while the first speaks; the first is interrupted
        await ws.send(json.dumps({"text": " ", "context_id": "t2"}))
        await ws.send(json.dumps({"text": "five six ", "context_id": "t2", "flush": True}))
        by_context: dict[str, list[dict]] = {"t1": [], "t2": []}

        def audio_of(context: str) -> bytes:
            return b"".join(base64.b64decode(m["audio"]) for m in by_context[context] if m.get("audio"))

        async with asyncio.timeout(30):
            while len(audio_of("t1")) < 4 * 4800 * 2:
                m = json.loads(await ws.recv())
                by_context[m["contextId"]].append(m)
        assert len(audio_of("t1")) == 4 * 4800 * 2  # four 200 ms words at 24 kHz
        check_alignment(by_context["t1"], WORDS)
        await ws.send(json.dumps({"context_id": "t1", "close_context": True}))  # end of turn: then isFinal
        await ws.send(
            json.dumps({"close_socket": True})
        )  # t2 finishes what it was sent, then the socket closes
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(30):
                while True:
                    m = json.loads(await ws.recv())
                    by_context[m["contextId"]].append(m)
        assert closed.value.rcvd.code == 1000
        messages2, audio2 = by_context["t2"], audio_of("t2")
        assert [m for m in by_context["t1"] if m.get("isFinal")] == [{"isFinal": True, "contextId": "t1"}]
        assert len(audio2) == 2 * 4800 * 2 and messages2[-1]["isFinal"] is True
        check_alignment(messages2, "five six ")


async def test_stream_input_ends_on_empty_text_and_closes(server):
    url = f"{server}/v1/text-to-speech/a/stream-input?output_format=pcm_16000"
    async with connect(url, max_size=None) as ws:  # the key in the first message (browsers)
        await ws.send(json.dumps({"text": " ", "xi_api_key": TOKEN}))
        await ws.send(json.dumps({"text": WORDS}))
        await ws.send(json.dumps({"text": ""}))
        audio, messages = await until_final(ws)
        assert len(audio) == 4 * 3200 * 2  # 200 ms words at 16 kHz
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                await ws.recv()
        assert closed.value.rcvd.code == 1000


async def test_refusals_are_typed(server):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            f"{server}/v1/text-to-speech/a/stream-input", additional_headers={"xi-api-key": "no"}
        ):
            pass
    assert refused.value.response.status_code == 403
    async with connect(f"{server}/v1/text-to-speech/a/stream-input") as ws:
        await ws.send(json.dumps({"text": " ", "xi_api_key": "wrong"}))
        assert json.loads(await ws.recv())["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
    url = f"{server}/v1/text-to-speech/a/stream-input?output_format=opus_48000"
    async with connect(url, additional_headers={"xi-api-key": TOKEN}) as ws:
        error = json.loads(await ws.recv())
        assert error["code"] == "bad_request" and "output_format" in error["message"]
    url = f"{server}/v1/text-to-speech/a/stream-input?inactivity_timeout=soon"
    async with connect(url, additional_headers={"xi-api-key": TOKEN}) as ws:
        error = json.loads(await ws.recv())
        assert error["code"] == "bad_request" and "inactivity_timeout" in error["message"]
    async with connect(
        f"{server}/v1/text-to-speech/nobody/stream-input", additional_headers={"xi-api-key": TOKEN}
    ) as ws:
        assert json.loads(await ws.recv())["code"] == "unknown_voice"
    async with connect(
        f"{server}/v1/text-to-speech/a/stream-input", additional_headers={"xi-api-key": TOKEN}
    ) as ws:
        await ws.send(json.dumps({"text": "hi", "temperature": 2}))
        assert json.loads(await ws.recv())["code"] == "bad_request"


async def test_mp3_and_ulaw_output(server):
    import io

    import av

    for fmt, check in (("mp3_44100_128", "mp3"), ("ulaw_8000", "ulaw")):
        url = f"{server}/v1/text-to-speech/a/stream-input?output_format={fmt}"
        async with connect(url, additional_headers={"xi-api-key": TOKEN}, max_size=None) as ws:
            await ws.send(json.dumps({"text": WORDS}))
            await ws.send(json.dumps({"text": ""}))
            audio, _ = await until_final(ws)
        if check == "ulaw":
            assert len(audio) == 4 * 1600  # 8 kHz, a byte a sample
        else:
            with av.open(io.BytesIO(audio), format="mp3") as c:
                n = sum(f.samples for f in c.decode(audio=0))
            assert 0.8 * 44100 <= n <= 0.8 * 44100 + 4000


async def test_cosyvoice2_audio_leaves_while_the_text_is_still_open(tmp_path):
    """A segment's mark comes only at its end on CosyVoice2: its chunks must not wait for it."""
    from cosyvoice.tiny import write_model_dir
    from realtime.engines import create_engine

    engine = create_engine("cosyvoice2", str(write_model_dir(tmp_path / "tiny")))
    with serve(engine) as base:
        url = (
            base.replace("http://", "ws://")
            + "/v1/text-to-speech/default/multi-stream-input?output_format=pcm_24000"
        )
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "c"}))
            await ws.send(
                json.dumps(
                    {"text": "Hello there, this is a long answer that keeps going ", "context_id": "c"}
                )
            )
            async with asyncio.timeout(60):
                first = json.loads(await ws.recv())  # before any flush or close: streamed
            assert first["contextId"] == "c" and first["audio"] and first["isFinal"] is False
            await ws.send(json.dumps({"context_id": "c", "close_context": True}))
            audio, messages = await until_final(ws, "c")
            aligned = "".join(
                c for m in [first, *messages] if m.get("alignment") for c in m["alignment"]["chars"]
            )
            assert aligned == "Hello there, this is a long answer that keeps going "


async def test_alignment_comes_from_the_voices_word_times(tmp_path):
    """On a voice whose durations are known (a tiny Piper-shaped voice), each word's characters are
    placed at that word's time as our own ``words`` message gives it, not spread over the chunk."""
    from realtime.engines.piper import LeadConfig, PiperEngine
    from tests.serving import ws_url
    from tests.tiny_piper import CONFIG, write_tiny_piper

    text = "Meet me at 3:45, then pay $12.50 today."
    engine = PiperEngine(
        write_tiny_piper(tmp_path / "tiny.onnx"), CONFIG, warmup=False, lead=LeadConfig(enabled=False)
    )
    with serve(engine) as base:
        async with connect(ws_url(base), max_size=None) as ws:  # our protocol: the words
            await ws.send(json.dumps({"type": "start", "timestamps": "words", "audio_transport": "json"}))
            await ws.send(json.dumps({"type": "text", "text": text}))
            await ws.send(json.dumps({"type": "end"}))
            words = []
            async with asyncio.timeout(30):
                while (m := json.loads(await ws.recv()))["type"] != "done":
                    words += m.get("words", [])
        url = base.replace("http://", "ws://") + "/v1/text-to-speech/joe/stream-input?output_format=pcm_22050"
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": text}))
            await ws.send(json.dumps({"text": ""}))
            _, messages = await until_final(ws)
    assert [w["word"] for w in words] == ["Meet", "me", "at", "3:45", "then", "pay", "$12.50", "today"]
    at_ms: list[float] = []  # every character's start on the audio clock
    elapsed, chars = 0.0, ""
    for m in messages:
        ms = len(base64.b64decode(m["audio"])) / 2 / 22.05 if m.get("audio") else 0.0
        if a := m.get("alignment"):
            starts, durations = a["charStartTimesMs"], a["charDurationsMs"]
            assert starts == sorted(starts)
            assert all(0 <= s and s + d <= ms + 1 for s, d in zip(starts, durations, strict=True))
            at_ms += [elapsed + s for s in starts]
            chars += "".join(a["chars"])
        elapsed += ms
    assert chars == text
    for w in words:
        assert at_ms[w["start"]] == pytest.approx(w["start_ms"], abs=1.01)
        assert all(
            w["start_ms"] - 1.01 <= at_ms[k] <= w["end_ms"] + 1.01 for k in range(w["start"], w["end"])
        )


async def test_alignments_add_up_to_the_audio_as_pipecat_reads_them():
    """Pipecat places a message's characters at the sum of the earlier alignments' spans plus their
    own times.  Each alignment spans exactly the audio since the previous one (the pause after a
    clause included), so that sum is where each character is in the audio: no drift however long
    the turn (measured before: 66 ms mean, 150 ms max early over three answers)."""
    from realtime.engines.piper import PiperEngine

    text = "Sure, the weather in Paris is sunny today. Anything else? I can also check tomorrow."
    with serve(PiperEngine()) as base:
        url = base.replace("http://", "ws://") + "/v1/text-to-speech/joe/stream-input?output_format=pcm_22050"
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"text": " "}))
            for i in range(0, len(text), 4):  # as an LLM streams it: the voice starts mid-clause
                await ws.send(json.dumps({"text": text[i : i + 4]}))
                await asyncio.sleep(0.03)
            await ws.send(json.dumps({"text": ""}))
            _, messages = await until_final(ws)
    summed_ms, on_clock, told, elapsed = [], [], 0, 0.0
    for m in messages:
        if a := m.get("alignment"):
            summed_ms += [told + s for s in a["charStartTimesMs"]]
            on_clock += [elapsed + s for s in a["charStartTimesMs"]]
            told += a["charStartTimesMs"][-1] + a["charDurationsMs"][-1]
        elapsed += len(base64.b64decode(m["audio"])) / 2 / 22.05 if m.get("audio") else 0.0
    assert len(summed_ms) == len(text) and len([m for m in messages if m.get("alignment")]) >= 3
    assert summed_ms == pytest.approx(on_clock, abs=1.01)
    assert told == pytest.approx(elapsed, abs=1.01)
