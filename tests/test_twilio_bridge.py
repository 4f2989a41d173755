"""examples/twilio_bridge.py end to end: a fake Twilio that speaks the documented Media Streams
messages over a real WebSocket, the bridge under uvicorn, and the real service with the default
voice behind it.  The fake plays what it gets at 20 ms a frame and echoes each mark once the audio
before it has played, as Twilio does (and at once on ``clear``, whose audio is dropped unheard).

Nothing here asserts a duration: pacing shows as an ordering (when the caller has heard the first
sentence, the rest of the turn has not arrived yet), barge-in as counts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from examples.twilio_bridge import FRAME_BYTES, TwilioBridge
from realtime.engines.piper import PiperEngine
from realtime.engines.tone import ToneEngine
from realtime.server import ServerConfig
from tests.conftest import REPO
from tests.serving import free_port, serve, serve_asgi

SERVICE_TOKEN = "tts-secret"
CONTROL_TOKEN = "agent-secret"
AUTH = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
BRIDGE_SCRIPT = REPO / "examples" / "twilio_bridge.py"
WAIT = 60.0  # generous: a busy CI box; no assertion is about speed


@pytest.fixture(scope="module")
def service():
    with serve(PiperEngine(), ServerConfig(token=SERVICE_TOKEN)) as base:
        yield base


@pytest.fixture(scope="module")
def bridge(service):
    inbound: list[bytes] = []
    tb = TwilioBridge(
        service, SERVICE_TOKEN, CONTROL_TOKEN, on_media=lambda call, audio: inbound.append(audio)
    )
    with serve_asgi(tb.app) as (base, _server):
        yield base, inbound


class FakeTwilio:
    """Twilio's side of one bidirectional stream (``<Connect><Stream>``)."""

    def __init__(self, ws: ClientConnection, call_sid: str, stream_sid: str) -> None:
        self.ws = ws
        self.call_sid, self.stream_sid = call_sid, stream_sid
        self.loop = asyncio.get_running_loop()
        self.seq = 0
        self.log: list[
            tuple
        ] = []  # what the bridge sent, in order: ("media", bytes) / ("mark", name) / ("clear",)
        self.first_media_at: float | None = None  # perf_counter
        self.played: list[str] = []  # marks echoed because their audio played
        self.returned: list[str] = []  # marks echoed by a clear (dropped, never heard)
        self.played_at_clear: list[str] = []  # the marks played when the (last) clear came
        self.dropped_ms = 0.0  # audio the (last) clear dropped from the buffer
        self.frames_when_played: dict[str, int] = {}  # media received when a mark's audio had played
        self.foreign: list[dict] = []  # messages without our streamSid or of unknown events
        self.close_code: int | None = None
        self._play_until = 0.0  # loop time at which the audio queued so far has played
        self._pending: list[tuple[float, str]] = []  # marks not yet echoed, in order, with when they play
        self._timers: list[asyncio.TimerHandle] = []
        self._outbox: asyncio.Queue[dict] = asyncio.Queue()  # echoes, sent in order by one task
        self._changed = asyncio.Event()
        self._tasks = [self.loop.create_task(self._read()), self.loop.create_task(self._speak())]
        self._tasks.append(self.loop.create_task(self._send_echoes()))

    @classmethod
    async def dial(cls, bridge_base: str, **params: str) -> FakeTwilio:
        ws = await connect(bridge_base.replace("http://", "ws://") + "/twilio/media-stream")
        call = cls(ws, "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex)
        await call.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await call.send(
            {
                "event": "start",
                "start": {
                    "streamSid": call.stream_sid,
                    "accountSid": "AC" + "0" * 32,
                    "callSid": call.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": params,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
        return call

    async def send(self, msg: dict) -> None:
        self.seq += 1
        msg = {"sequenceNumber": str(self.seq), **msg}
        if msg["event"] not in ("connected", "start"):
            msg.setdefault("streamSid", self.stream_sid)
        await self.ws.send(json.dumps(msg))

    @property
    def media(self) -> list[bytes]:
        return [e[1] for e in self.log if e[0] == "media"]

    def sent_marks(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "mark"]

    def media_after_clear(self) -> int:
        clears = [i for i, e in enumerate(self.log) if e[0] == "clear"]
        return sum(1 for e in self.log[clears[-1] :] if e[0] == "media") if clears else 0

    async def until(self, predicate, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                event = msg.get("event")
                if msg.get("streamSid") != self.stream_sid or event not in ("media", "mark", "clear"):
                    self.foreign.append(msg)
                elif event == "media":
                    self._media(base64.b64decode(msg["media"]["payload"]))
                elif event == "mark":
                    self.log.append(("mark", msg["mark"]["name"]))
                    self._pending.append((self._play_until, msg["mark"]["name"]))
                    self._timers.append(self.loop.call_at(self._play_until, self._play_due))
                else:
                    self.log.append(("clear",))
                    self._clear()
                self._changed.set()
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code  # what the bridge closed with
        self._changed.set()

    def _media(self, audio: bytes) -> None:
        if self.first_media_at is None:
            self.first_media_at = time.perf_counter()
        self.log.append(("media", audio))
        self._play_until = max(self.loop.time(), self._play_until) + 0.02

    def _play_due(self) -> None:
        """Echo, in the order they were sent, the marks whose audio has played."""
        while self._pending and self._pending[0][0] <= self.loop.time():
            self._echo(self._pending.pop(0)[1], played=True)

    def _clear(self) -> None:
        """The buffered audio is dropped; its marks come back at once, unplayed."""
        self.played_at_clear = list(self.played)
        self.dropped_ms = max(0.0, self._play_until - self.loop.time()) * 1000
        while self._pending:
            self._echo(self._pending.pop(0)[1], played=False)
        self._play_until = self.loop.time()

    def _echo(self, name: str, played: bool) -> None:
        (self.played if played else self.returned).append(name)
        if played:
            self.frames_when_played[name] = len(self.media)
        self._outbox.put_nowait({"event": "mark", "mark": {"name": name}})
        self._changed.set()

    async def _send_echoes(self) -> None:
        while True:
            await self._send_quietly(await self._outbox.get())

    async def _send_quietly(self, msg: dict) -> None:
        try:
            await self.send(msg)
        except ConnectionClosed:
            pass

    async def _speak(self) -> None:
        """The caller's side: 20 ms of μ-law silence every 20 ms, as Twilio streams inbound audio."""
        chunk = 0
        while True:
            chunk += 1
            await self._send_quietly(
                {
                    "event": "media",
                    "media": {
                        "track": "inbound",
                        "chunk": str(chunk),
                        "timestamp": str(chunk * 20),
                        "payload": base64.b64encode(b"\xff" * FRAME_BYTES).decode(),
                    },
                }
            )
            await asyncio.sleep(0.02)

    async def hang_up(self) -> None:
        self._tasks[1].cancel()
        await self._send_quietly(
            {"event": "stop", "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}}
        )
        await self.until(lambda: self.close_code is not None)
        for task in self._tasks:
            task.cancel()
        for timer in self._timers:
            timer.cancel()


def offset_of(mark: str) -> int:
    """The text offset a mark named ``TURN:OFFSET`` stands for (``TURN:end``: not an offset)."""
    return int(mark.rsplit(":", 1)[1])


async def call_info(http: httpx.AsyncClient, call: FakeTwilio) -> dict:
    r = await http.get(f"/calls/{call.call_sid}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def until_call_known(http: httpx.AsyncClient, call: FakeTwilio) -> None:
    """The bridge registers a call once its service socket is ready."""
    async with asyncio.timeout(WAIT):
        while (await http.get(f"/calls/{call.call_sid}", headers=AUTH)).status_code != 200:
            await asyncio.sleep(0.02)


async def say(http: httpx.AsyncClient, call: FakeTwilio, text: str, end: bool = False) -> dict:
    r = await http.post(f"/calls/{call.call_sid}/say", json={"text": text, "end": end}, headers=AUTH)
    assert r.status_code == 202, r.text
    return r.json()


async def test_a_turn_reaches_twilio_as_paced_20ms_frames_with_marks_echoed(bridge):
    base, inbound = bridge
    text = "Sure, the weather in Paris is sunny today. It will rain tomorrow, so take an umbrella."
    deltas = [
        "Sure, the weather in Paris ",
        "is sunny today. It will rain ",
        "tomorrow, so take an umbrella.",
    ]
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base, agent="weather")
        await until_call_known(http, call)
        pushed = time.perf_counter()
        for k, delta in enumerate(deltas):
            assert (await say(http, call, delta, end=k == len(deltas) - 1))["turn_id"] == "turn-1"
        await call.until(lambda: "turn-1:end" in call.played)
        info = await call_info(http, call)
        await call.hang_up()

    print(
        f"\ntwilio bridge: first audio {1000 * (call.first_media_at - pushed):.0f} ms (text pushed -> first media)"
    )
    assert call.foreign == []
    assert info["custom_parameters"] == {"agent": "weather"}
    (turn,) = info["turns"]
    assert turn["state"] == "played" and turn["heard"] == text and turn["text"] == text
    # every media message is 20 ms of μ-law; together they are the turn's audio, none lost
    assert all(len(m) == FRAME_BYTES for m in call.media)
    assert len(call.media) == turn["frames"] > 0
    assert abs(len(call.media) * 20 - turn["audio_ms"]) <= 40
    # the service's marks arrive in text order, each after audio, and Twilio echoed each as played
    marks = call.sent_marks()
    assert marks[-1] == "turn-1:end" and len(marks) >= 2
    offsets = [offset_of(m) for m in marks[:-1]]
    assert offsets == sorted(offsets) and offsets[-1] == len(text)
    # each at the end of a word (a clause's, or every word's where the service sends `words`)
    assert all(text[o - 1].strip() and (o == len(text) or not text[o].isalnum()) for o in offsets)
    if info["word_marks"]:  # a service with `words`: a mark at every word's end, heard to the word
        assert set(offsets) >= {
            len(w.rstrip(".,")) + text.index(w) for w in ("Sure,", "weather", "umbrella.")
        }
    assert call.log[0][0] == "media"
    assert call.played == marks and call.returned == []
    # realtime pacing: when the caller had heard the first sentence, the rest was still to come
    assert call.frames_when_played[marks[0]] < len(call.media)
    # the caller's audio reached the agent's hook as Twilio sent it
    assert inbound and all(len(a) == FRAME_BYTES for a in inbound)


async def test_barge_in_clears_twilio_cancels_the_turn_and_says_what_was_heard(bridge, service):
    base, _ = bridge
    text = (
        "Let me read the whole forecast for you. Monday will be cloudy with light wind. "
        "Tuesday brings heavy rain in the morning. Wednesday should be bright and warm again."
    )
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base)
        await until_call_known(http, call)
        await say(http, call, text[:50])
        await say(http, call, text[50:], end=True)
        # the caller has heard the first sentence, and the next mark is on its way (sent, unplayed)
        await call.until(lambda: len(call.played) >= 1 and len(call.sent_marks()) >= 2)
        r = await http.post(f"/calls/{call.call_sid}/barge_in", headers=AUTH)
        assert r.status_code == 200, r.text
        heard = r.json()
        # the bridge waited for the service's `cancelled`: its place is free already
        health = httpx.get(service + "/health", headers={"Authorization": f"Bearer {SERVICE_TOKEN}"}).json()
        assert health["streams"] == 0
        await call.until(lambda: ("clear",) in call.log)
        played_before_clear = call.played_at_clear
        # the rest of the turn was several seconds of audio the service paces out 20 ms at a time:
        # a second is ample for it to show up if the bridge let any through after the clear
        await asyncio.sleep(1.0)
        after_interruption = call.media_after_clear()
        info = await call_info(http, call)

        # the next turn speaks normally on the same call
        assert (await say(http, call, "Okay, I will stop.", end=True))["turn_id"] == "turn-2"
        await call.until(lambda: "turn-2:end" in call.played)
        info2 = await call_info(http, call)
        await call.hang_up()

    print(
        f"\ntwilio bridge: {after_interruption} media frames after the interruption "
        f"({call.dropped_ms:.0f} ms of buffered audio dropped by the clear)"
    )
    assert heard["interrupted"] is True and heard["turn_id"] == "turn-1"
    last = offset_of(played_before_clear[-1])
    assert 0 < last < len(text)
    assert heard["heard"] == text[:last] and heard["text_offset"] == last and heard["audio_ms"] > 0
    assert after_interruption == 0
    # marks returned by the clear (dropped audio) do not count as heard
    assert set(call.returned).isdisjoint(played_before_clear)
    turn1 = info["turns"][0]
    assert turn1["state"] == "interrupted" and turn1["heard"] == heard["heard"]
    assert info2["turns"][0]["heard"] == heard["heard"]
    turn2 = info2["turns"][1]
    assert turn2["state"] == "played" and turn2["heard"] == "Okay, I will stop." and turn2["frames"] > 0
    assert call.log.index(("clear",)) < len(call.log) - turn2["frames"]


async def test_barge_in_after_the_service_finished_still_clears_what_twilio_holds(bridge):
    """A short answer is synthesized before the caller has heard it: the service is done, Twilio
    still plays it, and a barge-in must still clear it and say how much was heard."""
    base, _ = bridge
    text = "Yes, it is open today."
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base)
        await until_call_known(http, call)
        await say(http, call, text, end=True)
        await call.until(lambda: "turn-1:end" in call.sent_marks())  # all of it sent, not yet played
        assert "turn-1:end" not in call.played
        r = await http.post(f"/calls/{call.call_sid}/barge_in", headers=AUTH)
        await call.until(lambda: ("clear",) in call.log)
        info = await call_info(http, call)
        await call.hang_up()
    heard = r.json()
    assert heard["interrupted"] is True and heard["turn_id"] == "turn-1"
    last = offset_of(call.played_at_clear[-1]) if call.played_at_clear else 0
    assert heard["heard"] == text[:last] and len(heard["heard"]) < len(text)
    assert "turn-1:end" in call.returned
    assert info["turns"][0]["state"] == "interrupted" and info["turns"][0]["heard"] == heard["heard"]


async def test_a_call_whose_service_went_away_refuses_text_with_502():
    service_run = serve(ToneEngine(word_ms=50))
    service = service_run.__enter__()
    try:
        tb = TwilioBridge(service)
        with serve_asgi(tb.app) as (base, _server):
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
                call = await FakeTwilio.dial(base)
                await until_call_known(http, call)
                await say(http, call, "one two ", end=True)
                await call.until(lambda: "turn-1:end" in call.played)
                service_run.__exit__(None, None, None)  # the service stops: its sockets close
                service_run = None
                async with asyncio.timeout(WAIT):
                    while (await call_info(http, call))["service_connected"]:
                        await asyncio.sleep(0.05)
                r = await http.post(f"/calls/{call.call_sid}/say", json={"text": "three"}, headers=AUTH)
                await call.hang_up()
    finally:
        if service_run is not None:
            service_run.__exit__(None, None, None)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "internal")
    assert call.close_code == 1000


async def test_barge_in_with_nothing_playing_clears_nothing(bridge):
    base, _ = bridge
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base)
        await until_call_known(http, call)
        r = await http.post(f"/calls/{call.call_sid}/barge_in", headers=AUTH)
        await call.hang_up()
    assert r.status_code == 200
    assert r.json() == {"interrupted": False, "turn_id": None, "heard": "", "text_offset": 0, "audio_ms": 0.0}
    assert ("clear",) not in call.log


async def test_stop_mid_turn_closes_the_stream_and_frees_the_service(bridge, service):
    base, _ = bridge
    service_auth = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base)
        await until_call_known(http, call)
        await say(
            http, call, "This answer is long enough that the caller hangs up before it ends. " * 3, end=True
        )
        await call.until(lambda: len(call.media) > 0)
        await call.hang_up()
        assert call.close_code == 1000
        r = await http.get(f"/calls/{call.call_sid}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.post(f"/calls/{call.call_sid}/say", json={"text": "hello"}, headers=AUTH)
        assert r.status_code == 404
    async with asyncio.timeout(WAIT):  # the service sees the bridge's socket close
        while (health := httpx.get(service + "/health", headers=service_auth).json())["sessions"]:
            await asyncio.sleep(0.05)
    assert health["streams"] == 0


async def test_malformed_twilio_frames_are_ignored_and_counted(bridge):
    base, _ = bridge
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        ws = await connect(base.replace("http://", "ws://") + "/twilio/media-stream")
        call = FakeTwilio(ws, "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex)
        call._tasks[1].cancel()  # no inbound audio here: the counts below are exact
        await ws.send("this is not JSON")
        await call.send({"event": "media", "media": {"payload": "/w=="}})  # before start
        await call.send({"event": "start", "start": {"streamSid": call.stream_sid, "callSid": call.call_sid}})
        await until_call_known(http, call)
        await ws.send(b"\x00\x01binary")
        await ws.send("[1, 2, 3]")
        await ws.send(json.dumps({"event": 5}))
        await call.send({"event": "mark", "mark": {}})  # no name
        await call.send({"event": "bogus"})
        await call.send({"event": "media", "media": {"payload": "!!not base64!!"}})
        await call.send({"event": "mark", "mark": {"name": "never-sent"}})
        await call.send({"event": "start", "start": {"streamSid": "MZx", "callSid": "CAx"}})
        await call.send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "5"}})
        # the stream still works
        await say(http, call, "Still here.", end=True)
        await call.until(lambda: "turn-1:end" in call.played)
        info = await call_info(http, call)
        await call.hang_up()
    assert info["ignored_frames"] == {
        "bad_json": 1,
        "before_start": 1,
        "binary_frame": 1,
        "bad_frame": 3,
        "unknown_event": 1,
        "bad_payload": 1,
        "unknown_mark": 1,
        "repeated_start": 1,
    }
    assert info["turns"][0]["heard"] == "Still here."
    assert call.close_code == 1000


@pytest.mark.parametrize(
    "start",
    [
        {"streamSid": "MZ1"},  # no callSid
        {
            "streamSid": "MZ1",
            "callSid": "CA1",
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000},
        },
    ],
)
async def test_a_start_the_stream_cannot_use_closes_it_with_1008(bridge, start):
    base, _ = bridge
    async with connect(base.replace("http://", "ws://") + "/twilio/media-stream") as ws:
        await ws.send(json.dumps({"event": "start", "start": start}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                await ws.recv()
    assert closed.value.rcvd.code == 1008


async def test_a_bridge_without_its_service_closes_the_stream_with_1011():
    tb = TwilioBridge(f"ws://127.0.0.1:{free_port()}")
    with serve_asgi(tb.app) as (base, _server):
        async with connect(base.replace("http://", "ws://") + "/twilio/media-stream") as ws:
            await ws.send(json.dumps({"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1"}}))
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(WAIT):
                    await ws.recv()
    assert closed.value.rcvd.code == 1011
    assert tb.calls == {}


async def test_control_channel_refuses_bad_requests_with_typed_errors(bridge):
    base, _ = bridge
    async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
        call = await FakeTwilio.dial(base)
        await until_call_known(http, call)
        path = f"/calls/{call.call_sid}/say"
        cases = [
            (http.post(path, json={"text": "hi"}), 401, "unauthorized"),
            (
                http.post(path, json={"text": "hi"}, headers={"Authorization": "Bearer wrong"}),
                403,
                "unauthorized",
            ),
            (http.post("/calls/CAnone/say", json={"text": "hi"}, headers=AUTH), 404, "not_found"),
            (http.post(path, content=b"{not json", headers=AUTH), 400, "bad_request"),
            (http.post(path, json=["hi"], headers=AUTH), 400, "bad_request"),
            (http.post(path, json={"text": 5}, headers=AUTH), 400, "bad_request"),
            (http.post(path, json={"text": "hi", "speed": 2}, headers=AUTH), 400, "bad_request"),
            (http.post(path, json={"text": "hi", "turn_id": "a:b"}, headers=AUTH), 400, "bad_request"),
            (http.post(path, content=b'{"text": "\\ud800"}', headers=AUTH), 400, "bad_request"),
            (http.post(f"/calls/{call.call_sid}/barge_in", json={"x": 1}, headers=AUTH), 400, "bad_request"),
        ]
        for request, status, code in cases:
            r = await request
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        # a turn that has ended takes no more text
        r = await http.post(path, json={"text": "", "end": True, "turn_id": "greeting"}, headers=AUTH)
        assert r.status_code == 202 and r.json() == {"turn_id": "greeting", "state": "played"}
        r = await http.post(path, json={"text": "more", "turn_id": "greeting"}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        await call.hang_up()
    assert call.media == []


async def test_an_agent_in_the_bridge_process_speaks_through_call(service):
    """The in-process hooks: ``on_call`` greets every caller, a DTMF key interrupts the greeting."""
    digits: list[str] = []
    interrupted: list = []

    async def greet(call) -> None:
        await call.say("Hello, thanks for calling. ", turn_id="greeting")
        await call.say("Press any key to skip this long message about our opening hours.", end=True)

    def on_dtmf(call, digit: str) -> None:
        digits.append(digit)
        task = asyncio.get_running_loop().create_task(call.barge_in())
        task.add_done_callback(lambda t: interrupted.append(t.result()))

    tb = TwilioBridge(service, SERVICE_TOKEN, on_call=greet, on_dtmf=on_dtmf)
    with serve_asgi(tb.app) as (base, _server):
        call = await FakeTwilio.dial(base)
        await call.until(lambda: len(call.played) >= 1)
        await call.send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": "1"}})
        await call.until(lambda: ("clear",) in call.log)
        await call.hang_up()
    assert digits == ["1"]
    (heard,) = interrupted
    assert heard.turn_id == "greeting" and heard.text == "Hello, thanks for calling."[: heard.text_offset]
    assert heard.text_offset == offset_of(call.played_at_clear[-1]) > 0
    assert call.sent_marks()[0].startswith("greeting:")


async def test_the_bridge_runs_as_its_own_program(service):
    """``python examples/twilio_bridge.py`` as a user starts it, with tokens on both sides."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(BRIDGE_SCRIPT), "--service", service, "--token", SERVICE_TOKEN]
        + ["--control-token", CONTROL_TOKEN, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as http:
            async with asyncio.timeout(WAIT):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/twiml")).status_code == 200:
                            break
                    assert proc.poll() is None, proc.stdout.read().decode()
                    await asyncio.sleep(0.1)
            call = await FakeTwilio.dial(base)
            await until_call_known(http, call)
            await say(http, call, "Hello from the bridge.", end=True)
            await call.until(lambda: "turn-1:end" in call.played)
            info = await call_info(http, call)
            await call.hang_up()
    finally:
        proc.terminate()
        proc.wait(10)
    assert info["turns"][0]["heard"] == "Hello from the bridge." and len(call.media) > 0


async def test_twiml_points_twilio_at_the_media_stream(bridge):
    base, _ = bridge
    proxied = {"x-forwarded-proto": "https", "x-forwarded-host": "bridge.example.com"}
    async with httpx.AsyncClient(base_url=base) as http:
        direct, behind_tls = await http.post("/twiml"), await http.get("/twiml", headers=proxied)
    urls = []
    for r in (direct, behind_tls):
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
        stream = ET.fromstring(r.text).find("./Connect/Stream")
        assert stream is not None
        urls.append(stream.get("url"))
    assert urls == [
        base.replace("http://", "ws://") + "/twilio/media-stream",
        "wss://bridge.example.com/twilio/media-stream",
    ]
