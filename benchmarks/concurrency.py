"""CosyVoice2 under concurrent sessions: the batched stages beside the per-request path.

For each mode (``--lm batched``: the LM stage and the token2wav stage; ``--lm per-request``: each
stream's LM and token2wav in its own thread, as before batching; each a ``realtime serve`` subprocess on
the same model directory) and each concurrency level, that many WebSocket sessions start at once
and stream an LLM-like answer (4-character deltas at ``--tps`` tokens/s), PCM out as fast as it is
made.  Per level it prints first audio p50/p95 (first delta sent -> first audio byte), audio
seconds produced per wall second, the median stream's RTF (first to last audio byte over its
length: below 1 it keeps up) and underruns (a player starting at the first byte runs dry), LM
calls per second and requests per call, token2wav chunks per flow round (from the server's
/metrics), the cores the server kept busy (its CPU seconds over wall seconds: at the machine's
core count it is saturated), then the ratios the batching issue sets targets for.

    python benchmarks/concurrency.py                              # TINY directory, 1/4/8/16 sessions
    python benchmarks/concurrency.py --size real --sessions 1 8   # REAL-size random weights (2.5 GB, slow on CPU)
    python benchmarks/concurrency.py --model-dir DIR --modes batched
    python benchmarks/concurrency.py --voice clone                # a registered zero-shot voice (a 4 s prompt)
    python benchmarks/concurrency.py --repeat 3                   # medians of 3 runs of every level
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import ROOT, Player, cpu_seconds, percentile, server_process

TEXTS = [
    "Sure! The quickest way there is the train, every twenty minutes.",
    "I checked your calendar: the meeting is at noon with the design team.",
    "Here is a short summary. Revenue grew last quarter, mostly from new customers.",
    "Of course. First preheat the oven, then slice the vegetables thinly.",
]
SHORT = ["Hello there, how are you today?", "The weather is mild, with a light breeze."]


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) ([-+\d.eE]+)$", text, re.M)}


@dataclass
class Utterance:
    first: float = float("nan")  # first delta sent -> first audio byte, s
    audio_s: float = 0.0
    rtf: float = float("nan")  # first -> last audio byte over the audio's length: < 1 keeps up
    underruns: int = 0  # a player starting at the first byte ran dry
    error: str | None = None


CLONE = "bench-clone"  # the zero-shot voice --voice clone registers


async def utterance(url: str, text: str, tps: float, voice: str = "sft") -> Utterance:
    from websockets.asyncio.client import connect

    start = {"type": "start", "format": "pcm_s16le", "sample_rate": 24000}
    if voice == "clone":
        start.update(voice=CLONE, mode="zero_shot")
    async with connect(url, max_size=None, open_timeout=60) as ws:
        await ws.send(json.dumps(start))
        json.loads(await ws.recv())
        t0 = time.perf_counter()

        async def feed() -> None:
            for i in range(0, len(text), 4):
                await ws.send(json.dumps({"type": "text", "text": text[i : i + 4]}))
                await asyncio.sleep(1 / tps)
            await ws.send(json.dumps({"type": "end"}))

        feeder = asyncio.create_task(feed())
        player, result, last = Player(48000), Utterance(), t0
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    last = time.perf_counter()
                    if player.start is None:
                        result.first = last - t0
                    player.receive(len(msg), last)
                    continue
                m = json.loads(msg)
                if m["type"] in ("done", "error"):
                    result.error = m.get("code")
                    break
            else:
                result.error = "closed"
        finally:
            feeder.cancel()
    result.audio_s, result.underruns = player.audio_s, player.underruns
    if player.start is not None and player.audio_s:
        result.rtf = (last - player.start) / player.audio_s
    return result


async def level(url: str, base: str, pid: int, n: int, args) -> dict:
    texts = SHORT if args.short else TEXTS
    before = metrics(base)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()

    # every level speaks every text (fewer sessions speak more utterances each): first audio
    # depends on the text (how soon the LM has enough of it), so levels that spoke different texts
    # would not compare
    utterances = max(args.utterances, -(-len(texts) // n))

    async def session(k: int) -> list:
        return [
            await utterance(url, texts[(k + i) % len(texts)], args.tps, args.voice) for i in range(utterances)
        ]

    results = [r for rs in await asyncio.gather(*(session(k) for k in range(n))) for r in rs]
    wall = time.perf_counter() - t0
    cores = (cpu_seconds(pid) - cpu0) / wall
    after = metrics(base)
    calls = after.get("cosyvoice_lm_calls_total", 0) - before.get("cosyvoice_lm_calls_total", 0)
    stepped = after.get("cosyvoice_lm_requests_stepped_total", 0) - before.get(
        "cosyvoice_lm_requests_stepped_total", 0
    )
    t2w_calls = after.get("cosyvoice_t2w_calls_total", 0) - before.get("cosyvoice_t2w_calls_total", 0)
    t2w_chunks = after.get("cosyvoice_t2w_chunks_total", 0) - before.get("cosyvoice_t2w_chunks_total", 0)
    ttfa = [r.first for r in results]
    return {
        "n": n,
        "utts": len(results),
        "p50": percentile(ttfa, 50),
        "p95": percentile(ttfa, 95),
        "throughput": sum(r.audio_s for r in results) / wall,
        "calls_s": calls / wall,
        "per_call": stepped / calls if calls else float("nan"),
        "tokens_s": stepped / wall,
        "chunks_per_call": t2w_chunks / t2w_calls if t2w_calls else float("nan"),
        "rtf": percentile([r.rtf for r in results], 50),
        "underruns": sum(r.underruns for r in results),
        "errors": sum(1 for r in results if r.error),
        "cores": cores,
    }


def median_row(runs: list[dict]) -> dict:
    """One row for repeated runs of a level: counts (utterances, underruns, errors) summed, every
    other column the median; the runs themselves kept under ``runs``."""
    row: dict = {"runs": runs}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key == "n":
            row[key] = values[0]
        else:
            row[key] = sum(values) if key in ("utts", "underruns", "errors") else statistics.median(values)
    return row


def register_clone(base: str) -> None:
    """Register the zero-shot voice --voice clone speaks with: a 4 s prompt (100 speech tokens,
    like a short real recording), so each stream's flow and LM start from a prompt."""
    from cosyvoice.tiny import prompt_wav

    r = httpx.post(
        base + "/v1/voices",
        data={"voice_id": CLONE, "prompt_text": "A short sentence spoken for the voice prompt."},
        files={"prompt_wav": ("prompt.wav", prompt_wav(seconds=4.0), "audio/wav")},
        timeout=120,
    )
    if r.status_code not in (201, 409):
        raise SystemExit(f"registering the clone voice failed: {r.status_code} {r.text}")


def model_dir(args) -> str:
    if args.model_dir:
        return args.model_dir
    d = Path(tempfile.mkdtemp(prefix=f"cv2-{args.size}-")) / "model"
    subprocess.run(
        [sys.executable, "-m", "cosyvoice.tiny", str(d), "--size", args.size], cwd=ROOT, check=True
    )
    return str(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="a CosyVoice2 directory (default: write one of --size)")
    p.add_argument("--size", default="tiny", choices=("tiny", "real"))
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument(
        "--modes", nargs="+", default=["batched", "per-request"], choices=("batched", "per-request")
    )
    p.add_argument(
        "--utterances",
        type=int,
        default=2,
        help="utterances per session, one after another (more where fewer sessions than texts)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every level this many times, levels interleaved; rows are medians (this box's "
        "throughput at 16 sessions varies by a quarter between identical runs)",
    )
    p.add_argument("--tps", type=float, default=30.0, help="LLM tokens per second (4 characters each)")
    p.add_argument("--short", action="store_true", help="shorter texts (for the REAL size on a CPU)")
    p.add_argument(
        "--voice",
        default="sft",
        choices=("sft", "clone"),
        help="sft: the directory's first speaker (an embedding, no prompt); clone: a registered "
        "zero-shot voice with a 4 s prompt",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--server-args", default="", help="more arguments for realtime serve")
    p.add_argument("--json", default=None, help="also write the rows to this file (the GPU suite reads it)")
    args = p.parse_args()
    directory = model_dir(args)
    print(
        f"model {directory}, voice {args.voice}, text at {args.tps:g} tokens/s, "
        f"{args.utterances} utterance(s) per session"
    )
    print(
        "| lm | sessions | utts | first audio p50 s | p95 s | audio s / wall s | RTF p50 | underruns | LM calls/s "
        "| requests per call | LM tokens/s | token2wav chunks per round | server cores busy | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table: dict[str, list[dict]] = {}
    for mode in args.modes:
        serve = [
            "--engine",
            "cosyvoice2",
            "--model-dir",
            directory,
            "--lm",
            mode,
            "--device",
            args.device,
            "--max-streams",
            str(max(args.sessions)),
            "--log-level",
            "warning",
            *args.server_args.split(),
        ]
        with server_process(*serve) as (base, pid):
            url = base.replace("http://", "ws://") + "/v1/tts/stream"
            plan = metrics(base)
            if plan.get("cosyvoice_t2w_streams_max", max(args.sessions)) < max(args.sessions):
                window = int(plan["cosyvoice_flow_window_chunks"])
                print(
                    f"({mode}: the server holds {int(plan['cosyvoice_t2w_streams_max'])} streams at once "
                    f"in its token2wav memory, flow window {'none' if window < 0 else window}: more "
                    "sessions queue; --server-args '--t2w-memory-mb N' changes it)"
                )
            if args.voice == "clone":
                register_clone(base)
            asyncio.run(
                level(url, base, pid, 1, argparse.Namespace(**{**vars(args), "utterances": 1}))
            )  # warm-up
            runs: dict[int, list[dict]] = {n: [] for n in args.sessions}
            for _ in range(args.repeat):  # levels interleaved: a slow spell of the machine hits all
                for n in args.sessions:
                    runs[n].append(asyncio.run(level(url, base, pid, n, args)))
            for n in args.sessions:
                r = median_row(runs[n])
                table.setdefault(mode, []).append(r)
                print(
                    f"| {mode} | {n} | {r['utts']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['throughput']:.2f} | "
                    f"{r['rtf']:.2f} | {r['underruns']} | {r['calls_s']:.1f} | {r['per_call']:.2f} | {r['tokens_s']:.1f} | {r['chunks_per_call']:.2f} | "
                    f"{r['cores']:.2f} | {r['errors']} |",
                    flush=True,
                )
    print()
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    for mode, rows in table.items():
        one, top = rows[0], rows[-1]
        print(
            f"{mode}: {top['n']} sessions vs {one['n']}: first audio p95 x{top['p95'] / one['p95']:.2f}, "
            f"audio throughput x{top['throughput'] / one['throughput']:.2f}, LM tokens/s "
            f"x{top['tokens_s'] / one['tokens_s']:.2f}"
        )
        if args.repeat > 1:
            spread = [
                (b["p95"] / a["p95"], b["throughput"] / a["throughput"])
                for a, b in zip(one["runs"], top["runs"], strict=True)
            ]
            print(
                f"{mode}: per repeat, first audio p95 "
                + " ".join(f"x{p:.2f}" for p, _ in spread)
                + "; audio throughput "
                + " ".join(f"x{t:.2f}" for _, t in spread)
            )


if __name__ == "__main__":
    main()
