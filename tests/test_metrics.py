"""/metrics through prometheus_client: the exposition parses, each app has its own registry, the
scrape-time figures (places, capacity, draining, load) and the counters the service keeps move as
the service works, and an engine's batch-size distributions come out as histograms."""

from __future__ import annotations

import asyncio
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from realtime.engines.base import Distribution
from realtime.engines.tone import ToneEngine
from realtime.metrics import Metrics
from realtime.server import ServerConfig
from tests.serving import serve, ws_url


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):  # raises on a malformed exposition
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


async def test_metrics_follow_the_service_and_each_app_has_its_own():
    with (
        serve(ToneEngine(capacity=3, step_delay=0.02), ServerConfig()) as a,
        serve(ToneEngine(), ServerConfig()) as b,
    ):
        before = scrape(a)
        assert before["realtime_capacity"] == 3 and before["realtime_contexts_active"] == 0
        assert before["realtime_draining"] == 0 and before["realtime_load"] == 0
        async with connect(ws_url(a)) as ws:
            await ws.send(json.dumps({"type": "text", "text": "one two three four five six seven eight "}))
            await ws.recv()  # ready
            await asyncio.wait_for(ws.recv(), 10)  # audio: the context holds a place
            during = await asyncio.to_thread(scrape, a)
            assert during["realtime_contexts_active"] == 1 and abs(during["realtime_load"] - 1 / 3) < 1e-9
            await ws.send(json.dumps({"type": "end"}))
            while True:
                msg = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(msg, str) and json.loads(msg)["type"] == "done":
                    break
            await ws.send(json.dumps({"type": "bogus"}))
            await ws.recv()
        after = await asyncio.to_thread(scrape, a)
        assert after["realtime_sessions_total"] == before["realtime_sessions_total"] + 1
        assert after["realtime_contexts_total{outcome=done}"] == 1
        assert after["realtime_errors_total{code=bad_request}"] == 1
        assert after["realtime_audio_frames_sent_total"] == 8 * 10  # eight words of 200 ms in 20 ms frames
        assert after["realtime_audio_bytes_sent_total"] == 8 * 4800 * 2
        assert after["realtime_time_to_first_audio_seconds_count"] == 1
        assert after["realtime_queue_wait_seconds_count"] == 1
        assert after["realtime_delivery_ratio_count"] == 1
        assert "realtime_underruns_total" in after
        other = scrape(b)
        assert other["realtime_sessions_total"] == 0 and "realtime_contexts_total{outcome=done}" not in other


def test_engine_figures_are_counters_gauges_and_histograms():
    metrics = Metrics()
    metrics.add_engine(
        lambda: {"cosyvoice_lm_calls_total": 7, "cosyvoice_kv_slots_free": 3},
        lambda: {
            "cosyvoice_lm_batch_size": Distribution("Requests per step", {1: 5, 3: 2, 40: 1}),
            "cosyvoice_lm_step_seconds": Distribution("Step time", {0.01: 2, 0.5: 1}, (0.01, 0.1, 1.0), 0.52),
        },
    )
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["cosyvoice_lm_calls"].type == "counter"
    assert families["cosyvoice_kv_slots_free"].type == "gauge"
    hist = families["cosyvoice_lm_batch_size"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["1"] == 5 and buckets["2"] == 5 and buckets["4"] == 7 and buckets["32"] == 7
    assert buckets["64"] == 8 and buckets["+Inf"] == 8
    assert {s.name: s.value for s in hist.samples}["cosyvoice_lm_batch_size_sum"] == 5 + 6 + 40
    steps = {s.labels.get("le", s.name): s.value for s in families["cosyvoice_lm_step_seconds"].samples}
    assert steps["0.01"] == 2 and steps["0.1"] == 2 and steps["1"] == 3 and steps["+Inf"] == 3
    assert steps["cosyvoice_lm_step_seconds_sum"] == 0.52
