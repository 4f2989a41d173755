"""The clients people already run, each against a real server as its users run it: does it work,
and how soon does the first audio arrive (request sent -> first audio byte, ms).

Two servers in their own processes: CosyVoice2 on a TINY random-weight directory with a token
(every mode of the official client, the OpenAI SDK in every format and SSE, the VoxCPM-style
route with a voice prompt) and the default voice without one (the modes it has; instruct and
voice prompts refused with a typed error, which the table counts as "refused", not "works").

    python benchmarks/clients.py
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from common import ROOT, server_process

from cosyvoice.tiny import SFT_SPEAKERS

TOKEN = "bench-token"
TEXT = "Sure! The quickest way there is the train, every twenty minutes."


def prompt_wav() -> bytes:
    import soundfile as sf

    t = np.arange(32000) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * (150 + 60 * t) * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def timed(stream: Callable[[], object], chunks: Callable[[object], object], ok: Callable[[object], bool]):
    """(works, first audio ms, bytes) for a response that ``stream`` opens."""
    t0 = time.perf_counter()
    response = stream()
    first, total = None, 0
    for chunk in chunks(response):
        if chunk and first is None:
            first = (time.perf_counter() - t0) * 1000
        total += len(chunk)
    works = ok(response) and total > 0
    return works, first if works else None, total


def official(base: str, mode: str, headers: dict, spk: str | None):
    """runtime/python/fastapi/client.py's requests, for ``mode``."""
    url, files = f"{base}/inference_{mode}", None
    payload: dict = {"tts_text": TEXT}
    if mode in ("sft", "instruct"):
        payload["spk_id"] = spk
    if mode == "instruct":
        payload["instruct_text"] = "Speak slowly and warmly."
    if mode == "zero_shot":
        payload["prompt_text"] = "A prompt sentence for the voice."
    if mode in ("zero_shot", "cross_lingual"):
        files = [("prompt_wav", ("prompt_wav", io.BytesIO(prompt_wav()), "application/octet-stream"))]
    return timed(
        lambda: requests.request(
            "GET", url, data=payload, files=files, stream=True, headers=headers, timeout=300
        ),
        lambda r: r.iter_content(chunk_size=16000),
        lambda r: r.status_code == 200,
    )


def openai_speech(base: str, token: str, fmt: str, sse: bool):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=token or "none")
    extra = {"stream_format": "sse"} if sse else {}
    t0 = time.perf_counter()
    first, total, status = None, 0, 0
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format=fmt, extra_body=extra
    ) as r:
        status = r.status_code
        buffer = ""
        for chunk in r.iter_bytes():
            if not sse:
                if chunk and first is None:
                    first = (time.perf_counter() - t0) * 1000
                total += len(chunk)
                continue
            buffer += chunk.decode()
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                data = json.loads(event.removeprefix("data: "))
                if data["type"] == "speech.audio.delta":
                    if first is None:
                        first = (time.perf_counter() - t0) * 1000
                    total += len(base64.b64decode(data["audio"]))
    return status == 200 and total > 0, first, total


def voxcpm(base: str, headers: dict, with_prompt: bool):
    data = {"text": TEXT, "inference_timesteps": 5}
    files = None
    if with_prompt:
        data["prompt_text"] = "A prompt sentence for the voice."
        files = {"prompt_audio": ("p.wav", prompt_wav(), "audio/wav")}
    return timed(
        lambda: requests.post(
            f"{base}/api/tts/stream", data=data, files=files, headers=headers, stream=True, timeout=300
        ),
        lambda r: r.iter_content(8192),
        lambda r: r.status_code == 200,
    )


def cases(base: str, token: str | None, spk: str | None):
    auth = {"X-API-TOKEN": token} if token else {}
    bearer = {"Authorization": f"Bearer {token}"} if token else {}
    for mode in ("sft", "zero_shot", "cross_lingual", "instruct"):
        label = f"official client {mode}" + (" + X-API-TOKEN" if token else "")
        yield label, lambda m=mode: official(base, m, auth, spk)
    for fmt in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        yield f"openai SDK {fmt}", lambda f=fmt: openai_speech(base, token or "", f, False)
    yield "openai SDK pcm, SSE", lambda: openai_speech(base, token or "", "pcm", True)
    yield "/api/tts/stream", lambda: voxcpm(base, bearer, False)
    yield "/api/tts/stream + prompt_audio", lambda: voxcpm(base, bearer, True)


def main() -> None:
    model = Path(tempfile.mkdtemp(prefix="cv2-clients-")) / "tiny"
    subprocess.run(
        [sys.executable, "-m", "cosyvoice.tiny", str(model)], cwd=ROOT, check=True, capture_output=True
    )
    servers = [
        ("cosyvoice2 TINY", ["--model-dir", str(model), "--token", TOKEN], TOKEN, SFT_SPEAKERS[1]),
        ("default voice", ["--engine", "piper"], None, None),
    ]
    print("| server | client | works | first audio ms | audio bytes |")
    print("|---|---|---|---|---|")
    for name, args, token, spk in servers:
        with server_process(*args, "--log-level", "warning") as (base, _pid):
            openai_speech(base, token or "", "pcm", False)  # warm-up: first-use costs are not latency
            for label, run in cases(base, token, spk):
                try:
                    works, first, total = run()
                    verdict = "works" if works else "refused"
                except Exception as e:  # a client's own error (e.g. openai.BadRequestError): refused
                    works, first, total, verdict = False, None, 0, f"refused ({type(e).__name__})"
                ms = f"{first:.0f}" if first is not None else "-"
                print(f"| {name} | {label} | {verdict} | {ms} | {total} |", flush=True)


if __name__ == "__main__":
    main()
