"""The compatibility routes with the clients they are for, unchanged, against the real server:

- the official CosyVoice client's requests, byte for byte as it sends them (``requests``, GET with
  a form body, a multipart ``prompt_wav`` on GET, ``X-API-TOKEN``), decoded as it decodes them;
- the ``openai`` package's streaming speech call for every ``response_format`` and for SSE, each
  decoded by a decoder other than the encoder (libsndfile; FFmpeg's AAC decoder for AAC);
- the VoxCPM-style ``POST /api/tts/stream`` as its clients call it.

The tone engine speaks each word as 200 ms of a voice's pitch (a: 440 Hz, b: 660 Hz), so the
audio of every format can be checked for length and pitch; the TINY CosyVoice2 directory covers
the modes that need a prompt."""

from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import openai
import pytest
import requests
import soundfile as sf

from cosyvoice.model import SAMPLES_PER_TOKEN
from cosyvoice.tiny import SFT_SPEAKERS, write_model_dir
from realtime.engines import create_engine
from realtime.engines.tone import ToneEngine
from realtime.server import ServerConfig
from tests.serving import serve
from tests.test_cosyvoice_engine import prompt_wav

TOKEN = "sekret"
WORDS = "one two three four five six "  # six words: 1.2 s of tone
ZH, EN = SFT_SPEAKERS


@pytest.fixture(scope="module")
def tone_server():
    with serve(ToneEngine(sample_rate=24000), ServerConfig(token=TOKEN, voice_aliases={"nova": "b"})) as base:
        yield base


@pytest.fixture(scope="module")
def cv_server(tmp_path_factory):
    engine = create_engine("cosyvoice2", str(write_model_dir(tmp_path_factory.mktemp("compat") / "tiny")))
    with serve(engine) as base:
        yield base


def pitch(x: np.ndarray, rate: int) -> float:
    x = x[len(x) // 4 : 3 * len(x) // 4]
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


# ---- the official client ------------------------------------------------------------------------------


def official_client(
    base: str, mode: str, headers: dict | None = None, **args
) -> tuple[int, bytes, np.ndarray]:
    """What runtime/python/fastapi/client.py does for ``mode``: GET with the fields as a form
    body (files for the prompt modes), then the body read as int16 without looking at the status."""
    url = f"{base}/inference_{mode}"
    if mode == "sft":
        payload, files = {"tts_text": args["tts_text"], "spk_id": args["spk_id"]}, None
    elif mode == "zero_shot":
        payload = {"tts_text": args["tts_text"], "prompt_text": args["prompt_text"]}
        files = [("prompt_wav", ("prompt_wav", io.BytesIO(args["prompt_wav"]), "application/octet-stream"))]
    elif mode == "cross_lingual":
        payload = {"tts_text": args["tts_text"]}
        files = [("prompt_wav", ("prompt_wav", io.BytesIO(args["prompt_wav"]), "application/octet-stream"))]
    else:
        payload = {
            "tts_text": args["tts_text"],
            "spk_id": args["spk_id"],
            "instruct_text": args["instruct_text"],
        }
        files = None
    response = requests.request(
        "GET", url, data=payload, files=files, stream=True, headers=headers, timeout=120
    )
    audio = b"".join(response.iter_content(chunk_size=16000))
    return response.status_code, audio, np.frombuffer(audio[: len(audio) // 2 * 2], dtype=np.int16)


def error(body: bytes) -> dict:
    return json.loads(body)["error"]


@pytest.mark.slow
def test_the_official_client_in_every_mode_on_cosyvoice2(cv_server):
    wav = prompt_wav()
    text = "Hello world, this is a test of the official client."
    cases = {
        "sft": {"spk_id": EN},
        "zero_shot": {"prompt_text": "A prompt sentence.", "prompt_wav": wav},
        "cross_lingual": {"prompt_wav": wav},
        "instruct": {"spk_id": ZH, "instruct_text": "Speak slowly."},
    }
    for mode, args in cases.items():
        status, body, pcm = official_client(cv_server, mode, tts_text=text, **args)
        assert status == 200, (mode, body[:300])
        assert len(pcm) > 0 and len(pcm) % SAMPLES_PER_TOKEN == 0, mode
    # the official routes' fields are read from the query string too, and on POST
    r = requests.post(f"{cv_server}/inference_sft?spk_id={EN}", data={"tts_text": text}, timeout=120)
    assert r.status_code == 200 and len(r.content) % (2 * SAMPLES_PER_TOKEN) == 0


def test_the_official_client_with_x_api_token_and_its_refusals(tone_server):
    status, _, pcm = official_client(tone_server, "sft", {"X-API-TOKEN": TOKEN}, tts_text=WORDS, spk_id="b")
    assert status == 200 and len(pcm) == 6 * 4800
    assert abs(pitch(pcm / 32768, 24000) - 660) < 10
    status, body, _ = official_client(tone_server, "sft", tts_text=WORDS, spk_id="b")
    assert status == 401 and error(body)["code"] == "unauthorized"
    # CosyVoice 1's instruct mode on an engine that cannot follow instructions: a typed error
    status, body, _ = official_client(
        tone_server,
        "instruct",
        {"X-API-TOKEN": TOKEN},
        tts_text=WORDS,
        spk_id="a",
        instruct_text="Speak slowly.",
    )
    assert status == 400 and "instruct2" in error(body)["message"]
    status, body, _ = official_client(
        tone_server, "sft", {"X-API-TOKEN": TOKEN}, tts_text=WORDS, spk_id="nobody"
    )
    assert error(body)["code"] == "unknown_voice"
    r = requests.get(
        f"{tone_server}/inference_sft",
        data={"tts_text": WORDS},
        headers={"X-API-TOKEN": TOKEN},
        files={"evil": ("x.bin", b"x")},
        timeout=30,
    )
    assert r.status_code == 400 and "evil" in r.json()["error"]["message"]


# ---- OpenAI -------------------------------------------------------------------------------------------


def decode(data: bytes, response_format: str) -> tuple[np.ndarray, int]:
    """Mono float audio of a response, by a decoder other than the encoder: libsndfile for WAV,
    MP3 and Ogg Opus; FFmpeg's decoders for ADTS AAC and for FLAC (a live FLAC leaves its length
    unset in STREAMINFO, which libsndfile 1.2 cannot read); numpy for raw 24 kHz PCM."""
    if response_format == "pcm":
        return np.frombuffer(data, dtype="<i2") / 32768.0, 24000
    if response_format in ("aac", "flac"):
        with av.open(io.BytesIO(data), format={"aac": "aac", "flac": "flac"}[response_format]) as container:
            frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
            x = np.concatenate(frames)
            scale = 32768.0 if x.dtype == np.int16 else 2.0**31 if x.dtype == np.int32 else 1.0
            return x / scale, container.streams.audio[0].rate
    x, rate = sf.read(io.BytesIO(data), dtype="float32")
    return x, rate


@pytest.fixture(scope="module")
def client(tone_server):
    return openai.OpenAI(base_url=tone_server + "/v1", api_key=TOKEN)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_openai_sdk_streams_every_format(client, response_format):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input=WORDS, response_format=response_format
    ) as response:
        pieces = list(response.iter_bytes())
        content_type = response.headers["content-type"]
    data = b"".join(pieces)
    x, rate = decode(data, response_format)
    expected = {"opus": 48000}.get(response_format, 24000)
    assert rate == expected, content_type
    # 1.2 s of audio; lossy codecs add their encoder delay and padding (at most ~0.1 s)
    assert 1.2 <= len(x) / rate <= 1.35, (response_format, len(x) / rate)
    assert abs(pitch(x, rate) - 660) < 10  # "nova" is an alias of voice b (660 Hz)


def test_openai_sse_events_carry_the_audio(client):
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input=WORDS,
        response_format="pcm",
        extra_body={"stream_format": "sse"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [json.loads(line[len("data: ") :]) for line in raw.split("\n\n") if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == 2 * 6 * 4800 == events[-1]["usage"]["output_bytes"]
    assert abs(pitch(np.frombuffer(pcm, "<i2") / 32768, 24000) - 440) < 10  # alloy: the default voice


def test_openai_refusals_are_typed(client, tone_server):
    bad = openai.OpenAI(base_url=tone_server + "/v1", api_key="wrong")
    with pytest.raises(openai.PermissionDeniedError):  # a wrong token is 403 here (a missing one 401)
        bad.audio.speech.create(model="tts-1", voice="alloy", input=WORDS)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.speech.create(model="tts-1", voice="alloy", input=WORDS, response_format="ogg")
    with pytest.raises(openai.APIStatusError, match="unknown voice"):
        client.audio.speech.create(model="tts-1", voice="nobody", input=WORDS)
    with pytest.raises(openai.BadRequestError, match="speed"):
        client.audio.speech.create(model="tts-1", voice="alloy", input=WORDS, speed=9)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.audio.speech.create(model="tts-1", voice="alloy", input=" ")


def test_openai_instructions_on_an_engine_without_instruct2_are_reported_as_ignored(client):
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input=WORDS, instructions="Cheerfully.", response_format="wav"
    ) as response:
        assert response.headers["X-Ignored-Fields"] == "instructions"
        assert len(decode(response.read(), "wav")[0]) == 6 * 4800


def test_openai_models_list(client):
    ids = {m.id for m in client.models.list()}
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "tone"} <= ids


@pytest.mark.slow
def test_openai_instructions_follow_instruct2_on_cosyvoice2(cv_server):
    cv = openai.OpenAI(base_url=cv_server + "/v1", api_key="unused")
    with cv.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice=EN,
        input="Hello world, this is a test.",
        instructions="Speak slowly.",
        response_format="pcm",
    ) as response:
        assert "X-Ignored-Fields" not in response.headers
        pcm = response.read()
    assert len(pcm) > 0 and len(pcm) % (2 * SAMPLES_PER_TOKEN) == 0


# ---- VoxCPM-style /api/tts/stream ---------------------------------------------------------------------


def test_api_tts_stream_as_its_clients_call_it(tone_server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(
        f"{tone_server}/api/tts/stream",
        data={"text": WORDS, "inference_timesteps": 5},
        headers=auth,
        stream=True,
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.headers["X-Ignored-Fields"] == "inference_timesteps"
    x, rate = sf.read(io.BytesIO(b"".join(r.iter_content(8192))), dtype="float32")
    assert rate == 24000 and len(x) == 6 * 4800
    r = requests.post(
        f"{tone_server}/api/tts/stream", data={"text": WORDS, "temperature": 0.7}, headers=auth, timeout=30
    )
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = requests.post(
        f"{tone_server}/api/tts/stream",
        data={"text": WORDS, "prompt_text": "hi"},
        headers=auth,
        files={"prompt_audio": ("p.wav", prompt_wav(), "audio/wav")},
        timeout=30,
    )
    assert r.status_code == 400 and "zero_shot" in r.json()["error"]["message"]
    r = requests.post(f"{tone_server}/api/tts/stream", data={"text": ""}, headers=auth, timeout=30)
    assert r.status_code == 400


@pytest.mark.slow
def test_api_tts_stream_clones_a_voice_on_cosyvoice2(cv_server):
    r = requests.post(
        f"{cv_server}/api/tts/stream",
        data={"text": "Hello world, this is a test.", "prompt_text": "A prompt sentence.", "cfg_value": 2.0},
        files={"prompt_audio": ("p.wav", prompt_wav(), "audio/wav")},
        stream=True,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    x, rate = sf.read(io.BytesIO(b"".join(r.iter_content(8192))), dtype="float32")
    assert rate == 24000 and len(x) > 0 and len(x) % SAMPLES_PER_TOKEN == 0
    r = requests.post(
        f"{cv_server}/api/tts/stream", data={"text": "Hello.", "prompt_text": "A prompt."}, timeout=30
    )
    assert r.status_code == 400 and "prompt_audio" in r.json()["error"]["message"]
