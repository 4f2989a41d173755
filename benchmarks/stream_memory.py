"""What one long utterance costs the server in memory, for each flow window.

A stream's flow caches hold the keys and values of every attention layer of every Euler step for
the frames its flow attends to (about 190 MiB per second of audio at the real model's size), so
``--flow-window`` bounds them and ``--t2w-memory-mb`` admits as many streams as fit at that bound.
For each window this starts ``realtime serve`` (with a budget large enough for any window, so that
only the window differs), speaks one long text over the WebSocket as an LLM would stream it, and
prints the server's resident memory before and at its peak (``VmHWM``), the bound the server
reserves per stream (from /metrics), the audio length and the wall time.

    python benchmarks/stream_memory.py --size real                   # REAL-size random weights
    python benchmarks/stream_memory.py --model-dir DIR --windows none 8 2
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from common import server_process
from concurrency import metrics, model_dir, utterance

TEXT = (
    "The quick brown fox jumps over the lazy dog while the band plays a long and winding song about "
    "rivers, mountains, cities and the people who live in them, and everyone listens until the very "
    "end of the evening."
)


def rss_mib(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="a CosyVoice2 directory (default: write one of --size)")
    p.add_argument("--size", default="tiny", choices=("tiny", "real"))
    p.add_argument(
        "--windows", nargs="+", default=["none", "8", "2"], help="--flow-window values (none: unbounded)"
    )
    p.add_argument("--text", default=TEXT, help="what to speak (longer text, more audio)")
    p.add_argument("--tps", type=float, default=30.0, help="LLM tokens per second (4 characters each)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    directory = model_dir(args)
    print(f"model {directory}, one utterance of {len(args.text)} characters at {args.tps:g} tokens/s")
    print(
        "| flow window | bound per stream MiB | RSS before MiB | RSS peak MiB | growth MiB | audio s | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for window in args.windows:
        serve = ["--model-dir", directory, "--device", args.device, "--log-level", "warning"]
        serve += ["--flow-window", window, "--t2w-memory-mb", "1e9", "--max-streams", "1"]
        with server_process(*serve) as (base, pid):
            url = base.replace("http://", "ws://") + "/v1/tts/stream"
            bound = metrics(base)["cosyvoice_t2w_stream_bound_bytes"] / 2**20
            before = rss_mib(pid, "VmRSS")
            t0 = time.perf_counter()
            result = asyncio.run(utterance(url, args.text, args.tps))
            wall = time.perf_counter() - t0
            peak = rss_mib(pid, "VmHWM")
        if result.error:
            raise SystemExit(f"window {window}: the utterance failed with {result.error}")
        print(
            f"| {window} | {bound:.0f} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | "
            f"{result.audio_s:.1f} | {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
