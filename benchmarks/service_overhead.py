"""What the service itself costs, with a trivial engine (tones) so no model hides it.

Starts ``realtime serve --engine tone`` in a subprocess (so its memory is measured alone), then:

* frame send delay (after one unmeasured warm-up run): N concurrent sessions, started all in the
  same instant and again spread over ``--ramp`` seconds, each speaking ``--seconds`` of audio
  with ``pacing: realtime`` (20 ms PCM frames sent at playback rate); a frame's delay is how late
  it arrives against the schedule set by the session's first frame.  p50/p99/max over every frame.
* the same delay as the server sees it: its ``realtime_paced_send_lateness_seconds`` histogram
  (how late each frame left against its schedule), read from ``/metrics`` before and after; the
  table gives the bucket that holds the p99 and the share of frames that left more than 20 ms late.
  The client-side figure also counts the client's own time on the same cores.
* memory per idle session: server RSS after opening N idle sessions (start sent, nothing else),
  minus RSS before, divided by N; N is the largest ``--sessions``, measured first, on the fresh server.

    python benchmarks/service_overhead.py                  # 50 and 200 sessions
    python benchmarks/service_overhead.py --sessions 50 --seconds 3
    python benchmarks/service_overhead.py --ramp 0         # only the all-at-once start
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
from common import percentile as pct
from common import server_process

LEAD_S = 0.3  # the server's realtime lead (ServerConfig.realtime_lead_ms)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def paced_session(
    url: str, words: int, delays: list[float], errors: list[str], start_after: float = 0.0
) -> None:
    from websockets.asyncio.client import connect

    await asyncio.sleep(start_after)
    async with connect(url, max_size=None, open_timeout=60) as ws:
        await ws.send(json.dumps({"type": "start", "pacing": "realtime"}))
        await ws.recv()
        await ws.send(json.dumps({"type": "text", "text": "word " * words}))
        await ws.send(json.dumps({"type": "end"}))
        t_first = None
        audio_s = 0.0
        async for msg in ws:
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if t_first is None:
                    t_first = now
                due = t_first + max(0.0, audio_s - LEAD_S)
                delays.append(max(0.0, now - due))
                audio_s += len(msg) / 2 / 24000
                continue
            m = json.loads(msg)
            if m["type"] == "error":
                errors.append(m["code"])
            if m["type"] in ("done", "error"):
                break


def lateness_buckets(base: str) -> list[tuple[float, int]]:
    """The server's cumulative paced-send lateness buckets, as (upper bound, count)."""
    out = []
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("realtime_paced_send_lateness_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out.append((float(le), int(line.rsplit(" ", 1)[1])))
    return out


def server_lateness(before: list[tuple[float, int]], after: list[tuple[float, int]]) -> tuple[str, float]:
    """(bucket holding the p99, share of frames later than 20 ms) over the frames between two reads."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0
    if not total:  # a server without the histogram (an older build)
        return "-", float("nan")
    p99 = next(le for le, c in counts if c >= 0.99 * total)
    within_20 = next(c for le, c in counts if le >= 0.02)
    return f"<= {p99 * 1000:g}", 100.0 * (total - within_20) / total


async def idle_sessions(url: str, n: int, pid: int) -> float:
    from websockets.asyncio.client import connect

    before = rss_kib(pid)
    sockets = []
    for _ in range(n):
        ws = await connect(url, open_timeout=60)
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()
        sockets.append(ws)
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    for ws in sockets:
        await ws.close()
    return (after - before) / n


async def main_async(args, url: str, pid: int) -> None:
    # idle memory first, on the fresh server: after a paced run, freed memory would be reused
    n_idle = max(args.sessions)
    idle = await idle_sessions(url, n_idle, pid)
    print(f"memory per idle session: {idle:.1f} KiB (server RSS delta over {n_idle} open sessions)")
    # warm-up, not measured: the first burst after start-up also pays one-off costs (new memory
    # arenas, code paths run for the first time) that a running service has paid long ago
    await asyncio.gather(*(paced_session(url, 5, [], []) for _ in range(n_idle)))
    print(
        f"tone engine, PCM s16 24 kHz, {args.frame_ms} ms frames, pacing realtime, {args.seconds:g} s of audio per session"
    )
    print(
        "| sessions | start over s | frames  | client delay p50 ms | p99 ms | max ms | server send p99 ms | server > 20 ms | errors |"
    )
    print(
        "|----------|--------------|---------|---------------------|--------|--------|--------------------|----------------|--------|"
    )
    words = int(args.seconds / 0.2)
    base = url.replace("ws://", "http://").rsplit("/v1/", 1)[0]
    for n in args.sessions:
        for ramp in args.ramp:
            delays: list[float] = []
            errors: list[str] = []
            before = lateness_buckets(base)
            await asyncio.gather(*(paced_session(url, words, delays, errors, k * ramp / n) for k in range(n)))
            p99_bucket, late_share = server_lateness(before, lateness_buckets(base))
            print(
                f"| {n:>8} | {ramp:>12g} | {len(delays):>7} | {pct(delays, 50) * 1000:>19.1f} | "
                f"{pct(delays, 99) * 1000:>6.1f} | {max(delays) * 1000 if delays else float('nan'):>6.1f} | "
                f"{p99_bucket:>18} | {late_share:>13.2f}% | {len(errors):>6} |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, nargs="+", default=[50, 200])
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--frame-ms", type=int, default=20, help="server --frame-ms")
    p.add_argument(
        "--ramp",
        type=float,
        nargs="+",
        default=[0.0, 1.0],
        help="start the sessions evenly over this many seconds; 0 = all in the same instant (the worst case)",
    )
    args = p.parse_args()
    n = max(args.sessions)
    with server_process(
        "--engine",
        "tone",
        "--max-streams",
        str(n),
        "--max-sessions",
        str(2 * n + 10),
        "--frame-ms",
        str(args.frame_ms),
        "--log-level",
        "warning",
    ) as (base, pid):
        asyncio.run(main_async(args, base.replace("http://", "ws://") + "/v1/tts/stream", pid))


if __name__ == "__main__":
    main()
