"""The cosyvoice2 engine on a TINY random-weight model directory, through the real server on
loopback: every mode over the WebSocket, text slower and faster than the model, flush, cancel,
registered voices, the official HTTP routes and POST /v1/tts.  Audio is noise: the checks are
lengths (960 samples per speech token), protocol behaviour, determinism and freed state."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.asyncio.client import connect

from cosyvoice.model import SAMPLES_PER_TOKEN
from cosyvoice.tiny import SFT_SPEAKERS, prompt_wav, write_model_dir
from realtime.admission import Admission
from realtime.engines import cosyvoice2 as cosyvoice2_engine
from realtime.engines import create_engine
from realtime.engines.base import (
    END,
    AudioChunk,
    EngineError,
    Failed,
    Finished,
    Flushed,
    QueueSink,
    SynthesisOptions,
)
from realtime.server import ServerConfig
from realtime.service import capacity
from realtime.synthesis import Synthesis
from tests import serving
from tests.serving import serve, ws_url
from tests.test_cosyvoice_api import assert_same_speech

torch.set_num_threads(1)
ZH, EN = SFT_SPEAKERS
BYTES_PER_TOKEN = SAMPLES_PER_TOKEN * 2  # pcm_s16le at the native 24 kHz
TEXT = "Hello world, this is a streaming test of the tiny model."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("engine") / "tiny")
    return create_engine("cosyvoice2", str(root), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine, ServerConfig(send_timeout=5.0)) as base:
        yield base


async def collect(ws, until: str = "done", timeout: float = 60.0):
    return await serving.collect(ws, until, timeout, stop_on_error=True)


async def speak(base: str, start: dict, deltas: list[str], gap: float = 0.0):
    async with connect(ws_url(base), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", **start}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        for d in deltas:
            await ws.send(json.dumps({"type": "text", "text": d}))
            if gap:
                await asyncio.sleep(gap)
        await ws.send(json.dumps({"type": "end"}))
        audio, msgs = await collect(ws)
    return audio, msgs


def words(text: str) -> list[str]:
    return [w + " " for w in text.split(" ")]


def assert_speech(audio: bytes, msgs: list[dict]) -> None:
    assert msgs[-1]["type"] == "done", msgs[-1]
    assert len(audio) > 0 and len(audio) % BYTES_PER_TOKEN == 0


# ------------------------------------------------------------------------------------------------


def test_engine_contract(engine):
    assert engine.name == "cosyvoice2" and engine.sample_rate == 24000
    assert engine.modes == ("sft", "zero_shot", "cross_lingual", "instruct2")
    assert [(v.id, v.kind) for v in engine.voices()][:2] == [(ZH, "sft"), (EN, "sft")]
    assert engine.default_voice == ZH
    with pytest.raises(EngineError) as e:
        engine.validate(SynthesisOptions(voice="nobody"))
    assert e.value.code == "unknown_voice"


async def test_sft_over_the_websocket_is_deterministic_however_the_text_arrives(server):
    """Text slower than the LM (the LM waits for it) and all at once give the same bistream input,
    so the same seed gives the same audio."""
    slow, msgs = await speak(server, {"voice": EN, "seed": 7}, words(TEXT), gap=0.15)
    assert_speech(slow, msgs)
    fast, msgs = await speak(server, {"voice": EN, "seed": 7}, [TEXT])
    assert_speech(fast, msgs)
    assert fast == slow
    marks = [m for m in msgs if m["type"] == "mark"]
    assert marks and marks[-1]["text_offset"] == len(TEXT)


async def test_two_concurrent_sessions_get_exactly_their_solo_audio(server):
    a = ({"voice": EN, "seed": 21, "token_hop_len": 50}, words("First session speaking here, hello there."))
    b = ({"voice": ZH, "seed": 22}, words("Second session with other words to say now."))
    together = await asyncio.gather(speak(server, *a, gap=0.02), speak(server, *b, gap=0.02))
    alone = [await speak(server, *a), await speak(server, *b)]
    for (audio_t, msgs_t), (audio_a, _) in zip(together, alone, strict=True):
        assert_speech(audio_t, msgs_t)
        assert_same_speech(np.frombuffer(audio_t, "<i2") / 32768, np.frombuffer(audio_a, "<i2") / 32768)


async def test_a_hop_that_is_not_a_whole_flow_chunk_is_refused(server):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "text", "text": "Hello.", "voice": EN, "token_hop_len": 10}))
        await ws.send(json.dumps({"type": "end"}))
        _, msgs = await collect(ws, until="error")
        assert msgs[-1]["code"] == "bad_request" and "multiple of 25" in msgs[-1]["message"]


async def test_zero_shot_cross_lingual_instruct2_over_the_websocket(server):
    b64 = base64.b64encode(prompt_wav()).decode()
    for start in (
        {"mode": "zero_shot", "prompt_audio": b64, "prompt_text": "A prompt sentence."},
        {"mode": "cross_lingual", "prompt_audio": b64},
        {"mode": "instruct2", "prompt_audio": b64, "instruct_text": "Speak slowly."},
    ):
        audio, msgs = await speak(server, {**start, "seed": 1}, ["Hello there, ", "how are you?"])
        assert_speech(audio, msgs)
    bad = base64.b64encode(b"RIFF not really a wav").decode()
    audio, msgs = await speak(server, {"mode": "cross_lingual", "prompt_audio": bad}, ["Hello."])
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "bad_request" and audio == b""


async def test_flush_finishes_a_segment_and_the_context_goes_on(server, engine):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "voice": EN, "seed": 3}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "Hello world, first part."}))
        await ws.send(json.dumps({"type": "flush"}))
        first, msgs = await collect(ws, until="flushed")
        assert msgs[-1]["type"] == "flushed"
        assert len(first) > 0 and len(first) % BYTES_PER_TOKEN == 0  # the segment's final flush ran
        await ws.send(json.dumps({"type": "flush"}))  # nothing pending: acknowledged without audio
        empty, msgs = await collect(ws, until="flushed")
        assert empty == b"" and msgs[-1]["type"] == "flushed"
        await ws.send(json.dumps({"type": "text", "text": "And the second part."}))
        await ws.send(json.dumps({"type": "end"}))
        second, msgs = await collect(ws)
        assert_speech(second, msgs)
    assert engine.cv.model.token2wav.active_streams() == []


async def test_cancel_mid_stream_stops_and_frees(server, engine):
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "voice": EN}))
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": TEXT * 4}))  # long: audio keeps coming
        async with asyncio.timeout(60):
            while not isinstance(await ws.recv(), bytes):
                pass
        await ws.send(json.dumps({"type": "cancel"}))
        _, msgs = await collect(ws, until="cancelled")
        assert msgs[-1]["type"] == "cancelled"
    deadline = time.monotonic() + 10
    while engine.cv.model.token2wav.active_streams() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.cv.model.token2wav.active_streams() == []


async def test_contexts_hold_no_thread_and_a_full_buffer_stops_the_lm(engine, monkeypatch):
    """A context is a state machine on the model's stages: many contexts waiting for text, or
    speaking, add no thread.  Audio slower to drain than to make: once the pipeline is full (the
    buffer, the token2wav stage's unread chunks, the LM's tokens ahead) the LM stops stepping for
    that context, and reading resumes it."""
    steps = []
    llm = engine.cv.model.llm
    real_step = llm.step
    monkeypatch.setattr(llm, "step", lambda *a: (steps.append(1), real_step(*a))[1])
    await asyncio.to_thread(lambda: list(engine.cv.inference_sft("Warm up.", EN, stream=True, seed=0)))
    threads = threading.active_count()
    admission = Admission(16)
    waiting = [Synthesis(engine, SynthesisOptions(voice=EN, seed=k), admission, f"w{k}") for k in range(6)]
    synthesis = Synthesis(engine, SynthesisOptions(voice=EN, seed=2), admission, "test", buffer_seconds=0.5)
    try:
        for w in waiting:
            w.push("Hello there, ")  # admitted and opened, then waiting for more text
        for w in words(TEXT * 8):
            synthesis.push(w)
        synthesis.end()
        first = await asyncio.wait_for(synthesis.get(), 60)
        assert isinstance(first, AudioChunk)
        model = engine.cv.model
        assert model.lm_stage.free_slots == model.lm_stage.pool.slots - 7  # seven requests in the LM stage
        assert threading.active_count() == threads  # and not one thread more
        # nobody reads: the engine fills the 0.5 s buffer, then the LM stops stepping
        deadline = time.monotonic() + 60
        while True:
            n = len(steps)
            await asyncio.sleep(0.5)
            if len(steps) == n and synthesis.buffer.buffered_samples >= 12000:
                break
            assert time.monotonic() < deadline, "the LM never stopped for the full buffer"
        await asyncio.sleep(0.5)
        assert len(steps) == n
        n_audio = len(first.samples)
        while True:
            item = await asyncio.wait_for(synthesis.get(), 60)
            if isinstance(item, AudioChunk):
                n_audio += len(item.samples)
            elif not isinstance(item, Flushed):
                break
        assert isinstance(item, Finished)
        assert n_audio % SAMPLES_PER_TOKEN == 0 and len(steps) > n  # reading resumed the LM
    finally:
        synthesis.close()
        for w in waiting:
            w.close()
    model = engine.cv.model
    deadline = time.monotonic() + 10
    while (model.token2wav.active_streams() or model.lm_stage.free_slots != model.lm_stage.pool.slots) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.05)
    assert model.token2wav.active_streams() == [] and model.lm_stage.free_slots == model.lm_stage.pool.slots


async def test_register_a_voice_then_speak_with_it(server, engine):
    wav = prompt_wav()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            server + "/v1/voices",
            data={"voice_id": "alice", "prompt_text": "A prompt sentence."},
            files={"prompt_wav": ("p.wav", wav, "audio/wav")},
        )
        assert r.status_code == 201, r.text
        assert r.json()["voice"]["id"] == "alice" and r.json()["voice"]["kind"] == "zero_shot"
        r = await http.post(
            server + "/v1/voices",
            data={"voice_id": "alice", "prompt_text": "again"},
            files={"prompt_wav": ("p.wav", wav, "audio/wav")},
        )
        assert r.status_code == 409
        r = await http.post(
            server + "/v1/voices",
            data={"voice_id": "bob", "prompt_text": "x"},
            files={"prompt_wav": ("p.wav", b"garbage", "audio/wav")},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post(server + "/v1/voices", data={"voice_id": "bob"})
        assert r.status_code == 400
        r = await http.post(
            server + "/v1/voices",
            data={"voice_id": "../evil", "prompt_text": "x"},
            files={"prompt_wav": ("p.wav", wav, "audio/wav")},
        )
        assert r.status_code == 400
        voices = (await http.get(server + "/v1/voices")).json()["voices"]
        assert {(v["id"], v["kind"]) for v in voices} >= {(ZH, "sft"), (EN, "sft"), ("alice", "zero_shot")}
    stored = torch.load(engine.cv.model_dir.root / "spk2info.pt", weights_only=True)
    assert "alice" in stored and "bob" not in stored
    for mode in ("zero_shot", "sft", "cross_lingual"):
        audio, msgs = await speak(server, {"voice": "alice", "mode": mode, "seed": 1}, ["Hello there."])
        assert_speech(audio, msgs)


async def test_official_routes_and_v1_tts(server):
    """These requests carry no seed; a text of 5+ tokens guarantees 15 bistream tokens (the end
    phase alone may sample eos at once)."""
    wav = prompt_wav()
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.get(
            server + "/inference_sft", params={"tts_text": "Hello world, this is a test.", "spk_id": EN}
        )
        assert r.status_code == 200 and len(r.content) > 0 and len(r.content) % BYTES_PER_TOKEN == 0
        r = await http.post(
            server + "/inference_sft", data={"tts_text": "Hello world, this is a test.", "spk_id": ZH}
        )
        assert r.status_code == 200 and len(r.content) % BYTES_PER_TOKEN == 0 and len(r.content) > 0
        form = {
            "tts_text": "Hello world, this is a test.",
            "prompt_text": "A prompt sentence.",
            "instruct_text": "Speak slowly.",
        }
        for route in ("inference_zero_shot", "inference_cross_lingual", "inference_instruct2"):
            r = await http.post(
                f"{server}/{route}", data=form, files={"prompt_wav": ("p.wav", wav, "audio/wav")}
            )
            assert r.status_code == 200, (route, r.text)
            assert len(r.content) > 0 and len(r.content) % BYTES_PER_TOKEN == 0, route
        # CosyVoice 1's instruct route (speaker + instruction): instruct2 with that speaker's voice
        r = await http.post(
            server + "/inference_instruct",
            data={"tts_text": "Hello world, this is a test.", "spk_id": EN, "instruct_text": "Speak slowly."},
        )
        assert r.status_code == 200 and len(r.content) > 0 and len(r.content) % BYTES_PER_TOKEN == 0
        r = await http.post(
            server + "/v1/tts",
            json={"text": "Hello world, this is a test.", "voice": EN, "format": "pcm_s16le"},
        )
        assert r.status_code == 200
        x, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert sr == 24000 and len(x) > 0 and len(x) % SAMPLES_PER_TOKEN == 0
        r = await http.post(
            server + "/v1/tts",
            json={"text": "Hello world, this is a test.", "voice": EN, "speed": 2.0, "seed": 1},
        )
        fast, _ = sf.read(io.BytesIO(r.content), dtype="float32")
        assert len(fast) > 0 and len(fast) % 480 == 0  # speed stretches the mel: 480 samples per frame


def test_voices_route_refuses_registration_for_engines_without_it():
    from realtime.engines.tone import ToneEngine

    with serve(ToneEngine(sample_rate=24000)) as base:
        r = httpx.post(
            base + "/v1/voices",
            data={"voice_id": "x", "prompt_text": "y"},
            files={"prompt_wav": ("p.wav", b"x", "audio/wav")},
        )
        assert r.status_code == 404


def assert_overloaded_at_once(engine) -> None:
    """A context opened now gets a typed ``overloaded`` as its only output, without a wait."""
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(voice=EN, seed=1), sink)
    stream.push("Hello there, how are you today?")
    stream.end()
    (item,) = list(sink.items(timeout=10))
    assert isinstance(item, Failed) and item.code == "overloaded"


def test_a_full_kv_pool_fails_the_context_with_overloaded_not_a_hang(engine):
    """Admission counts the KV slots, so this only happens when something else holds them (the
    Python API on the same model): the context gets a typed ``overloaded``, at once."""
    pool = engine.cv.model.lm_stage.pool
    held = []
    with engine.cv.model.lm_stage.cond:
        while (cache := pool.acquire()) is not None:
            held.append(cache)
    try:
        assert_overloaded_at_once(engine)
    finally:
        with engine.cv.model.lm_stage.cond:
            for cache in held:
                pool.release(cache)


def test_the_token2wav_budget_sets_capacity_and_a_full_one_is_overloaded(tmp_path):
    """A stream's flow caches grow with the audio its flow attends to, so the engine admits only as
    many streams as ``t2w_budget_mb`` holds at the window's bound; more (here through the Python
    API, which bypasses admission) get a typed ``overloaded`` at once, and the place comes back."""
    from cosyvoice.flow_estimator import EstimatorSlots
    from cosyvoice.token2wav import stream_bound

    root = write_model_dir(tmp_path / "tiny")
    probe = create_engine("cosyvoice2", str(root), left_chunks=2, t2w_budget_mb=None, kv_max_slots=3)
    flow = probe.cv.model.flow
    assert probe.capacity == probe.cv.model.lm_stage.pool.slots == 3  # no budget: the KV slots
    assert probe.cv.model.token2wav.slots is None  # no budget, no slots allocated ahead
    probe.close()
    # a window this narrow puts the streams' estimator state in slots: each reserves its slot
    # (and the budget pays for the spare one)
    bound = stream_bound(flow, 2, slots=True)
    spare = EstimatorSlots.slot_nbytes(flow.decoder.estimator, flow.cfg.n_timesteps, 2)
    engine = create_engine(
        "cosyvoice2", str(root), left_chunks=2, t2w_budget_mb=(2.5 * bound + spare) / 2**20
    )
    try:
        model = engine.cv.model
        assert engine.capacity == 2 and model.token2wav.max_streams == 2
        assert model.token2wav.slots.slots == 2  # a small window: the flow state in estimator slots
        assert capacity(engine, 10) == 2 and capacity(engine, 1) == 1  # --max-streams cannot raise it
        stats = engine.stats()
        assert stats["cosyvoice_t2w_streams_max"] == 2 and stats["cosyvoice_flow_window_chunks"] == 2
        assert stats["cosyvoice_t2w_stream_bound_bytes"] == bound
        prompt = engine.cv.frontend.frontend_sft("", EN)
        held = [model.open_stream(prompt, seed=k) for k in range(2)]
        assert all(held) and model.open_stream(prompt, seed=3) is None
        assert model.lm_stage.free_slots == model.lm_stage.pool.slots - 2  # no KV slot kept for it
        assert_overloaded_at_once(engine)
        for speech in held:
            speech.cancel()
        deadline = time.monotonic() + 10
        while not model.t2w_stage.has_room():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert model.open_stream(prompt, seed=4) is not None
    finally:
        engine.close()


def test_the_engine_warms_up_before_serving_and_gives_everything_back(tmp_path):
    """The first request of a process pays first-call costs (at REAL size on a CPU its first audio
    came 1.2 s later than with a warm-up), so the engine speaks one throwaway request at start."""
    root = write_model_dir(tmp_path / "tiny")
    cold = create_engine("cosyvoice2", str(root), warmup=False)
    assert cold.stats()["cosyvoice_lm_calls_total"] == 0
    cold.close()
    engine = create_engine("cosyvoice2", str(root))
    try:
        model, stats = engine.cv.model, engine.stats()
        assert stats["cosyvoice_lm_calls_total"] > 0 and stats["cosyvoice_t2w_chunks_total"] > 0
        deadline = time.monotonic() + 10
        while model.lm_stage.free_slots != model.lm_stage.pool.slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.lm_stage.free_slots == model.lm_stage.pool.slots
        assert model.token2wav.active_streams() == [] and model.t2w_stage.has_room()
    finally:
        engine.close()


def test_a_budget_that_holds_no_stream_is_refused_at_start(tmp_path):
    root = write_model_dir(tmp_path / "tiny")
    with pytest.raises(ValueError, match="holds no stream"):
        create_engine("cosyvoice2", str(root), left_chunks=None, t2w_budget_mb=1)


def _speak_unflushed(engine, text: str, monkeypatch) -> tuple[list, list]:
    """``text`` in 9-character deltas with no flush, then the end: every item the context puts,
    the LM request of every segment and where (in characters) and how each segment ended."""
    model, requests = engine.cv.model, []
    open_stream = model.open_stream

    def recording(*args, **kwargs):
        speech = open_stream(*args, **kwargs)
        requests.append(speech.tokens.request)
        return speech

    monkeypatch.setattr(model, "open_stream", recording)
    segments = []
    init = cosyvoice2_engine._Segment.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        segments.append(self)

    monkeypatch.setattr(cosyvoice2_engine._Segment, "__init__", tracked)
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(voice=EN, seed=3), sink)
    for i in range(0, len(text), 9):
        stream.push(text[i : i + 9])
    stream.end()
    items = list(sink.items(timeout=120))
    return items, requests, [(seg.offset, seg.marker) for seg in segments]


@pytest.mark.parametrize(
    "text,ends",
    [
        # sentences: each segment ends after a sentence's end
        (" ".join(f"Sentence number {k} is here." for k in range(8)), "."),
        # one long sentence: past the hard limit a segment ends at a pause or word
        ("and then " * 40 + "the end", " ,"),
    ],
)
def test_a_long_unflushed_context_is_spoken_whole_as_segments_ending_at_sentence_ends(
    engine, monkeypatch, text, ends
):
    """One request's KV slot holds about 70 s of speech: a longer context used to end with its text
    unspoken while ``done`` said it was all spoken.  The engine now ends segments of its own
    accord (no ``flushed`` for the client), and every piece of the text goes into some request."""
    monkeypatch.setattr(engine, "segment_tokens", (8, 40))
    items, requests, segments = _speak_unflushed(engine, text, monkeypatch)
    assert isinstance(items[-1], Finished) and not any(isinstance(i, Flushed | Failed) for i in items)
    marks = [i.text_offset for i in items if isinstance(i, AudioChunk) and i.text_offset is not None]
    assert marks[-1] == len(text) and marks == sorted(marks)
    assert len(requests) == len(segments) > 2 and segments[-1] == (len(text), END)
    for offset, marker in segments[:-1]:  # a break: after a sentence end (or, past the hard limit, a word)
        assert marker is cosyvoice2_engine.BREAK and offset in marks
        assert text[offset - 1] in ends or text[offset] in ends, (offset, text[offset - 3 : offset + 3])
    ids = engine.cv.frontend.text_ids()
    whole = len(ids.push(text) + ids.end())
    taken = sum(r.n_text for r in requests)
    assert abs(taken - whole) <= len(requests)  # all of it (a token may split at a break)
    for request in requests:
        assert request.n_text <= 2 * 40 + 9  # a segment never grows past twice the hard limit
    assert all(r.finished for r in requests)
    samples = sum(len(i.samples) for i in items if isinstance(i, AudioChunk))
    assert samples > 0 and samples % SAMPLES_PER_TOKEN == 0


def test_cancel_before_the_prompt_is_analysed_and_mid_speech_frees_everything(engine):
    model = engine.cv.model
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(mode="cross_lingual", prompt_audio=prompt_wav(), seed=1), sink)
    stream.push("Hello there.")
    stream.cancel()  # the prompt is still being analysed on the helper pool
    speaking = QueueSink()
    other = engine.open(SynthesisOptions(voice=EN, seed=2), speaking)
    other.push(TEXT * 4)
    assert isinstance(speaking.get(timeout=60), AudioChunk)
    other.cancel()
    deadline = time.monotonic() + 10
    while (model.token2wav.active_streams() or model.lm_stage.free_slots != model.lm_stage.pool.slots) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert model.token2wav.active_streams() == [] and model.lm_stage.free_slots == model.lm_stage.pool.slots
    with pytest.raises(TimeoutError):
        sink.get(timeout=0.5)  # nothing at all for the context cancelled early


async def test_metrics_carry_the_stages_batch_sizes_and_step_times(server):
    from prometheus_client.parser import text_string_to_metric_families

    audio, msgs = await speak(server, {"voice": EN, "seed": 4}, ["Hello there, metrics."])
    assert_speech(audio, msgs)
    async with httpx.AsyncClient() as http:
        text = (await http.get(server + "/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "cosyvoice_lm_batch_size",
        "cosyvoice_lm_step_seconds",
        "cosyvoice_t2w_round_size",
        "cosyvoice_t2w_round_seconds",
    ):
        assert families[name].type == "histogram", name
        count = {s.name: s.value for s in families[name].samples}[name + "_count"]
        assert count > 0, name
    assert families["cosyvoice_lm_calls"].type == "counter"


async def test_done_reports_compute_and_wall_time_apart(server):
    """rtf is the model's time for this context (its share of the batched calls) over its audio,
    not the wall time, which includes waiting for streamed text."""
    audio, msgs = await speak(server, {"voice": EN, "seed": 5}, words(TEXT), gap=0.05)
    stats = msgs[-1]["stats"]
    assert stats["compute_ms"] > 0 and stats["wall_ms"] >= stats["ttfa_ms"] > 0
    assert abs(stats["rtf"] - stats["compute_ms"] / stats["audio_ms"]) <= 0.0011  # both rounded
    assert stats["synth_ms"] == stats["wall_ms"]  # the deprecated name


def _openmp_threads() -> int | None:
    """The calling thread's OpenMP thread count (per thread: what torch's CPU ops in it use)."""
    import ctypes
    from pathlib import Path

    libs = {
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line
    }
    return ctypes.CDLL(sorted(libs)[0]).omp_get_max_threads() if libs else None


def test_helper_threads_use_one_core_each_on_a_cpu(engine):
    """A prompt analysed in a helper thread runs torch with one thread: a new thread's OpenMP
    default is every core, which would oversubscribe the cores the stages share."""
    import os

    if _openmp_threads() is None or (os.cpu_count() or 1) < 2:
        pytest.skip("needs torch on OpenMP (libgomp) and two cores")
    assert engine.helpers.submit(_openmp_threads).result() == 1


async def test_the_overlapped_lm_stage_serves_seeded_sessions_exactly_as_alone(tmp_path):
    """``lm_overlap`` (the default on CUDA; forced here on a CPU): speech tokens drawn on the
    LM's device and steps enqueued before the previous tokens reach the host.  Two sessions
    together hear what each hears alone, a seed still gives the same audio, rows fed ahead and
    dropped are counted, and every KV slot comes back."""
    from prometheus_client.parser import text_string_to_metric_families

    root = write_model_dir(tmp_path / "tiny")
    engine = create_engine("cosyvoice2", str(root), lm_overlap=True)
    model = engine.cv.model
    assert model.lm_stage.overlap and model.lm_stage.draw_on_device
    try:
        with serve(engine, ServerConfig(send_timeout=5.0)) as base:
            a = ({"voice": EN, "seed": 31}, words("Overlapped steps, first session speaking here."))
            b = ({"voice": ZH, "seed": 32}, words("Second session with other words to say now."))
            together = await asyncio.gather(speak(base, *a, gap=0.02), speak(base, *b, gap=0.02))
            alone = [await speak(base, *a), await speak(base, *b)]
            for (audio_t, msgs_t), (audio_a, _) in zip(together, alone, strict=True):
                assert_speech(audio_t, msgs_t)
                assert_same_speech(
                    np.frombuffer(audio_t, "<i2") / 32768, np.frombuffer(audio_a, "<i2") / 32768
                )
            again, msgs = await speak(base, *a)
            assert again == alone[0][0]
            async with httpx.AsyncClient() as http:
                text = (await http.get(base + "/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ahead = families["cosyvoice_lm_rows_ahead"].samples[0].value
        assert ahead > 0 and families["cosyvoice_lm_rows_ahead_dropped"].samples[0].value < ahead
        deadline = time.monotonic() + 10
        while model.lm_stage.free_slots != model.lm_stage.pool.slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.lm_stage.free_slots == model.lm_stage.pool.slots
    finally:
        engine.close()
