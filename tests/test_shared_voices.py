"""Voices shared by replicas: two cosyvoice2 engines (as two replicas would be) on one model
directory.  A voice registered through one is spoken by the other without a restart; replicas
registering at the same moment never lose each other's voices (spk2info.pt is merged under a
file lock and replaced by an atomic rename); the same id registered twice at once is one success
and one ``conflict``."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from websockets.asyncio.client import connect

from cosyvoice.tiny import write_model_dir
from realtime.engines import create_engine
from realtime.engines.base import AudioChunk, EngineError, Finished, QueueSink, SynthesisOptions
from tests.serving import serve, ws_url
from tests.test_cosyvoice_engine import collect, prompt_wav


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("shared") / "tiny")
    a, b = (create_engine("cosyvoice2", str(root)) for _ in range(2))
    yield root, a, b
    a.close()
    b.close()


def speak(engine, voice: str) -> int:
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(voice=voice, mode="zero_shot", seed=1), sink)
    stream.push("Hello there, this is a shared voice.")
    stream.end()
    items = list(sink.items(timeout=60))
    assert isinstance(items[-1], Finished), items[-1]
    return sum(len(i.samples) for i in items if isinstance(i, AudioChunk))


def test_a_voice_registered_on_one_replica_is_spoken_by_the_other(replicas):
    root, a, b = replicas
    a.register_voice("alice", prompt_wav(), "A prompt sentence.")
    assert "alice" in {v.id for v in b.voices()}
    assert speak(b, "alice") > 0


def test_replicas_registering_at_once_keep_both_voices_and_one_id_wins_once(replicas):
    root, a, b = replicas
    wav = prompt_wav()
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def register(engine, name: str, voice_id: str) -> None:
        barrier.wait()
        try:
            engine.register_voice(voice_id, wav, "A prompt sentence.")
            outcomes[name] = "ok"
        except EngineError as e:
            outcomes[name] = e.code

    for ids in (("bob", "carol"), ("dave", "dave")):
        threads = [
            threading.Thread(target=register, args=(engine, f"{engine_name}-{voice_id}", voice_id))
            for engine_name, engine, voice_id in (("a", a, ids[0]), ("b", b, ids[1]))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert outcomes["a-bob"] == outcomes["b-carol"] == "ok"
    assert sorted([outcomes["a-dave"], outcomes["b-dave"]]) == ["conflict", "ok"]
    on_disk = torch.load(root / "spk2info.pt", weights_only=True)
    assert {"alice", "bob", "carol", "dave"} <= set(on_disk)
    for engine in (a, b):
        assert {"alice", "bob", "carol", "dave"} <= {v.id for v in engine.voices()}


async def test_registered_over_http_on_one_server_spoken_over_the_websocket_of_another(replicas):
    root, a, b = replicas
    with serve(a) as server_a, serve(b) as server_b:
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                server_a + "/v1/voices",
                data={"voice_id": "erin", "prompt_text": "A prompt."},
                files={"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")},
            )
            assert r.status_code == 201, r.text
        async with connect(ws_url(server_b), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "voice": "erin", "seed": 2}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "text", "text": "Hello from the other replica."}))
            await ws.send(json.dumps({"type": "end"}))
            audio, msgs = await collect(ws)
        assert msgs[-1]["type"] == "done" and len(audio) > 0
