"""Shared by the benchmark scripts: percentiles, a server in its own process, and the repository on
sys.path so that a script run as ``python benchmarks/x.py`` can import the project and its test
helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def count_syncs(device, fn: Callable):
    """``fn()`` and how many times its ops (in any thread) waited for the device, by torch's sync
    debug mode; None without CUDA.  A flow round and an overlapped LM step need none: what they
    hand on is read on the device (the wait for each step's tokens is an event, not counted)."""
    if device.type != "cuda":
        return fn(), None
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


# LLM-style answers the latency and soak benchmarks stream, 4 characters per token
ANSWERS = [
    "Sure! The quickest way to get there is by train, which leaves every twenty minutes from the central station.",
    "I checked your calendar: you have a meeting at 3:45 pm with the design team, and lunch is free.",
    "Here is a short summary. The report shows revenue grew by 12% last quarter, mostly from new customers.",
    "Of course, I can help with that. First, preheat the oven to 200 degrees, then slice the vegetables thinly.",
    "The weather in Paris tomorrow looks mild, around 21 degrees, with a light breeze in the afternoon.",
    "Good question. Black holes form when massive stars collapse, and nothing, not even light, escapes them.",
    "Your order has shipped and should arrive on Thursday; the tracking number is in your email.",
    "To reset the router, hold the small button on the back for ten seconds, then wait for the lights.",
]


class Player:
    """A listener that starts playing at the first audio byte: counts the times it runs dry
    (audio arriving later than playback needs it; it then stalls until that audio arrives)."""

    def __init__(self, bytes_per_second: float, tolerance: float = 0.005) -> None:
        self.bytes_per_second = bytes_per_second
        self.tolerance = tolerance
        self.start: float | None = None
        self.received = 0  # bytes
        self.underruns = 0
        self.stall_s = 0.0

    def receive(self, n_bytes: int, now: float) -> float:
        """Audio arrived at ``now``; returns how long the player had been dry (0 if not)."""
        if self.start is None:
            self.start = now
        needed_at = self.start + self.received / self.bytes_per_second + self.stall_s
        dry = now - needed_at if now > needed_at + self.tolerance else 0.0
        if dry:
            self.underruns += 1
            self.stall_s += dry
        self.received += n_bytes
        return dry

    @property
    def audio_s(self) -> float:
        return self.received / self.bytes_per_second


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of the finite values; NaN when there are none."""
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far; NaN where ``/proc`` is
    missing.  Over a wall interval it says how many cores the process kept busy."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(*serve_args: str) -> Iterator[tuple[str, int]]:
    """``realtime serve`` in a subprocess on a free loopback port: yields (``http://…`` base, pid).

    A separate process, as in production: a server in a thread of the benchmark would share the
    client's GIL and its event loop's time with the client.
    """
    with http_process(
        lambda port: ["-m", "realtime.cli", "serve", "--port", str(port), *serve_args]
    ) as served:
        yield served


@contextlib.contextmanager
def http_process(python_args: Callable[[int], list[str]]) -> Iterator[tuple[str, int]]:
    """``python *python_args(port)`` in a subprocess, once ``/health`` answers on that port:
    yields (``http://…`` base, pid)."""
    import httpx

    from tests.serving import free_port

    port = free_port()
    cmd = [sys.executable, *python_args(port)]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}")
            try:
                if httpx.get(base + "/health").status_code in (200, 401):  # 401: up, with a token
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        yield base, server.pid
    finally:
        server.terminate()
        server.wait(10)
