"""Run the real app under uvicorn on a loopback port, in a background thread, for integration tests
and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from realtime.engines.base import Engine
from realtime.server import ServerConfig, create_app, uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(engine: Engine, config: ServerConfig | None = None) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` while a real uvicorn serves ``create_app(engine, config)``."""
    with serve_server(engine, config) as (base, _server):
        yield base


@contextlib.contextmanager
def serve_server(engine: Engine, config: ServerConfig | None = None) -> Iterator[tuple[str, uvicorn.Server]]:
    """:func:`serve`, also yielding the uvicorn server (its ``server_state.connections`` are the
    connections it still holds)."""
    config = config or ServerConfig()
    with serve_asgi(create_app(engine, config), config) as served:
        yield served


@contextlib.contextmanager
def serve_asgi(app, config: ServerConfig | None = None) -> Iterator[tuple[str, uvicorn.Server]]:
    """Any ASGI app (ours, or a program built on it such as examples/twilio_bridge.py) under a real
    uvicorn on a loopback port, with ``config``'s deadlines: (base URL, server)."""
    config = config or ServerConfig()
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(app, config, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(10)


def start_cli_server(*args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """``realtime serve --engine tone --port P *args`` in a subprocess, as a user runs it, once it
    answers ``/health/live`` (a 401 counts: the server is up and wants a token): (process, base).
    The caller stops it."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "realtime.cli",
            "serve",
            "--engine",
            "tone",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health/live").status_code in (200, 401):
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("realtime serve did not start: " + proc.stdout.read().decode(errors="replace"))
        time.sleep(0.1)


def ws_url(base: str, token: str | None = None) -> str:
    """The stream endpoint of a server from :func:`serve`."""
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    return url + (f"?token={token}" if token else "")


async def collect(ws, until: str = "done", timeout: float = 20.0, stop_on_error: bool = False):
    """Read frames until a JSON message of type ``until`` (or a fatal error, or any error with
    ``stop_on_error``); return (audio bytes, JSON messages)."""
    audio = bytearray()
    messages: list[dict] = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if isinstance(msg, bytes):
                audio += msg
                continue
            m = json.loads(msg)
            messages.append(m)
            if m["type"] == until or (m["type"] == "error" and (m.get("fatal") or stop_on_error)):
                break
    return bytes(audio), messages
