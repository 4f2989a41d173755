"""Graceful drain on SIGTERM, as an orchestrator sends it to ``realtime serve``: readiness fails,
new clients are refused with ``going_away`` (503 + Retry-After), idle sessions are closed at once,
open contexts finish and get ``done`` before their socket is closed with 1001, what is left at the
deadline is closed, and the process exits 0; a second signal exits at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.serving import start_cli_server


async def next_json(ws) -> dict:
    while True:
        msg = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(msg, str):
            return json.loads(msg)


async def closed_with(ws) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return closed.value.rcvd.code


async def test_sigterm_drains_open_contexts_then_exits_zero():
    proc, base = start_cli_server("--drain-timeout", "20")
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    try:
        async with connect(url) as idle, connect(url) as speaking:
            await idle.send(json.dumps({"type": "start"}))
            await speaking.send(json.dumps({"type": "start"}))
            assert (await next_json(idle))["type"] == "ready" and (await next_json(speaking))[
                "type"
            ] == "ready"
            await speaking.send(json.dumps({"type": "text", "context_id": "c1", "text": "one two "}))
            first = await asyncio.wait_for(speaking.recv(), 10)
            assert isinstance(first, bytes)  # it is speaking
            async with httpx.AsyncClient() as http:
                assert (await http.get(base + "/health/ready")).status_code == 200

                proc.send_signal(signal.SIGTERM)
                # the idle session is closed at once, with a typed reason
                error = await next_json(idle)
                assert error["type"] == "error" and error["code"] == "going_away" and error["fatal"]
                assert await closed_with(idle) == 1001
                # readiness fails, liveness holds, new clients are refused with 503 + Retry-After
                ready = await http.get(base + "/health/ready")
                assert ready.status_code == 503 and ready.json()["reason"] == "draining"
                assert (await http.get(base + "/health/live")).status_code == 200
                assert (await http.get(base + "/health")).json()["status"] == "draining"
                r = await http.post(base + "/v1/tts", json={"text": "one two "})
                assert (
                    r.status_code == 503
                    and r.json()["error"]["code"] == "going_away"
                    and "Retry-After" in r.headers
                )
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url):
                        pass
                assert refused.value.response.status_code == 503

            # the speaking session: no new context, but its open one finishes
            await speaking.send(json.dumps({"type": "text", "context_id": "c2", "text": "new "}))
            await speaking.send(json.dumps({"type": "text", "context_id": "c1", "text": "three four "}))
            await speaking.send(json.dumps({"type": "end", "context_id": "c1"}))
            seen, audio = [], len(first)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    msg = await asyncio.wait_for(speaking.recv(), 10)
                    if isinstance(msg, bytes):
                        audio += len(msg)
                    else:
                        seen.append(json.loads(msg))
            assert closed.value.rcvd.code == 1001
            refused_ctx = [m for m in seen if m.get("context_id") == "c2"]
            assert refused_ctx and refused_ctx[0]["code"] == "going_away" and not refused_ctx[0]["fatal"]
            done = [m for m in seen if m["type"] == "done"]
            assert done and done[0]["context_id"] == "c1"
            assert audio == 4 * 4800 * 2  # four words of pcm_s16le, nothing cut
            assert seen[-1]["code"] == "going_away" and seen[-1]["fatal"]
        assert proc.wait(15) == 0
    finally:
        proc.kill()


async def test_the_drain_deadline_closes_what_is_still_open():
    proc, base = start_cli_server("--drain-timeout", "1")
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    try:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "text", "text": "one "}))  # a context left open
            await next_json(ws)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            messages = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    msg = await asyncio.wait_for(ws.recv(), 10)
                    if isinstance(msg, str):
                        messages.append(json.loads(msg))
            assert closed.value.rcvd.code == 1001 and messages[-1]["code"] == "going_away"
            assert 0.8 <= time.monotonic() - t0 < 6
        assert proc.wait(15) == 0
    finally:
        proc.kill()


async def test_a_second_signal_exits_at_once():
    proc, base = start_cli_server("--drain-timeout", "60")
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    try:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "text", "text": "one "}))
            await next_json(ws)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
            assert time.monotonic() - t0 < 5  # not the 60 s drain
    finally:
        proc.kill()


async def test_readiness_fails_at_capacity_and_reports_the_load():
    from realtime.engines.tone import ToneEngine
    from realtime.server import ServerConfig
    from tests.serving import serve, ws_url

    with serve(ToneEngine(capacity=1, step_delay=0.05), ServerConfig()) as base:
        async with httpx.AsyncClient() as http:
            ready = await http.get(base + "/health/ready")
            assert ready.status_code == 200 and ready.json() == {"status": "ready", "load": 0.0}
            async with connect(ws_url(base)) as ws:
                await ws.send(json.dumps({"type": "text", "text": "one two three four five six seven "}))
                await next_json(ws)  # ready: the context has its place
                deadline = time.monotonic() + 10
                while (r := await http.get(base + "/health/ready")).status_code != 503:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert r.json() == {"status": "not ready", "load": 1.0, "reason": "at capacity"}
                assert (await http.get(base + "/health")).json()["load"] == 1.0
