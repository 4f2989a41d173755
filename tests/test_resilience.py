"""No client can take the service down: each fault a hostile or careless client can cause, tried
against the real server on loopback (tone engine: the faults are the service's, not a model's).

One test per fault: dropped downloads, contexts that hog capacity, numbers and strings that cannot
be taken, sockets that stop reading or never finish their headers, the token rule, and the log
lines each of these may cost."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from realtime.engines.tone import ToneEngine
from realtime.server import ServerConfig
from tests.serving import collect, serve, serve_server, ws_url

WORDS5 = "one two three four five "
WAIT = 20.0


async def health(base: str) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(base + "/health")).json()


async def eventually(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} never held"
        await asyncio.sleep(0.05)


async def speak(base: str, text: str = WORDS5, **start) -> tuple[bytes, list[dict]]:
    async with connect(ws_url(base), max_size=None) as ws:
        if start:
            await ws.send(json.dumps({"type": "start", **start}))
        await ws.send(json.dumps({"type": "text", "text": text}))
        await ws.send(json.dumps({"type": "end"}))
        return await collect(ws, stop_on_error=True)


def raw_http(port: int, request: bytes, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def read_response(s: socket.socket, timeout: float = WAIT) -> bytes:
    s.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


# -- 1. dropped HTTP downloads give their place back ------------------------------------------------


async def test_dropped_downloads_give_their_place_back():
    tone = ToneEngine(step_delay=0.05, capacity=2)
    with serve(tone) as base:
        port = port_of(base)
        body = json.dumps({"text": "word " * 400, "format": "pcm_s16le"}).encode()
        request = (
            b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body
        for _ in range(4):  # twice the capacity, each dropped after its first bytes
            s = await asyncio.to_thread(raw_http, port, request)
            s.settimeout(WAIT)
            assert b"200 OK" in await asyncio.to_thread(s.recv, 4096)
            s.close()

        async def freed() -> bool:
            h = await health(base)
            return h["streams"] == 0 and tone.active == 0

        await eventually(freed, what="every dropped download's place given back")
        async with httpx.AsyncClient(timeout=WAIT) as http:
            r = await http.post(base + "/v1/tts", json={"text": WORDS5})
        assert r.status_code == 200 and len(r.content) == 44 + 5 * 4800 * 2


async def test_a_download_that_stops_reading_is_dropped_after_the_send_timeout():
    tone = ToneEngine(capacity=1)
    with serve_server(tone, ServerConfig(send_timeout=0.5, close_timeout=0.3)) as (base, server):
        body = json.dumps({"text": "word " * 3000, "format": "pcm_f32le", "sample_rate": 48000}).encode()
        request = (
            b"POST /v1/tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body
        s = await asyncio.to_thread(raw_http, port_of(base), request, 4096)  # and never reads

        async def dropped() -> bool:
            return (
                (await health(base))["streams"] == 0
                and not server.server_state.connections - {None}
                and tone.active == 0
            )

        await asyncio.sleep(0.2)
        await eventually(dropped, what="the stalled download aborted and its place freed")
        s.close()
        r = await asyncio.to_thread(httpx.post, base + "/v1/tts", json={"text": WORDS5}, timeout=WAIT)
        assert r.status_code == 200  # the one place is free again


# -- 2. contexts waiting for text hold nothing; idle ones end ------------------------------------------


async def test_empty_contexts_hold_no_capacity():
    tone = ToneEngine(capacity=2)
    with serve(tone, ServerConfig(queue_timeout=1.0)) as base:
        async with connect(ws_url(base)) as hog:
            for k in range(4):
                await hog.send(json.dumps({"type": "text", "text": "", "context_id": f"hog{k}"}))
            await asyncio.sleep(0.2)
            for _ in range(3):  # every other session is served at once, one after another
                audio, msgs = await speak(base)
                assert msgs[-1]["type"] == "done" and len(audio) == 5 * 4800 * 2
            assert (await health(base))["streams"] == 0


async def test_one_socket_gets_no_more_than_its_share():
    tone = ToneEngine(capacity=2, step_delay=0.02)  # two places: one per socket at most
    with serve(tone, ServerConfig(queue_timeout=0.5)) as base:
        async with connect(ws_url(base), max_size=None) as greedy:
            await greedy.send(json.dumps({"type": "start", "audio_transport": "json"}))
            await greedy.recv()
            for k in range(3):  # three utterances at once, each with text and no end
                await greedy.send(json.dumps({"type": "text", "text": "word " * 50, "context_id": f"g{k}"}))
            await asyncio.sleep(0.3)
            assert (await health(base))["streams"] == 1  # its own contexts wait for each other ...
            audio, msgs = await speak(base)  # ... and another socket takes the other place at once
            assert msgs[-1]["type"] == "done" and len(audio) == 5 * 4800 * 2


async def test_overloaded_carries_retry_after_on_both_routes():
    tone = ToneEngine(capacity=1, step_delay=0.05)
    with serve(tone, ServerConfig(queue_timeout=0.3)) as base:
        async with connect(ws_url(base), max_size=None) as holder:
            await holder.send(json.dumps({"type": "text", "text": "word " * 100, "context_id": "long"}))
            assert isinstance(await holder.recv(), str)  # ready
            assert isinstance(await holder.recv(), bytes)  # speaking: it holds the one place
            _, msgs = await speak(base)
            err = msgs[-1]
            assert err["type"] == "error" and err["code"] == "overloaded" and not err["fatal"]
            assert isinstance(err["retry_after_ms"], int) and 100 <= err["retry_after_ms"] <= 30_000
            async with httpx.AsyncClient(timeout=WAIT) as http:
                r = await http.post(base + "/v1/tts", json={"text": WORDS5})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.json()["error"]["retry_after_ms"] >= 100 and int(r.headers["retry-after"]) >= 1


async def test_a_context_without_text_for_too_long_is_ended_with_a_typed_error():
    tone = ToneEngine(capacity=1)
    with serve(tone, ServerConfig(context_idle_timeout=0.4)) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "one two ", "context_id": "forgot-end"}))
            audio, msgs = await collect(ws, until="error", timeout=WAIT)
            err = msgs[-1]
            assert err["code"] == "timeout" and err["context_id"] == "forgot-end" and not err["fatal"]
            assert len(audio) == 2 * 4800 * 2  # what it had was spoken first
            assert (await health(base))["streams"] == 0
            await ws.send(json.dumps({"type": "text", "text": WORDS5, "context_id": "next"}))
            await ws.send(json.dumps({"type": "end", "context_id": "next"}))
            audio, msgs = await collect(ws)
            assert msgs[-1]["type"] == "done" and len(audio) == 5 * 4800 * 2


async def test_an_idle_socket_closes_but_pings_keep_a_pooled_one_open():
    with serve(ToneEngine(), ServerConfig(idle_timeout=0.6)) as base:
        async with connect(ws_url(base), ping_interval=None) as silent:
            err = json.loads(await asyncio.wait_for(silent.recv(), WAIT))
            assert err["type"] == "error" and err["code"] == "timeout" and err["fatal"]
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(silent.recv(), WAIT)
            assert closed.value.rcvd.code == 1000
        async with connect(ws_url(base), ping_interval=0.2, max_size=None) as pooled:
            await asyncio.sleep(1.5)  # idle between turns, but alive
            await pooled.send(json.dumps({"type": "text", "text": WORDS5}))
            await pooled.send(json.dumps({"type": "end"}))
            audio, msgs = await collect(pooled)
            assert msgs[-1]["type"] == "done"


# -- 4-6. every frame gets a typed answer --------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "start", "speed": 1' + "0" * 400 + "}",
        '{"type": "text", "text": "x", "seed": ' + "9" * 5000 + "}",
        '{"type": "start", "speed": 1e999}',
        '{"type": "start", "speed": NaN}',
        '{"type": "start", "speed": -Infinity}',
        '{"type": "text", "text": "hi", "context_id": "\\ud800"}',
        '{"type": "text", "text": "\\udfff"}',
        '{"type": "start", "sample_rate": 0}',
        '{"type": "start", "sample_rate": -0}',
        '{"type": "start", "format": "mulaw", "sample_rate": -8000}',
        "[" * 10000 + "]" * 10000,
        '{"type": "text", "text": "x", "voice": {"a": [[[[[[[[[[1]]]]]]]]]]}}',
    ],
)
async def test_frames_the_service_cannot_take_get_a_typed_error_and_the_socket_lives(frame):
    with serve(ToneEngine()) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send(frame)
            err = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert err["type"] == "error" and err["code"] == "bad_request" and err["fatal"] is False, err
            await ws.send(json.dumps({"type": "text", "text": WORDS5}))
            await ws.send(json.dumps({"type": "end"}))
            audio, msgs = await collect(ws)
            assert msgs[-1]["type"] == "done" and len(audio) == 5 * 4800 * 2


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "hi", "speed": 1' + b"0" * 400 + b"}",
        b'{"text": "hi", "seed": ' + b"9" * 5000 + b"}",
        b'{"text": "hi", "speed": NaN}',
        b"[" * 10000 + b"]" * 10000,
        b'{"text": "\\ud800"}',
        b'{"text": "hi", "sample_rate": 0}',
        b'{"text": "hi", "sample_rate": -0}',
        b"\xff\xfe not utf-8",
    ],
)
async def test_http_bodies_the_service_cannot_take_are_json_400(body):
    with serve(ToneEngine()) as base:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            r = await http.post(base + "/v1/tts", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "bad_request"


async def test_every_http_error_is_json_with_its_status():
    with serve(ToneEngine()) as base:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            for method, path, status, code in (
                ("GET", "/no/such/route", 404, "not_found"),
                ("GET", "/nothing.here", 404, "not_found"),
                ("DELETE", "/v1/tts", 405, "method_not_allowed"),
                ("POST", "/health", 405, "method_not_allowed"),
                ("PUT", "/v1/voices", 405, "method_not_allowed"),
            ):
                r = await http.request(method, base + path)
                assert r.status_code == status, (method, path)
                assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == code
        s = await asyncio.to_thread(raw_http, port_of(base), b"GARBAGE\r\n\r\n")
        reply = await asyncio.to_thread(read_response, s)
        assert reply.startswith(b"HTTP/1.1 400") and b'"bad_request"' in reply
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(base.replace("http://", "ws://") + "/v1/tts/nowhere"):
                pass
        assert refused.value.response.status_code == 404
        assert json.loads(refused.value.response.body)["error"]["code"] == "not_found"


async def test_a_body_that_does_not_arrive_in_time_is_408():
    with serve(ToneEngine(), ServerConfig(body_timeout=0.5)) as base:
        s = await asyncio.to_thread(
            raw_http,
            port_of(base),
            b"POST /v1/tts HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"text"',
        )
        reply = await asyncio.to_thread(read_response, s)
        assert reply.startswith(b"HTTP/1.1 408") and b'"timeout"' in reply
        s.close()


async def test_a_whole_utterance_under_an_invalid_id_is_refused_before_it_starts():
    with serve(ToneEngine()) as base:
        async with connect(ws_url(base), max_size=None) as ws:
            await ws.send('{"type": "text", "text": "one two ", "context_id": "\\ud800"}')
            await ws.send('{"type": "end", "context_id": "\\ud800"}')
            for _ in range(2):
                err = json.loads(await ws.recv())
                assert err["code"] == "bad_request" and "context_id" not in err
            await ws.send(json.dumps({"type": "text", "text": WORDS5, "context_id": "ok"}))
            await ws.send(json.dumps({"type": "end", "context_id": "ok"}))
            audio, msgs = await collect(ws)
            assert msgs[-1]["type"] == "done" and msgs[-1]["context_id"] == "ok"


# -- 7. stalls: headers, upgrades, close handshakes, clients that never read ---------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"",  # connects and says nothing
        b"GET /health HTTP/1.1\r\nHost: x\r\n",  # slow headers
        b"GET /v1/tts/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",  # half-open upgrade
    ],
)
async def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closes(partial):
    with serve_server(ToneEngine(), ServerConfig(header_timeout=0.5)) as (base, server):
        s = await asyncio.to_thread(raw_http, port_of(base), partial)
        t0 = time.monotonic()
        reply = await asyncio.to_thread(read_response, s)
        assert time.monotonic() - t0 < 5
        assert reply.startswith(b"HTTP/1.1 408") and b'"timeout"' in reply
        s.close()


def _upgrade(
    port: int, rcvbuf: int | None = None, query: str = "", status: bytes = b" 101 "
) -> socket.socket:
    key = base64.b64encode(b"0123456789abcdef").decode()
    s = raw_http(
        port,
        (
            f"GET /v1/tts/stream{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
        rcvbuf,
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(1)
    assert status in buf.split(b"\r\n")[0], buf
    return s


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + length + mask + masked


async def test_a_client_that_never_reads_loses_its_socket_not_only_its_session():
    tone = ToneEngine()
    with serve_server(tone, ServerConfig(send_timeout=0.5, close_timeout=0.5)) as (base, server):
        s = await asyncio.to_thread(_upgrade, port_of(base), 4096)
        s.sendall(_frame(json.dumps({"type": "start", "format": "pcm_f32le", "sample_rate": 48000}).encode()))
        s.sendall(_frame(json.dumps({"type": "text", "text": "word " * 3000}).encode()))

        async def gone() -> bool:
            return (
                (await health(base))["sessions"] == 0
                and tone.active == 0
                and not server.server_state.connections
            )

        await eventually(gone, what="session freed and TCP connection aborted")

        async def reset() -> bool:  # the kernel let go too: reset, not left retransmitting to us
            return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 1  # 1: established

        await eventually(reset, timeout=5, what="the client's TCP connection reset")
        s.close()


async def test_a_client_that_ignores_the_close_frame_is_cut_off():
    with serve_server(ToneEngine(), ServerConfig(idle_timeout=0.3, close_timeout=0.3)) as (base, server):
        s = await asyncio.to_thread(_upgrade, port_of(base))  # reads, but never answers the close

        async def gone() -> bool:
            return not server.server_state.connections

        await eventually(gone, what="connection closed after the close timeout")
        s.settimeout(WAIT)
        data = await asyncio.to_thread(read_response, s)
        assert b"timeout" in data  # it got the typed reason and the close frame first
        s.close()


# -- 8. one token rule ----------------------------------------------------------------------------------


async def test_token_whitespace_is_one_rule_for_http_and_websocket():
    with serve(ToneEngine(), ServerConfig(token="s3cret")) as base:
        port = port_of(base)
        for value in (b"s3cret ", b" s3cret", b"s3cret"):
            s = await asyncio.to_thread(
                raw_http,
                port,
                b"GET /v1/voices HTTP/1.1\r\nHost: x\r\nX-API-TOKEN: "
                + value
                + b"\r\nConnection: close\r\n\r\n",
            )
            assert (await asyncio.to_thread(read_response, s)).startswith(b"HTTP/1.1 200"), value
            async with connect(ws_url(base), additional_headers={"X-API-TOKEN": value.decode()}) as ws:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"
        s = await asyncio.to_thread(
            raw_http,
            port,
            b"GET /v1/voices HTTP/1.1\r\nHost: x\r\nX-API-TOKEN: s3cre t\r\nConnection: close\r\n\r\n",
        )
        assert (await asyncio.to_thread(read_response, s)).startswith(b"HTTP/1.1 403")
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(ws_url(base), additional_headers={"X-API-TOKEN": "s3cre t"}):
                pass
        assert refused.value.response.status_code == 403


# -- 9. one log line per event a client causes -----------------------------------------------------------


async def test_invalid_utf8_and_refused_sockets_cost_no_traceback_and_no_error_line(caplog):
    caplog.set_level(logging.INFO)
    with serve(ToneEngine(), ServerConfig(token="s3cret")) as base:
        for _ in range(3):
            with pytest.raises(websockets.InvalidStatus):
                async with connect(ws_url(base, "wrong")):
                    pass
        s = await asyncio.to_thread(_upgrade, port_of(base), None, "", b" 401 ")  # no token: refused too
        s.close()
        for _ in range(3):
            s = await asyncio.to_thread(_upgrade, port_of(base), None, "?token=s3cret")
            s.sendall(_frame(b"\xff\xfe\xfd"))  # a text frame that is not UTF-8
            reply = await asyncio.to_thread(read_response, s)
            assert reply[:1] == b"\x88" and int.from_bytes(reply[2:4], "big") == 1007  # close frame, 1007
            s.close()
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
