"""Time to first audio over the WebSocket, with text arriving like an LLM's answer.

For each utterance the client streams deltas of ~4 characters at ``--tps`` tokens/s and records:
first delta sent → first audio byte received (``ttfa``), the delta that completes the first clause
→ first audio (``after_clause``: what the engine can influence), and playback underruns (audio
arriving later than a player that started at the first byte would need it).  ``--compare-whole``
adds the path the official FastAPI server offers: wait for the whole text, then synthesise.

    python benchmarks/ws_latency.py                         # default voice, 20 utterances, sweep 1/2/4/8
    python benchmarks/ws_latency.py --engine cosyvoice2 --model-dir DIR --utterances 3 --sweep 1 --compare-whole
    python benchmarks/ws_latency.py --url ws://host:8000    # an already running server

Without ``--url`` it starts ``realtime serve`` in a subprocess (its own GIL, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import time
from dataclasses import dataclass, field

from common import ANSWERS, Player, server_process
from common import percentile as pct

CLAUSE = re.compile(r"[.!?;:,](\s|$)")


@dataclass
class Result:
    ttfa: float = float("nan")
    after_clause: float = float("nan")
    underruns: int = 0
    stall_ms: float = 0.0
    audio_s: float = 0.0
    wall_s: float = 0.0
    rtf: float | None = None
    errors: list[str] = field(default_factory=list)


def deltas(text: str, chars: int = 4) -> list[str]:
    return [text[i : i + chars] for i in range(0, len(text), chars)]


def clause_end(text: str) -> int:
    """Index just after the first clause: a punctuation mark after at least three words."""
    for m in CLAUSE.finditer(text):
        if len(text[: m.start()].split()) >= 3:
            return m.start() + 1
    return len(text)


async def one_utterance(
    url: str, text: str, tps: float, fmt: str, whole: bool, headers: dict, show_underruns: bool = False
) -> Result:
    from websockets.asyncio.client import connect

    from realtime.audio.formats import SAMPLE_BYTES

    res = Result()
    async with connect(url, max_size=None, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "start", "format": fmt}))
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            res.errors.append(str(ready))
            return res
        rate = ready["sample_rate"]
        bytes_per_second = rate * SAMPLE_BYTES[fmt]
        pieces = deltas(text)
        boundary = clause_end(text)
        t_clause: float | None = None
        t0 = time.perf_counter()

        async def feed() -> None:
            nonlocal t_clause
            sent = 0
            if whole:  # the LLM must finish before the whole-text path can start
                await asyncio.sleep(len(pieces) / tps)
                await ws.send(json.dumps({"type": "text", "text": text}))
                t_clause = time.perf_counter()
            else:
                for i, p in enumerate(pieces):
                    await ws.send(json.dumps({"type": "text", "text": p}))
                    sent += len(p)
                    if t_clause is None and sent >= boundary:
                        t_clause = time.perf_counter()
                    if i + 1 < len(pieces):
                        await asyncio.sleep(1 / tps)
            await ws.send(json.dumps({"type": "end"}))

        feeder = asyncio.create_task(feed())
        player = Player(bytes_per_second)
        async for msg in ws:
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if player.start is None:
                    res.ttfa = (now - t0) * 1000
                    res.after_clause = (now - (t_clause or now)) * 1000
                at = player.audio_s
                dry = player.receive(len(msg), now)
                if dry and show_underruns:
                    print(
                        f"  underrun: {dry * 1000:.0f} ms at {at:.2f} s of audio, {now - t0:.2f} s after the "
                        f"first delta: {text[:40]!r}"
                    )
                continue
            m = json.loads(msg)
            if m["type"] == "error":
                res.errors.append(f"{m['code']}: {m['message']}")
                if m.get("fatal") or m.get("context_id"):  # the utterance is over (e.g. overloaded)
                    break
            elif m["type"] == "done":
                res.rtf = m["stats"].get("rtf")
                break
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        res.wall_s = time.perf_counter() - t0
        res.audio_s = player.audio_s
        res.underruns, res.stall_ms = player.underruns, player.stall_s * 1000
    return res


async def run_level(
    url: str, sessions: int, utterances: int, args, whole: bool, headers: dict
) -> list[Result]:
    results: list[Result] = []

    async def worker(k: int) -> None:
        for i in range(utterances):
            text = ANSWERS[(k * 3 + i) % len(ANSWERS)]
            results.append(
                await one_utterance(url, text, args.tps, args.format, whole, headers, args.show_underruns)
            )

    await asyncio.gather(*(worker(k) for k in range(sessions)))
    return results


def row(label: str, sessions: int, res: list[Result]) -> str:
    ttfa = [r.ttfa for r in res]
    clause = [r.after_clause for r in res]
    rtfs = [r.rtf for r in res if r.rtf is not None]
    errors = sum(len(r.errors) for r in res)
    overloaded = sum(1 for r in res for e in r.errors if e.startswith("overloaded"))
    return (
        f"| {label:<11} | {sessions:>8} | {len(res):>5} | {pct(ttfa, 50):>9.0f} | {pct(ttfa, 95):>9.0f} | "
        f"{pct(clause, 50):>10.0f} | {pct(clause, 95):>10.0f} | {sum(r.underruns for r in res):>9} | "
        f"{sum(r.stall_ms for r in res):>8.0f} | {statistics.mean(rtfs) if rtfs else float('nan'):>5.2f} | "
        f"{errors:>6} | {overloaded:>10} |"
    )


@contextlib.contextmanager
def local_server(args):
    serve_args = ["--engine", args.engine, "--log-level", "warning"]
    if args.max_streams:
        serve_args += ["--max-streams", str(args.max_streams)]
    if args.model_dir:
        serve_args += ["--model-dir", args.model_dir, "--device", args.device]
    with server_process(*serve_args) as (base, _pid):
        yield base.replace("http://", "ws://") + "/v1/tts/stream"


async def main_async(args, url: str) -> None:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    print(
        f"engine={args.engine} format={args.format} text at {args.tps:g} tokens/s (4 chars/token), "
        f"{args.utterances} utterances per session"
    )
    print(
        "| path        | sessions | utts  | ttfa p50  | ttfa p95  | clause p50 | clause p95 | underruns | stall ms | rtf   | errors | overloaded |"
    )
    print(
        "|-------------|----------|-------|-----------|-----------|------------|------------|-----------|----------|-------|--------|------------|"
    )
    await run_level(url, 1, 1, args, False, headers)  # warm-up (first-use costs are not latency)
    for n in args.sweep:
        per = max(1, args.utterances // n) if n > 1 else args.utterances
        res = await run_level(url, n, per, args, False, headers)
        print(row("streaming", n, res), flush=True)
        if args.compare_whole:
            res = await run_level(url, n, per, args, True, headers)
            print(row("whole-text", n, res), flush=True)
    print(
        "ttfa: first text delta sent → first audio byte; clause: delta completing the first clause → first audio "
        "(whole-text: full text sent → first audio); underruns/stall: a player starting at the first byte runs dry"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--url", default=None, help="WebSocket URL of a running server (default: start one in-process)"
    )
    p.add_argument("--token", default=None)
    p.add_argument("--engine", default="piper", choices=("piper", "cosyvoice2", "tone"))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--max-streams",
        type=int,
        default=None,
        help="server --max-streams (default: the engine's own capacity; sessions beyond it are refused "
        "with 'overloaded' and counted under errors)",
    )
    p.add_argument("--format", default="pcm_s16le", choices=("pcm_s16le", "pcm_f32le", "mulaw", "alaw"))
    p.add_argument("--tps", type=float, default=30.0, help="LLM tokens per second")
    p.add_argument("--utterances", type=int, default=20)
    p.add_argument("--sweep", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent sessions")
    p.add_argument("--compare-whole", action="store_true", help="also measure the wait-for-whole-text path")
    p.add_argument("--show-underruns", action="store_true", help="print every underrun as it happens")
    args = p.parse_args()
    if args.url:
        url = args.url if args.url.endswith("/v1/tts/stream") else args.url.rstrip("/") + "/v1/tts/stream"
        asyncio.run(main_async(args, url))
    else:
        with local_server(args) as url:
            asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
