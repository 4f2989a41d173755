"""A fleet on one machine: three ``realtime serve`` replicas (CosyVoice2 on one shared TINY model
directory) behind Debian's nginx, configured like the Ingress in deploy/kubernetes (least
connections, WebSocket upgrade, hour-long proxy timeouts, no buffering, a 503 retried on another
replica).  Thirty sessions spread over the replicas; SIGTERM one mid-stream (its open contexts
finish with ``done``, new sessions land on the others, none is lost); SIGKILL one (only its
sessions end, each with a clean close on the client side; the others are untouched); a voice
registered through one replica is spoken by another."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cosyvoice.tiny import write_model_dir
from tests.serving import free_port
from tests.test_cosyvoice_engine import prompt_wav

pytestmark = [pytest.mark.fleet, pytest.mark.slow]
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
TEXT = "Hello there, this is one of thirty sessions spread over the fleet."

NGINX_CONF = """
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream replicas {{
        least_conn;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
            client_max_body_size 8m;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


class Replica:
    def __init__(self, model_dir: Path, index: int) -> None:
        self.port = free_port()
        self.index = index
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "realtime.cli",
                "serve",
                "--model-dir",
                str(model_dir),
                "--port",
                str(self.port),
                "--drain-timeout",
                "30",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.base + "/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, (
                f"replica {self.index} did not start"
            )
            time.sleep(0.2)

    def sessions_total(self) -> float:
        text = httpx.get(self.base + "/metrics").text
        return float(re.search(r"^realtime_sessions_total (\S+)$", text, re.M)[1])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (tests/ensure_nginx.sh installs it where it can)")
    root = tmp_path_factory.mktemp("fleet")
    model_dir = write_model_dir(root / "model")
    replicas = [Replica(model_dir, k) for k in range(3)]
    prefix = root / "nginx"
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True)
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=0;" for r in replicas)
    (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=port, servers=servers))
    for r in replicas:
        r.wait_ready()
    proxy = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base + "/health/live")
            break
        except httpx.HTTPError:
            assert proxy.poll() is None and time.monotonic() < deadline, proxy.stderr.read().decode()
            time.sleep(0.1)
    yield base, replicas
    proxy.terminate()
    for r in replicas:
        r.proc.kill()
    proxy.wait(10)


async def session(
    url: str,
    text: str = TEXT,
    pace: float = 0.03,
    started: asyncio.Event | None = None,
    hold: asyncio.Event | None = None,
) -> dict:
    """One session: stream ``text`` in 4-character deltas; returns what happened."""
    out: dict = {"audio": 0, "done": False, "errors": [], "close": None}
    try:
        async with connect(url, max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "start", "format": "pcm_s16le"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(0, len(text), 4):
                await ws.send(json.dumps({"type": "text", "text": text[i : i + 4]}))
                await asyncio.sleep(pace)
            if started is not None:
                started.set()
            if hold is not None:
                await hold.wait()
            await ws.send(json.dumps({"type": "end"}))
            async for msg in ws:
                if isinstance(msg, bytes):
                    out["audio"] += len(msg)
                    continue
                m = json.loads(msg)
                if m["type"] == "done":
                    out["done"] = True
                    break
                if m["type"] == "error":
                    out["errors"].append(m["code"])
                    break
    except ConnectionClosed as e:
        out["close"] = e.rcvd.code if e.rcvd is not None else 1006
    return out


async def test_thirty_sessions_spread_over_the_replicas(fleet):
    base, replicas = fleet
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    before = [r.sessions_total() for r in replicas]
    results = await asyncio.gather(*(session(url) for _ in range(30)))
    assert all(r["done"] and r["audio"] > 0 for r in results), results
    served = [r.sessions_total() - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 30 and all(n >= 3 for n in served), served  # least connections spreads them


async def test_a_voice_registered_through_one_replica_is_spoken_by_another(fleet):
    base, replicas = fleet
    r = httpx.post(
        replicas[0].base + "/v1/voices",
        data={"voice_id": "fleet-voice", "prompt_text": "A prompt."},
        files={"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    async with connect(replicas[1].base.replace("http://", "ws://") + "/v1/tts/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "voice": "fleet-voice", "seed": 1}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "text", "text": "Spoken by another replica."}))
        await ws.send(json.dumps({"type": "end"}))
        audio = 0
        async for msg in ws:
            if isinstance(msg, bytes):
                audio += len(msg)
            elif json.loads(msg)["type"] in ("done", "error"):
                assert json.loads(msg)["type"] == "done", msg
                break
    assert audio > 0


async def test_sigterm_one_replica_mid_stream_then_sigkill_another(fleet):
    base, replicas = fleet
    url = base.replace("http://", "ws://") + "/v1/tts/stream"
    hold = asyncio.Event()
    # nine sessions mid-utterance, three per replica (least connections)
    opened = [asyncio.Event() for _ in range(9)]
    tasks = [asyncio.create_task(session(url, started=e, hold=hold)) for e in opened]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 60)
    async with httpx.AsyncClient() as http:
        counts = [(await http.get(r.base + "/health")).json()["sessions"] for r in replicas]
    assert all(n >= 1 for n in counts), counts
    draining = replicas[2]
    draining.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    # new sessions while it drains all land on the other two (a 503 is retried on another replica)
    newcomers = await asyncio.gather(*(session(url) for _ in range(6)))
    assert all(r["done"] for r in newcomers), newcomers
    hold.set()  # the open contexts end: the draining replica's finish too, with done
    results = await asyncio.gather(*tasks)
    assert all(r["done"] and r["audio"] > 0 for r in results), results
    assert await asyncio.to_thread(draining.proc.wait, 40) == 0

    # SIGKILL another mid-stream: only its sessions end, with a close the client sees; the rest finish
    hold2 = asyncio.Event()
    opened = [asyncio.Event() for _ in range(6)]
    tasks = [asyncio.create_task(session(url, started=e, hold=hold2)) for e in opened]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 60)
    victim, survivor = replicas[1], replicas[0]
    on_victim = (await asyncio.to_thread(httpx.get, victim.base + "/health")).json()["sessions"]
    victim.proc.kill()
    await asyncio.sleep(0.3)
    hold2.set()
    results = await asyncio.gather(*tasks)
    cut = [r for r in results if not r["done"]]
    assert len(cut) == on_victim >= 1, results
    assert all(r["close"] is not None or r["errors"] for r in cut), cut
    assert sum(r["done"] for r in results) == 6 - on_victim
    assert (await asyncio.to_thread(httpx.get, survivor.base + "/health/ready")).status_code == 200
