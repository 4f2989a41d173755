"""Server CPU per WebSocket session start: our service against a bare Starlette endpoint.

Opens ``--sessions`` sessions one after another (connect, ``start``, wait for ``ready``), keeps them
open, closes them, and reads the server process's CPU time from /proc around the opening.  The
bare endpoint (accept, answer every message with a fixed ``ready``) runs on the same uvicorn
settings, so the difference is what our session start costs on top of the HTTP/WebSocket stack.
This is what bounds a burst of sessions that all connect in the same instant.

    python benchmarks/handshake_cost.py
    python benchmarks/handshake_cost.py --sessions 500 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from common import cpu_seconds, http_process, server_process


async def open_sessions(url: str, n: int, pid: int) -> tuple[float, float]:
    """(wall ms, server CPU ms) per session start."""
    from websockets.asyncio.client import connect

    sockets = []
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for _ in range(n):
        ws = await connect(url, open_timeout=60)
        await ws.send(json.dumps({"type": "start"}))
        await ws.recv()
        sockets.append(ws)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    for ws in sockets:
        await ws.close()
    return wall * 1000 / n, cpu * 1000 / n


def serve_bare(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute

    from realtime.transport import uvicorn_options

    async def stream(ws) -> None:
        await ws.accept()
        while (await ws.receive())["type"] != "websocket.disconnect":
            await ws.send_text('{"type": "ready"}')

    async def health(_request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[WebSocketRoute("/v1/tts/stream", stream), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_options(1 << 20))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    print(f"{args.sessions} sessions opened one after another, {args.rounds} rounds; per session start:")
    print("| server                       | round | wall ms | server CPU ms |")
    print("|------------------------------|-------|---------|---------------|")
    servers = {
        "bare Starlette endpoint": lambda: http_process(lambda port: [__file__, "--serve-bare", str(port)]),
        "realtime serve --engine tone": lambda: server_process(
            "--engine", "tone", "--log-level", "warning", "--max-sessions", str(args.sessions + 10)
        ),
    }
    for label, start in servers.items():
        with start() as (base, pid):
            url = base.replace("http://", "ws://") + "/v1/tts/stream"
            for r in range(args.rounds):
                wall, cpu = asyncio.run(open_sessions(url, args.sessions, pid))
                print(f"| {label:<28} | {r + 1:>5} | {wall:>7.2f} | {cpu:>13.2f} |", flush=True)


if __name__ == "__main__":
    main()
