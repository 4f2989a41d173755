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


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of the finite values; NaN when there are none."""
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


@contextlib.contextmanager
def server_process(*serve_args: str) -> Iterator[tuple[str, int]]:
    """``realtime serve`` in a subprocess on a free loopback port: yields (``http://…`` base, pid).

    A separate process, as in production: a server in a thread of the benchmark would share the
    client's GIL and its event loop's time with the client.
    """
    with http_process(lambda port: ["-m", "realtime.cli", "serve", "--port", str(port), *serve_args]) as served:
        yield served


@contextlib.contextmanager
def http_process(python_args: Callable[[int], list[str]]) -> Iterator[tuple[str, int]]:
    """``python *python_args(port)`` in a subprocess, once ``/health`` answers 200 on that port:
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
                if httpx.get(base + "/health").status_code == 200:
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
