"""Soak and fuzz: many sessions for minutes, with the faults real clients cause, against a server in
its own process.  Not part of the test run (a short run of it is: tests/test_soak.py).

    python benchmarks/soak.py --sessions 50 --minutes 3                # default voice, as in the issue
    python benchmarks/soak.py --engine tone --sessions 8 --seconds 20  # a quick look
    python benchmarks/soak.py --engine cosyvoice2 --model-dir DIR --sessions 16 --minutes 1

Normal sessions cycle: connect, stream an LLM-like answer (4-character deltas at ``--tps``), then
end it (and check that the audio received is exactly what ``done`` says), cancel it at a random
point (and check that nothing follows ``cancelled``), or vanish mid-stream.  A session refused with
``overloaded`` waits ``retry_after_ms`` and tries again.  Beside them, faulty clients cycle too:
one that never reads, one that reads slowly, one that vanishes without a close, one that opens
contexts and says nothing, one that connects and stays silent, and fuzzers that send malformed
frames (each followed by a probe, so that every frame is known to have been answered).

It prints sessions done / cancelled / vanished / overloaded / errored, audio checks, fuzzed frames
and their untyped answers, stalled sockets and how fast the server cut them off, /health
availability, and the server's RSS, threads and open sockets at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from common import ANSWERS, percentile, server_process

from realtime.errors import ERROR_CODES

TYPES = {"ready", "audio", "mark", "flushed", "done", "cancelled", "error"}
RATE = 16000  # pcm_s16le at 16 kHz: 32,000 bytes per second of audio


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    ttfa: list[float] = field(default_factory=list)
    audio_checked: int = 0
    audio_mismatch: int = 0
    fuzz_frames: int = 0
    fuzz_untyped: int = 0
    stalls: list[float] = field(default_factory=list)  # seconds until a never-reading socket was cut
    stalls_open: int = 0
    health_ok: int = 0
    health_failed: int = 0
    health_max_ms: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the run, KiB)

    def problem(self, text: str) -> None:
        self.outcomes["errored"] += 1
        if len(self.problems) < 20:
            self.problems.append(text)


def typed(frame: str) -> dict | None:
    """The message if it is one the protocol defines (errors with a known code), else None."""
    try:
        m = json.loads(frame)
    except ValueError:
        return None
    if not isinstance(m, dict) or m.get("type") not in TYPES:
        return None
    if m["type"] == "error" and m.get("code") not in ERROR_CODES:
        return None
    return m


# -- normal sessions ------------------------------------------------------------------------------
async def normal_session(url: str, rng: random.Random, args, tally: Tally) -> float:
    """One utterance; returns how long to wait before the next."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    text = rng.choice(ANSWERS)
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    fate = rng.choices(["end", "cancel", "vanish"], weights=[70, 20, 10])[0]
    stop_at = rng.randrange(1, len(pieces) + 1)
    try:
        async with connect(url, max_size=None, open_timeout=30, close_timeout=5) as ws:
            await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": RATE}))
            ready = typed(await asyncio.wait_for(ws.recv(), 30))
            if ready is None or ready["type"] != "ready":
                tally.problem(f"no ready: {ready}")
                return 1.0
            t0 = time.perf_counter()
            audio = 0
            first = None

            async def feed() -> None:
                for i, p in enumerate(pieces):
                    if fate != "end" and i == stop_at:
                        return
                    await ws.send(json.dumps({"type": "text", "text": p}))
                    await asyncio.sleep(1 / args.tps)
                await ws.send(json.dumps({"type": "end"}))

            feeder = asyncio.create_task(feed())
            try:
                while True:
                    if fate != "end" and feeder.done():
                        break
                    try:
                        msg = await asyncio.wait_for(ws.recv(), 0.2 if fate != "end" else 60)
                    except TimeoutError:
                        if fate == "end":
                            tally.problem("no done within 60 s")
                            return 1.0
                        continue
                    if isinstance(msg, bytes):
                        if first is None:
                            first = time.perf_counter()
                            tally.ttfa.append(first - t0)
                        audio += len(msg)
                        continue
                    m = typed(msg)
                    if m is None:
                        tally.problem(f"untyped frame {msg[:80]!r}")
                        return 1.0
                    if m["type"] == "error":
                        if m["code"] == "overloaded" and audio == 0:
                            tally.outcomes["overloaded at admission"] += 1
                            return m.get("retry_after_ms", 1000) / 1000
                        tally.problem(f"error {m['code']}: {m['message']}")
                        return 1.0
                    if m["type"] == "done":
                        tally.outcomes["done"] += 1
                        expected = m["stats"]["audio_ms"] / 1000 * RATE * 2
                        tally.audio_checked += 1
                        if abs(audio - expected) > 2 * RATE * 2 * 0.001 + 2:  # within 2 ms
                            tally.audio_mismatch += 1
                            tally.problem(f"audio {audio} bytes, done says {expected:.0f}")
                        return 0.0
            finally:
                feeder.cancel()
            if fate == "vanish":
                ws.transport.abort()
                tally.outcomes["vanished"] += 1
                return 0.0
            await ws.send(json.dumps({"type": "cancel"}))
            while True:  # audio may still come until the acknowledgement, nothing after it
                msg = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(msg, str):
                    m = typed(msg)
                    if m is None:
                        tally.problem(f"untyped frame {msg[:80]!r}")
                        return 1.0
                    if m["type"] in ("cancelled", "done"):
                        break
                    if m["type"] == "error" and m["code"] == "overloaded":
                        tally.outcomes["overloaded at admission"] += 1
                        return m.get("retry_after_ms", 1000) / 1000
            try:
                extra = await asyncio.wait_for(ws.recv(), 0.3)
                tally.problem(f"frame after cancelled: {str(extra)[:60]}")
            except TimeoutError:
                tally.outcomes["cancelled"] += 1
    except ConnectionClosed as e:
        tally.problem(f"closed by server: {e}")
    except (OSError, TimeoutError) as e:
        tally.problem(f"{type(e).__name__}: {e}")
    return 1.0


async def cycle(deadline: float, body, *a) -> None:
    while time.monotonic() < deadline:
        pause = await body(*a)
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


# -- faulty clients -------------------------------------------------------------------------------
def _upgrade(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /v1/tts/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(1)
    return s


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    length = (
        bytes([0x80 | n])
        if n < 126
        else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        if n < 65536
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    )
    return bytes([0x80 | opcode]) + length + mask + masked


def _tcp_state(s: socket.socket) -> int:
    """Linux tcpi_state: 1 established, 7 closed (reset), 8 close-wait (the peer closed)."""
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def never_reads(port: int, limit: float, tally: Tally) -> float:
    """Asks for a lot of audio and never reads: the server must cut the TCP connection.  Watched
    through the socket's TCP state, without reading (which would unblock the server)."""
    s = _upgrade(port, 4096)
    s.sendall(_frame(json.dumps({"type": "start", "format": "pcm_f32le", "sample_rate": 48000}).encode()))
    s.sendall(_frame(json.dumps({"type": "text", "text": "word " * 3000}).encode()))
    t0 = time.monotonic()
    try:
        while _tcp_state(s) == 1:
            if time.monotonic() - t0 > limit + 10:
                tally.stalls_open += 1
                return 0.5
            time.sleep(0.05)
    finally:
        s.close()
    tally.stalls.append(time.monotonic() - t0)
    tally.outcomes["never-read cut off"] += 1
    return 0.5


async def slow_reader(url: str, tally: Tally) -> float:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    try:  # no client pings: its pong would queue behind the audio it is slow to read
        async with connect(url, max_size=None, open_timeout=30, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "text", "text": "word " * 200}))
            await ws.send(json.dumps({"type": "end"}))
            while True:
                msg = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(msg, str):
                    m = typed(msg)
                    if m is None:
                        tally.problem(f"untyped frame {msg[:80]!r}")
                        return 1.0
                    if m["type"] in ("done", "error"):
                        tally.outcomes[f"slow reader {m.get('code', m['type'])}"] += 1
                        return m.get("retry_after_ms", 0) / 1000
                await asyncio.sleep(0.02)
    except ConnectionClosed as e:
        tally.outcomes[f"slow reader closed {e.rcvd.code if e.rcvd else 'abnormally'}"] += 1
    except (OSError, TimeoutError) as e:
        tally.problem(f"slow reader {type(e).__name__}: {e}")
    return 0.5


async def vanisher(url: str, tally: Tally) -> float:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "text", "text": "word " * 100}))
        await asyncio.sleep(0.3)
        ws.transport.abort()  # gone without a close frame
    tally.outcomes["vanished without close"] += 1
    return 0.2


async def hog(url: str, contexts: int, tally: Tally) -> float:
    """Opens every context it may and says nothing: it must hold no capacity, and be ended."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    try:
        async with connect(url, open_timeout=30) as ws:
            for k in range(contexts):
                await ws.send(json.dumps({"type": "text", "text": "", "context_id": f"hog{k}"}))
            ended = 0
            while ended < contexts:
                m = typed(await asyncio.wait_for(ws.recv(), 120))
                if m is not None and m["type"] == "error" and m["code"] == "timeout" and m.get("context_id"):
                    ended += 1
            tally.outcomes["hog's contexts ended"] += 1
    except (ConnectionClosed, TimeoutError, OSError) as e:
        tally.problem(f"hog: {type(e).__name__}: {e}")
    return 0.2


async def silent(url: str, tally: Tally) -> float:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    try:
        async with connect(url, open_timeout=30, ping_interval=None) as ws:
            m = typed(await asyncio.wait_for(ws.recv(), 600))
            if m is None or m.get("code") != "timeout":
                tally.problem(f"silent: {m}")
            await asyncio.wait_for(ws.recv(), 30)
    except ConnectionClosed:
        tally.outcomes["silent closed"] += 1
    except (TimeoutError, OSError) as e:
        tally.problem(f"silent: {type(e).__name__}: {e}")
    return 0.2


# -- fuzzing ----------------------------------------------------------------------------------------
def fuzz_frame(rng: random.Random) -> str | bytes:
    def weird_value():
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                -0,
                1,
                -1,
                0.5,
                1e308,
                -1e308,
                2**53,
                -(2**63),
                "",
                "x" * rng.randrange(200),
                [],
                {},
                [1, [2]],
                {"a": {"b": 1}},
                "\ud800",
                "joe",
                "opus",
                "mulaw",
                "zero_shot",
                8000,
                44100,
                48000,
            ]
        )

    kind = rng.randrange(10)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))  # binary frame
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 80)))  # not JSON
    if kind == 2:
        depth = rng.randrange(1, 3000)
        return "[" * depth + "]" * depth
    if kind == 3:
        return '{"type": "start", "speed": ' + "9" * rng.randrange(16, 6000) + "}"
    if kind == 4:
        return (
            '{"type": "text", "text": "a\\ud800b", "context_id": "' + rng.choice(["\\udfff", "ok", ""]) + '"}'
        )
    if kind == 5:
        return rng.choice(
            ["NaN", "Infinity", '{"type":"start","speed":NaN}', '{"type":"start","sample_rate":-0}']
        )
    msg: dict = {"type": rng.choice(["start", "text", "flush", "end", "cancel", "dance", 7, None])}
    for key in rng.sample(
        [
            "text",
            "context_id",
            "voice",
            "speed",
            "format",
            "sample_rate",
            "container",
            "pacing",
            "audio_transport",
            "mode",
            "seed",
            "token_hop_len",
            "prompt_audio",
            "bogus",
        ],
        rng.randrange(0, 5),
    ):
        msg[key] = weird_value()
    if rng.random() < 0.5 and msg["type"] == "text":
        msg["text"] = rng.choice(["hi ", "", "word " * rng.randrange(1, 30), "😀 ", "x"])
    text = json.dumps(msg, ensure_ascii=rng.random() < 0.5)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate must travel as an escape: a frame is UTF-8
        text = json.dumps(msg)
    return text


async def fuzzer(url: str, rng: random.Random, frames: int, deadline: float, tally: Tally) -> None:
    """Each fuzzed frame is followed by a probe (a cancel of an unknown context, always answered
    with a typed error naming it): everything that arrives before that answer is the fuzzed
    frame's, and must be a typed message, audio, or a fatal error followed by its close."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    sent = 0
    while sent < frames and time.monotonic() < deadline:
        fatal = None
        try:
            async with connect(url, max_size=None, open_timeout=30) as ws:
                while sent < frames and time.monotonic() < deadline:
                    frame = fuzz_frame(rng)
                    probe = f"probe-{sent}"
                    await ws.send(frame)
                    sent += 1
                    tally.fuzz_frames += 1
                    await ws.send(json.dumps({"type": "cancel", "context_id": probe}))
                    while True:
                        msg = await asyncio.wait_for(ws.recv(), 30)
                        if isinstance(msg, bytes):
                            continue
                        m = typed(msg)
                        if m is None:
                            tally.fuzz_untyped += 1
                            break
                        if m["type"] == "error" and m.get("fatal"):
                            fatal = m
                        if m["type"] == "error" and m.get("context_id") == probe:
                            break
                    if sent % 50 == 0:
                        await ws.send(json.dumps({"type": "cancel"}))  # clear what the fuzz opened
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
            if fatal is None or code != ERROR_CODES[fatal["code"]].close_code:
                tally.fuzz_untyped += 1
        except (TimeoutError, OSError):
            tally.fuzz_untyped += 1  # no answer at all: the worst kind


async def invalid_utf8(port: int, tally: Tally) -> float:
    s = await asyncio.to_thread(_upgrade, port)
    s.sendall(_frame(b'{"type": "text", "text": "\xff\xfe"}'))
    s.settimeout(10)
    try:
        reply = await asyncio.to_thread(s.recv, 64)
        ok = reply[:1] == b"\x88" and int.from_bytes(reply[2:4], "big") == 1007
    except (OSError, TimeoutError):
        ok = False
    finally:
        s.close()
    tally.fuzz_frames += 1
    tally.fuzz_untyped += 0 if ok else 1
    return 0.2


# -- the server's side -----------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    fds = os.listdir(f"/proc/{pid}/fd")
    out["sockets"] = sum(1 for fd in fds if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    return out


async def watch_health(base: str, pid: int, deadline: float, tally: Tally) -> None:
    import httpx

    begin = time.monotonic()
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            if not tally.rss or time.monotonic() - begin - tally.rss[-1][0] >= 5:
                tally.rss.append((time.monotonic() - begin, proc_status(pid)["VmRSS"]))
            t0 = time.perf_counter()
            try:
                ok = (await http.get(base + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            tally.health_max_ms = max(tally.health_max_ms, (time.perf_counter() - t0) * 1000)
            tally.health_ok += ok
            tally.health_failed += not ok
            await asyncio.sleep(0.5)


async def scrape_places(base: str) -> dict[str, float]:
    """What /metrics says of the places the engine hands out (KV slots, estimator slots) and of
    the contexts still open: once every session has ended, every place should be free again."""
    import httpx

    names = (
        "cosyvoice_kv_slots",
        "cosyvoice_kv_slots_free",
        "cosyvoice_flow_slots",
        "cosyvoice_flow_slots_free",
        "realtime_contexts_active",
    )
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(base + "/metrics")).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value)
    return found


async def run(args, base: str, pid: int) -> Tally:
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    port = int(base.rsplit(":", 1)[1])
    tally = Tally()
    rng = random.Random(args.seed)
    await normal_session(url, rng, args, Tally())  # warm-up
    await asyncio.sleep(1)
    start = proc_status(pid)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    deadline = time.monotonic() + seconds
    # A never-reader that gets to speak is cut after the send timeout and the close timeout; one
    # refused for capacity has nothing to send and is closed as idle.
    stall_limit = max(args.send_timeout, args.idle_timeout) + args.close_timeout + 2
    jobs = [watch_health(base, pid, deadline, tally)]
    jobs += [
        cycle(deadline, normal_session, url, random.Random(rng.random()), args, tally)
        for _ in range(args.sessions)
    ]
    jobs += [
        cycle(deadline, lambda: asyncio.to_thread(never_reads, port, stall_limit, tally))
        for _ in range(args.faulty)
    ]
    jobs += [cycle(deadline, slow_reader, url, tally) for _ in range(args.faulty)]
    jobs += [cycle(deadline, vanisher, url, tally) for _ in range(args.faulty)]
    jobs += [cycle(deadline, hog, url, args.max_contexts, tally) for _ in range(args.faulty)]
    jobs += [cycle(deadline, silent, url, tally) for _ in range(args.faulty)]
    jobs += [cycle(deadline, invalid_utf8, port, tally)]
    per = args.fuzz_frames // max(1, args.fuzzers)
    jobs += [fuzzer(url, random.Random(rng.random()), per, deadline, tally) for _ in range(args.fuzzers)]
    await asyncio.gather(*jobs)
    await asyncio.sleep(args.close_timeout + 3)  # let the last sessions end
    tally.start, tally.end = start, proc_status(pid)  # type: ignore[attr-defined]
    tally.places = await scrape_places(base)  # type: ignore[attr-defined]
    tally.rss.append((time.monotonic() - deadline + seconds, tally.end["VmRSS"]))
    return tally


def report(args, tally: Tally) -> None:
    o = tally.outcomes
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    print(
        f"{args.sessions} sessions + {args.faulty} of each faulty client for {seconds:g} s, engine {args.engine}, "
        f"text at {args.tps:g} tokens/s"
    )
    print("| outcome | count |\n|---|---|")
    for key in ("done", "cancelled", "vanished", "overloaded at admission", "errored"):
        print(f"| {key} | {o.get(key, 0)} |")
    for key in sorted(
        k for k in o if k not in ("done", "cancelled", "vanished", "overloaded at admission", "errored")
    ):
        print(f"| {key} | {o[key]} |")
    print()
    ttfa = tally.ttfa
    print("| check | value |\n|---|---|")
    print(f"| first audio p50 / p95 (s) | {percentile(ttfa, 50):.2f} / {percentile(ttfa, 95):.2f} |")
    print(
        f"| audio bytes == done stats | {tally.audio_checked - tally.audio_mismatch} of {tally.audio_checked} |"
    )
    print(f"| fuzzed frames / untyped answers | {tally.fuzz_frames} / {tally.fuzz_untyped} |")
    stalls = tally.stalls
    print(
        f"| never-reading sockets cut off / left open | {len(stalls)} / {tally.stalls_open} "
        f"(cut after median {statistics.median(stalls) if stalls else float('nan'):.1f} s, max "
        f"{max(stalls) if stalls else float('nan'):.1f} s; send + close timeout {args.send_timeout + args.close_timeout:g} s, "
        f"idle + close {args.idle_timeout + args.close_timeout:g} s) |"
    )
    print(
        f"| /health answered / failed (slowest ms) | {tally.health_ok} / {tally.health_failed} ({tally.health_max_ms:.0f}) |"
    )
    s, e = tally.start, tally.end  # type: ignore[attr-defined]
    warm = next((kib for t, kib in tally.rss if t >= seconds / 4), s["VmRSS"])  # after a quarter of the run
    print(
        f"| server RSS MiB: idle start / after warm-up (¼ of the run) / end / max | {s['VmRSS'] / 1024:.1f} / "
        f"{warm / 1024:.1f} / {e['VmRSS'] / 1024:.1f} / {max([k for _, k in tally.rss] + [e['VmRSS']]) / 1024:.1f} "
        f"(end vs warm-up {(e['VmRSS'] / warm - 1) * 100:+.1f} %) |"
    )
    print(
        "| server RSS MiB every 5 s, then at the end | "
        + " ".join(f"{k / 1024:.0f}" for _, k in tally.rss)
        + " |"
    )
    print(f"| server threads start → end | {s['Threads']} → {e['Threads']} |")
    print(f"| server open sockets start → end | {s['sockets']} → {e['sockets']} |")
    places = tally.places  # type: ignore[attr-defined]
    for label, key in (("KV slots", "cosyvoice_kv_slots"), ("estimator slots", "cosyvoice_flow_slots")):
        if key in places:
            free, total = places.get(key + "_free", float("nan")), places[key]
            print(f"| {label} free at the end / all | {free:.0f} / {total:.0f} |")
            if free != total:
                tally.problems.append(f"{total - free:.0f} {label} still held after every session ended")
    if "realtime_contexts_active" in places:
        print(f"| contexts open at the end | {places['realtime_contexts_active']:.0f} |")
    for p in tally.problems:
        print(f"problem: {p}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="piper", choices=("piper", "tone", "cosyvoice2"))
    p.add_argument("--model-dir", default=None, help="the CosyVoice2 directory (--engine cosyvoice2)")
    p.add_argument("--sessions", type=int, default=50, help="normal sessions cycling at once")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    p.add_argument("--faulty", type=int, default=2, help="clients of each faulty kind")
    p.add_argument("--fuzzers", type=int, default=8, help="fuzzing clients (each stops at the deadline)")
    p.add_argument("--fuzz-frames", type=int, default=10_000)
    p.add_argument("--tps", type=float, default=30.0, help="LLM tokens per second (4 characters each)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--send-timeout", type=float, default=5.0, help="server --send-timeout")
    p.add_argument("--close-timeout", type=float, default=2.0, help="server --close-timeout")
    p.add_argument("--idle-timeout", type=float, default=20.0, help="server --idle-timeout")
    p.add_argument("--context-idle-timeout", type=float, default=10.0, help="server --context-idle-timeout")
    p.add_argument("--max-contexts", type=int, default=8, help="server --max-contexts")
    p.add_argument("--server-args", default="", help="more arguments for realtime serve")
    args = p.parse_args()
    serve = [
        "--engine",
        args.engine,
        "--log-level",
        "warning",
        "--send-timeout",
        str(args.send_timeout),
        "--close-timeout",
        str(args.close_timeout),
        "--idle-timeout",
        str(args.idle_timeout),
        "--context-idle-timeout",
        str(args.context_idle_timeout),
        "--max-contexts",
        str(args.max_contexts),
        "--max-sessions",
        str(args.sessions + 8 * args.faulty + args.fuzzers + 20),
        *(["--model-dir", args.model_dir] if args.model_dir else []),
        *args.server_args.split(),
    ]
    if args.engine == "cosyvoice2" and not args.model_dir:
        p.error("--engine cosyvoice2 needs --model-dir (python -m cosyvoice.tiny DIR writes a TINY one)")
    with server_process(*serve) as (base, pid):
        tally = asyncio.run(run(args, base, pid))
    report(args, tally)


if __name__ == "__main__":
    main()
