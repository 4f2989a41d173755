"""Integration: the real app under uvicorn on loopback, a real ``websockets`` client, and the tone
engine (fast and deterministic, so these tests are about the service, not a model)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets
from websockets.asyncio.client import connect

from realtime.engines.tone import ToneEngine
from realtime.protocol import Limits
from realtime.server import ServerConfig
from tests.serving import collect, serve, ws_url

WORDS5 = "one two three four five "  # five words → 5 × 200 ms of tone


def decode_av(data: bytes, fmt: str | None = None, rate: int | None = None) -> tuple[np.ndarray, int]:
    """Independent decoder (FFmpeg through PyAV) → mono float32 and rate."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if rate else {}
    container = av.open(io.BytesIO(data), format=fmt, options=options)
    chunks, rate = [], None
    for frame in container.decode(audio=0):
        rate = frame.sample_rate
        chunks.append(
            frame.to_ndarray()
            .astype(np.float32)
            .reshape(frame.layout.nb_channels if hasattr(frame.layout, "nb_channels") else 1, -1)[0]
            if frame.format.is_planar
            else frame.to_ndarray().astype(np.float32).reshape(-1)
        )
    container.close()
    x = np.concatenate(chunks)
    if np.abs(x).max() > 2:  # integer samples
        x = x / 32768.0
    return x, rate


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


@pytest.fixture
def tone():
    return ToneEngine(sample_rate=24000)


@pytest.fixture
def server(tone):
    with serve(tone, ServerConfig(send_timeout=1.5)) as base:
        yield base


async def speak(base: str, start: dict, text: str = WORDS5):
    async with connect(ws_url(base), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        await ws.send(json.dumps({"type": "text", "text": text}))
        await ws.send(json.dumps({"type": "end"}))
        audio, msgs = await collect(ws)
    return ready, audio, msgs


@pytest.mark.parametrize(
    "fmt, container, rate",
    [
        ("pcm_s16le", "raw", None),
        ("pcm_s16le", "wav", 16000),
        ("pcm_f32le", "raw", 48000),
        ("pcm_f32le", "wav", None),
        ("mulaw", "raw", 8000),
        ("alaw", "wav", 8000),
        ("mulaw", "wav", 16000),
        ("opus", "ogg", 48000),
        ("opus", "ogg", 24000),
        ("opus", "ogg", 16000),
    ],
)  # raw Opus packets: test_raw_opus_packets_decode_one_by_one
async def test_full_utterance_in_each_format(server, fmt, container, rate):
    start = {"format": fmt, "container": container, **({"sample_rate": rate} if rate else {})}
    ready, audio, msgs = await speak(server, start)
    out_rate = ready["sample_rate"]
    assert out_rate == (rate or (24000 if fmt.startswith("pcm") else 8000))
    done = msgs[-1]
    assert done["type"] == "done" and abs(done["stats"]["audio_ms"] - 1000) < 1
    assert done["stats"]["ttfa_ms"] is not None
    if container == "wav":
        x, sr = (
            sf.read(io.BytesIO(audio), dtype="float32") if fmt.startswith("pcm") else decode_av(audio, "wav")
        )
    elif fmt == "pcm_s16le":
        x, sr = np.frombuffer(audio, "<i2").astype(np.float32) / 32768, out_rate
    elif fmt == "pcm_f32le":
        x, sr = np.frombuffer(audio, "<f4"), out_rate
    elif fmt in ("mulaw", "alaw"):
        x, sr = decode_av(audio, fmt, out_rate)
    else:
        x, sr = decode_av(audio, "ogg")
    assert sr in (out_rate, 48000)
    seconds = len(x) / sr
    assert abs(seconds - 1.0) < 0.03, seconds
    rms = float(np.sqrt(np.mean(x**2)))
    assert 0.15 < rms < 0.25, rms  # 0.3-amplitude sine → rms ≈ 0.21
    assert abs(dominant_hz(x, sr) - 440) < 15


async def test_raw_opus_packets_decode_one_by_one(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "opus"}))
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": WORDS5}))
        await ws.send(json.dumps({"type": "end"}))
        packets = []
        async for msg in ws:
            if isinstance(msg, bytes):
                packets.append(msg)
            elif json.loads(msg)["type"] == "done":
                break
    codec = av.CodecContext.create("opus", "r")
    codec.sample_rate = 48000
    decoded = []
    for p in packets:
        for frame in codec.decode(av.Packet(p)):
            assert frame.samples == 960  # 20 ms per packet
            decoded.append(frame.to_ndarray().reshape(-1))
    x = np.concatenate(decoded)
    assert len(packets) == int(np.ceil((48000 + 312) / 960))
    assert abs(dominant_hz(x, 48000) - 440) < 15


async def test_marks_are_monotone_and_cover_the_text(server):
    _, _, msgs = await speak(server, {})
    marks = [m for m in msgs if m["type"] == "mark"]
    assert [m["text_offset"] for m in marks] == [4, 8, 14, 19, 24]
    assert [m["audio_ms"] for m in marks] == [200, 400, 600, 800, 1000]


async def test_flush_synthesises_pending_text_and_acknowledges(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "text", "text": "one two thr"}))
        await ws.send(json.dumps({"type": "flush"}))
        audio, msgs = await collect(ws, until="flushed")
        assert [m["type"] for m in msgs][0] == "ready" and msgs[-1]["type"] == "flushed"
        assert len(audio) == 3 * 4800 * 2  # "one", "two" and the forced "thr"
        await ws.send(json.dumps({"type": "text", "text": "ee four "}))
        await ws.send(json.dumps({"type": "end"}))
        audio2, msgs2 = await collect(ws)
        assert len(audio2) == 2 * 4800 * 2 and msgs2[-1]["type"] == "done"


async def test_cancel_mid_stream_stops_engine_and_audio(tone):
    tone.step_delay = 0.05
    with serve(tone) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "word " * 200, "context_id": "c"}))
            while not isinstance(await ws.recv(), bytes):
                pass
            await ws.send(json.dumps({"type": "cancel", "context_id": "c"}))
            after_cancel = []
            async with asyncio.timeout(5):
                while True:
                    msg = await ws.recv()
                    if isinstance(msg, str) and json.loads(msg)["type"] == "cancelled":
                        break
            # nothing of that context after the ack
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    after_cancel.append(await ws.recv())
            assert after_cancel == []
            deadline = time.monotonic() + 2
            while tone.active and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert tone.active == 0  # the engine's thread stopped, not only the sending
            produced = tone.produced_samples
            assert produced < 200 * 4800 / 4
            # the socket is still usable for the next utterance
            await ws.send(json.dumps({"type": "text", "text": WORDS5}))
            await ws.send(json.dumps({"type": "end"}))
            audio, msgs = await collect(ws)
            assert len(audio) == 5 * 4800 * 2 and msgs[-1]["type"] == "done"


async def test_two_contexts_in_sequence_on_one_socket(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_f32le"}))
        await ws.recv()
        # the second context's text arrives before the first is spoken
        await ws.send(json.dumps({"type": "text", "text": "one two ", "context_id": "a"}))
        await ws.send(json.dumps({"type": "end", "context_id": "a"}))
        await ws.send(json.dumps({"type": "text", "text": "three ", "context_id": "b", "voice": "b"}))
        await ws.send(json.dumps({"type": "end", "context_id": "b"}))
        chunks: list[tuple[str | None, bytes]] = []
        current = "a"
        done = []
        async with asyncio.timeout(10):
            async for msg in ws:
                if isinstance(msg, bytes):
                    chunks.append((current, msg))
                    continue
                m = json.loads(msg)
                if m["type"] == "done":
                    done.append(m["context_id"])
                    current = "b"
                    if len(done) == 2:
                        break
        assert done == ["a", "b"]
        a = np.frombuffer(b"".join(c for k, c in chunks if k == "a"), "<f4")
        b = np.frombuffer(b"".join(c for k, c in chunks if k == "b"), "<f4")
        assert len(a) == 2 * 4800 and len(b) == 4800
        assert abs(dominant_hz(a, 24000) - 440) < 20 and abs(dominant_hz(b, 24000) - 660) < 20


async def test_json_transport_runs_contexts_side_by_side(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "audio_transport": "json"}))
        await ws.recv()
        for cid in ("x", "y"):
            await ws.send(json.dumps({"type": "text", "text": "one two ", "context_id": cid}))
            await ws.send(json.dumps({"type": "end", "context_id": cid}))
        audio = {"x": bytearray(), "y": bytearray()}
        seqs = {"x": [], "y": []}
        done = set()
        async with asyncio.timeout(10):
            async for msg in ws:
                assert isinstance(msg, str)
                m = json.loads(msg)
                if m["type"] == "audio":
                    audio[m["context_id"]] += base64.b64decode(m["data"])
                    seqs[m["context_id"]].append(m["seq"])
                elif m["type"] == "done":
                    done.add(m["context_id"])
                    if done == {"x", "y"}:
                        break
        assert len(audio["x"]) == len(audio["y"]) == 2 * 4800 * 2
        assert seqs["x"] == list(range(1, len(seqs["x"]) + 1))


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "bad_request"),
        ('{"type": "dance"}', "bad_request"),
        ('{"type": "text", "text": "x", "volume": 11}', "bad_request"),
        ('{"type": "text", "text": ["x"]}', "bad_request"),
        ('{"type": "start", "voice": "nobody"}', "unknown_voice"),
        (b"\x00\x01binary", "bad_request"),
    ],
)
async def test_malformed_input_gets_typed_error_and_session_survives(server, frame, code):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(frame)
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["code"] == code and err["fatal"] is False
        await ws.send(json.dumps({"type": "text", "text": "one "}))
        await ws.send(json.dumps({"type": "end"}))
        audio, msgs = await collect(ws)
        assert msgs[-1]["type"] == "done" and len(audio) == 4800 * 2


async def test_text_after_end_of_same_context(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "text", "text": "one ", "context_id": "c"}))
        await ws.send(json.dumps({"type": "end", "context_id": "c"}))
        await ws.send(json.dumps({"type": "text", "text": "two ", "context_id": "c"}))
        _, msgs = await collect(ws)
        errors = [m for m in msgs if m["type"] == "error"]
        assert len(errors) == 1 and errors[0]["code"] == "bad_request" and errors[0]["context_id"] == "c"


async def test_oversize_frame_is_too_large_and_closes_1009(tone):
    with serve(tone, ServerConfig(limits=Limits(max_frame_bytes=4096))) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "x" * 5000}))
            err = json.loads(await ws.recv())
            assert err["code"] == "too_large" and err["fatal"] is True
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009
        # others are still served
        _, audio, _ = await speak(base, {})
        assert len(audio) == 5 * 4800 * 2


async def test_disconnect_mid_stream_frees_everything(tone):
    tone.step_delay = 0.02
    with serve(tone) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "word " * 300}))
            while not isinstance(await ws.recv(), bytes):
                pass
        # client gone without a goodbye: its engine must stop, and the session be forgotten
        deadline = time.monotonic() + 3
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                health = (await http.get(base + "/health")).json()
                if tone.active == 0 and health["sessions"] == 0:
                    break
                await asyncio.sleep(0.05)
        assert tone.active == 0 and health["sessions"] == 0
        assert tone.produced_samples < 300 * 4800 / 2


def _raw_ws_handshake(port: int) -> socket.socket:
    """A client that completes the upgrade and then never reads again (tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(b"0123456789abcdef").decode()
    s.sendall(
        (
            f"GET /v1/tts/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(1)
    assert b" 101 " in buf.split(b"\r\n")[0]
    return s


def _client_frame(text: str) -> bytes:
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    header = bytes([0x81]) + (
        bytes([0x80 | n])
        if n < 126
        else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        if n < 65536
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    )
    return header + mask + masked


def test_client_that_never_reads_is_closed_and_production_stops(tone):
    with serve(tone, ServerConfig(send_timeout=1.0)) as base:
        port = int(base.rsplit(":", 1)[1])
        s = _raw_ws_handshake(port)
        # f32 at 48 kHz: 192 kB per second of audio, far more than the socket buffers will take
        s.sendall(_client_frame(json.dumps({"type": "start", "format": "pcm_f32le", "sample_rate": 48000})))
        s.sendall(_client_frame(json.dumps({"type": "text", "text": "word " * 3000})))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(base + "/health").json()
            if health["sessions"] == 0 and tone.active == 0:
                break
            time.sleep(0.1)
        assert health["sessions"] == 0 and tone.active == 0
        produced = tone.produced_samples / 24000
        # bounded: socket buffers + our ~1 s buffer, nowhere near the 600 s of audio asked for
        assert produced < 120, produced
        s.close()


async def test_realtime_pacing_sends_at_playback_rate(server):
    t0 = time.perf_counter()
    _, audio, msgs = await speak(
        server, {"pacing": "realtime"}, "one two three four five six seven eight nine ten "
    )
    elapsed = time.perf_counter() - t0
    assert len(audio) == 10 * 4800 * 2
    assert elapsed > 1.4  # 2 s of audio with a 0.3 s lead
    t0 = time.perf_counter()
    await speak(server, {"pacing": "asap"}, "one two three four five six seven eight nine ten ")
    assert time.perf_counter() - t0 < elapsed


async def test_auth_header_query_and_refusal(tone):
    with serve(tone, ServerConfig(token="s3cret")) as base:
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(ws_url(base)):
                pass
        assert e.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus) as e:
            async with connect(ws_url(base, "wrong")):
                pass
        assert e.value.response.status_code == 403
        for kwargs, url in (
            ({}, ws_url(base, "s3cret")),
            ({"additional_headers": {"Authorization": "Bearer s3cret"}}, ws_url(base)),
            ({"additional_headers": {"X-API-TOKEN": "s3cret"}}, ws_url(base)),
        ):
            async with connect(url, **kwargs) as ws:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
        async with httpx.AsyncClient() as http:
            r = await http.get(base + "/v1/voices")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = await http.get(base + "/v1/voices", headers={"X-API-TOKEN": "s3cret"})
            assert r.status_code == 200
            r = await http.post(base + "/inference_sft", data={"tts_text": "one ", "spk_id": "a"})
            assert r.status_code == 401


async def test_too_many_sessions_is_overloaded_1013(tone):
    with serve(tone, ServerConfig(max_sessions=1)) as base:
        async with connect(ws_url(base)) as first:
            await first.send(json.dumps({"type": "start"}))
            await first.recv()
            async with connect(ws_url(base)) as second:
                err = json.loads(await second.recv())
                assert err["code"] == "overloaded" and err["fatal"]
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd.code == 1013


async def test_http_routes(server):
    async with httpx.AsyncClient(timeout=20) as http:
        assert (await http.get(server + "/health")).json()["status"] == "ok"
        voices = (await http.get(server + "/v1/voices")).json()
        assert voices["default_voice"] == "a" and {v["id"] for v in voices["voices"]} == {"a", "b"}
        r = await http.post(server + "/v1/tts", json={"text": WORDS5, "format": "pcm_s16le"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("audio/")
        x, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert sr == 24000 and len(x) == 24000
        r = await http.post(server + "/v1/tts", json={"text": WORDS5, "format": "opus"})
        x, sr = decode_av(r.content, "ogg")
        assert abs(len(x) / sr - 1.0) < 0.03
        for bad, code in (
            ({"text": ""}, 400),
            ({"text": "x", "voice": "nobody"}, 404),
            ({"text": "x", "loud": True}, 400),
            ({"text": "x", "sample_rate": 44100}, 400),
        ):
            r = await http.post(server + "/v1/tts", json=bad)
            assert r.status_code == code and "error" in r.json()
        # the official CosyVoice FastAPI routes: form fields, raw int16 at the model rate
        r = await http.post(server + "/inference_sft", data={"tts_text": WORDS5, "spk_id": "b"})
        pcm = np.frombuffer(r.content, "<i2")
        assert r.status_code == 200 and len(pcm) == 24000
        assert abs(dominant_hz(pcm.astype(np.float32), 24000) - 660) < 15
        r = await http.get(server + "/inference_sft", params={"tts_text": "one ", "spk_id": "a"})
        assert len(np.frombuffer(r.content, "<i2")) == 4800
        r = await http.post(server + "/inference_zero_shot", data={"tts_text": "x", "prompt_text": "y"})
        assert r.status_code == 400
        r = await http.get(server + "/inference_sft", params={"tts_text": "x", "spk_id": "nobody"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_voice"
        metrics = (await http.get(server + "/metrics")).text
        assert "realtime_sessions_total" in metrics and "realtime_http_synthesis_total" in metrics


class _BrokenEngine(ToneEngine):
    """Yields "audio" that is not numbers: a bug inside one context."""

    def synthesize(self, text, options):
        for item in super().synthesize(text, options):
            yield type(item)("not audio") if hasattr(item, "samples") else item


async def test_a_failing_context_reports_internal_and_the_session_lives_on():
    with serve(_BrokenEngine()) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "one two ", "context_id": "bad"}))
            await ws.send(json.dumps({"type": "end", "context_id": "bad"}))
            _, msgs = await collect(ws, until="error")
            assert (
                msgs[-1]["code"] == "internal" and msgs[-1]["context_id"] == "bad" and not msgs[-1]["fatal"]
            )
            await ws.send(json.dumps({"type": "text", "text": "x", "context_id": "bad"}))
            assert json.loads(await ws.recv())["code"] == "bad_request"  # finished: a clear error, no crash
            await ws.send(json.dumps({"type": "start"}))  # the socket still answers
            assert json.loads(await ws.recv())["type"] == "error"


async def test_oversize_http_body_is_413_without_reading_it_all(tone):
    with serve(tone, ServerConfig(limits=Limits(max_frame_bytes=1000))) as base:
        async with httpx.AsyncClient() as http:
            r = await http.post(
                base + "/v1/tts",
                content=b"{" + b" " * 5000 + b"}",
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

            async def chunks():  # no Content-Length: the limit applies while streaming
                for _ in range(10):
                    yield b" " * 500

            r = await http.post(base + "/v1/tts", content=chunks())
            assert r.status_code == 413
