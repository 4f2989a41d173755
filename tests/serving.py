"""Run the real app under uvicorn on a loopback port, in a background thread, for integration tests
and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from realtime.engines.base import Engine
from realtime.server import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(engine: Engine, config: ServerConfig | None = None) -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT`` while a real uvicorn serves ``create_app(engine, config)``."""
    config = config or ServerConfig()
    app = create_app(engine, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio",
        ws_max_size=config.limits.max_frame_bytes * 2 + 65536, lifespan="on",
    ))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
