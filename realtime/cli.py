"""``realtime serve`` runs the service; ``realtime say`` is a streaming client for it that sends its
text the way an LLM would (deltas at a given tokens/s) and reports time to first audio."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
import time

from . import __version__
from .audio.formats import SAMPLE_BYTES

log = logging.getLogger("realtime")


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(kind: type, minimum: float, what: str):
    """An argparse type: ``kind`` no smaller than ``minimum``, with a readable error otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, 1, "at least 1")
_non_negative_int = _number(int, 0, "0 or more")
_positive_float = _number(float, 1e-9, "greater than 0")
_non_negative_float = _number(float, 0.0, "0 or more")
# a feature that is on where it pays (auto: the engine decides), or forced either way
_SWITCH = {"auto": None, "on": True, "off": False}


def _or_words(parse, *words: str):
    """An argparse type: one of ``words`` (None for "none"), or what ``parse`` accepts."""

    def parse_or_word(text: str):
        if text in words:
            return None if text == "none" else text
        return parse(text)

    return parse_or_word


def cmd_serve(args: argparse.Namespace) -> int:
    from .engines import create_engine
    from .protocol import Limits
    from .server import DrainingServer, ServerConfig, create_app, uvicorn_config
    from .service import capacity

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = args.token or os.environ.get("REALTIME_TOKEN") or None
    if not token and not _is_loopback(args.host):
        log.warning(
            "serving on %s WITHOUT an API token: anyone who can reach this address can use it "
            "(set --token or REALTIME_TOKEN)",
            args.host,
        )
    engine_name = args.engine or ("cosyvoice2" if args.model_dir else "piper")
    engine_kwargs: dict[str, object] = {}
    if engine_name == "cosyvoice2":
        engine_kwargs.update(
            device=args.device,
            dtype=args.dtype,
            lm=args.lm,
            prompt_cache_mb=args.prompt_cache_mb,
            left_chunks=args.flow_window,
            t2w_budget_mb=args.t2w_memory_mb,
            kv_budget_mb=args.kv_memory_mb,
            kv_max_slots=args.kv_slots,
            cuda_graphs=_SWITCH[args.cuda_graphs],
            flow_slots=_SWITCH[args.flow_slots],
            flow_dtype=args.flow_dtype,
            lm_overlap=_SWITCH[args.lm_overlap],
        )
    try:
        engine = create_engine(engine_name, args.model_dir, **engine_kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"realtime serve: {e}", file=sys.stderr)
        return 2
    aliases = {}
    for alias in args.voice_alias or []:
        name, _, voice = alias.partition("=")
        if not name or voice not in {v.id for v in engine.voices()}:
            print(
                f"realtime serve: --voice-alias {alias!r}: expected NAME=VOICE with one of the engine's voices "
                f"({', '.join(v.id for v in engine.voices())})",
                file=sys.stderr,
            )
            return 2
        aliases[name] = voice
    limits = Limits(
        max_frame_bytes=args.max_frame_bytes,
        max_context_chars=args.max_text_chars,
        max_open_contexts=args.max_contexts,
    )
    config = ServerConfig(
        token=token,
        limits=limits,
        max_sessions=args.max_sessions,
        max_streams=args.max_streams,
        max_streams_per_session=args.max_streams_per_session,
        send_timeout=args.send_timeout,
        idle_timeout=args.idle_timeout,
        context_idle_timeout=args.context_idle_timeout,
        queue_timeout=args.queue_timeout,
        buffer_seconds=args.buffer_ms / 1000,
        frame_ms=args.frame_ms,
        realtime_lead_ms=args.realtime_lead_ms,
        realtime_batch_ms=args.realtime_batch_ms,
        header_timeout=args.header_timeout,
        close_timeout=args.close_timeout,
        voice_aliases=aliases,
    )
    app = create_app(engine, config)
    streams = capacity(engine, args.max_streams)
    if args.max_streams and streams < args.max_streams:
        log.warning(
            "--max-streams %d: the engine holds at most %d streams (its KV slots and memory budget), so %d are admitted",
            args.max_streams,
            streams,
            streams,
        )
    log.info(
        "engine %s (%d Hz), %d streams at once, voices: %s",
        engine.name,
        engine.sample_rate,
        streams,
        ", ".join(v.id for v in engine.voices()),
    )
    server = DrainingServer(
        uvicorn_config(app, config, host=args.host, port=args.port, log_level=args.log_level),
        app.state.service,
        args.drain_timeout,
    )
    server.run()
    return 0


def _deltas(text: str, chars_per_token: int = 4) -> list[str]:
    """Split text like an LLM streams it: short pieces that do not respect word boundaries."""
    return [text[i : i + chars_per_token] for i in range(0, len(text), chars_per_token)]


async def _say(args: argparse.Namespace, text: str) -> int:
    import websockets

    url = args.url.rstrip("/")
    if not url.endswith("/v1/tts/stream"):
        url += "/v1/tts/stream"
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    fmt = args.format
    container = args.container
    out_path = args.output
    if container is None:
        container = "raw"
        if out_path and out_path.endswith(".wav") and fmt != "opus":
            container = "wav"
        elif out_path and (out_path.endswith(".ogg") or out_path.endswith(".opus")) and fmt == "opus":
            container = "ogg"
    start: dict[str, object] = {"type": "start", "format": fmt, "container": container}
    if args.voice:
        start["voice"] = args.voice
    if args.sample_rate:
        start["sample_rate"] = args.sample_rate
    if args.speed != 1.0:
        start["speed"] = args.speed
    audio = bytearray()
    t_first_text = t_first_audio = None
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps(start))
        ready = json.loads(await ws.recv())
        if ready.get("type") == "error":
            print(f"realtime say: {ready['code']}: {ready['message']}", file=sys.stderr)
            return 1
        rate = ready["sample_rate"]

        async def feed() -> None:
            nonlocal t_first_text
            delay = 1.0 / args.tokens_per_second if args.tokens_per_second > 0 else 0
            for piece in _deltas(text):
                if t_first_text is None:
                    t_first_text = time.perf_counter()
                await ws.send(json.dumps({"type": "text", "text": piece}))
                if delay:
                    await asyncio.sleep(delay)
            await ws.send(json.dumps({"type": "end"}))

        feeder = asyncio.create_task(feed())
        stats: dict = {}
        async for msg in ws:
            if isinstance(msg, bytes):
                if t_first_audio is None:
                    t_first_audio = time.perf_counter()
                audio += msg
                continue
            m = json.loads(msg)
            if m["type"] == "error":  # fatal or not, the utterance is over
                print(f"realtime say: {m['code']}: {m['message']}", file=sys.stderr)
                feeder.cancel()
                return 1
            elif m["type"] == "done":
                stats = m.get("stats", {})
                break
        await feeder
    t_end = time.perf_counter()
    bytes_per_sample = SAMPLE_BYTES.get(fmt)
    duration = stats.get("audio_ms", 0) / 1000
    if bytes_per_sample and container == "raw":
        duration = len(audio) / bytes_per_sample / rate
    if out_path == "-":
        sys.stdout.buffer.write(audio)
    elif out_path:
        with open(out_path, "wb") as f:
            f.write(audio)
    ttfa = (t_first_audio - t_first_text) * 1000 if t_first_audio and t_first_text else float("nan")
    wall = t_end - (t_first_text or t_end)
    report = (
        f"time to first audio: {ttfa:.0f} ms | audio: {duration:.2f} s at {rate} Hz ({fmt}/{container}) | "
        f"wall: {wall:.2f} s | real-time factor: {stats.get('rtf', float('nan'))} (server) "
        f"{(wall / duration) if duration else float('nan'):.3f} (client)"
    )
    print(report, file=sys.stderr)
    return 0


def cmd_say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        print("realtime say: no text", file=sys.stderr)
        return 2
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        return asyncio.run(_say(args, text))
    except InvalidStatus as e:  # refused before the upgrade: 401/403 without a good token, 503 ...
        status = e.response.status_code
        hint = {401: " (this server wants a token: --token or REALTIME_TOKEN)", 403: " (wrong token)"}.get(
            status, ""
        )
        print(f"realtime say: the server refused the connection: HTTP {status}{hint}", file=sys.stderr)
        return 1
    except ConnectionClosed as e:
        close = e.rcvd
        why = f"{close.code} {close.reason}".strip() if close is not None else "without a close frame"
        print(f"realtime say: the server closed the connection: {why}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"realtime say: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="realtime",
        description="Real-time streaming TTS service (CosyVoice2 bistream, embedded default voice).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _say_parser(sub)
    return p


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="run the service",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve WebSocket /v1/tts/stream, POST /v1/tts, the official CosyVoice HTTP routes, "
        "the OpenAI speech API (POST /v1/audio/speech, GET /v1/models), POST "
        "/api/tts/stream, /health, /v1/voices, /metrics and the web client at /.",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (a non-loopback address without a token logs a warning)",
    )
    s.add_argument(
        "--port", type=_non_negative_int, default=8000, help="port to listen on (0: any free port)"
    )
    s.add_argument(
        "--engine",
        choices=("piper", "cosyvoice2", "tone"),
        default=None,
        help="synthesis engine (default: cosyvoice2 when --model-dir is given, else the embedded piper voice)",
    )
    s.add_argument(
        "--model-dir", default=None, help="official CosyVoice2-0.5B model directory (for --engine cosyvoice2)"
    )
    s.add_argument("--device", default="cpu", help="cosyvoice2: cpu or cuda")
    s.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="cosyvoice2: the LM's precision"
    )
    s.add_argument(
        "--flow-dtype",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="cosyvoice2: the flow estimator's precision (fp16/bf16 under autocast, for a GPU's tensor "
        "cores; the flow's encoder and the vocoder stay fp32)",
    )
    s.add_argument(
        "--lm",
        default="batched",
        choices=("batched", "per-request"),
        help="cosyvoice2: one batched LM stage for all streams, or each stream's LM alone in its own "
        "thread (the pre-batching path, for comparison)",
    )
    s.add_argument(
        "--prompt-cache-mb",
        type=_or_words(_non_negative_float, "auto"),
        default="auto",
        help="cosyvoice2: the part of --t2w-memory-mb for the flow state of voices' prompts, computed "
        "once per voice and copied into each stream that speaks with it (0: every stream computes "
        "its own; auto: an eighth; at the real model's size a 4 s prompt's state is about 570 MiB)",
    )
    s.add_argument(
        "--kv-memory-mb",
        type=_positive_float,
        default=2048,
        help="cosyvoice2: memory for the LM's KV pool: one slot of 2048 rows per stream served at once "
        "(48 MiB at the real model's size)",
    )
    s.add_argument(
        "--kv-slots",
        type=_positive_int,
        default=32,
        help="cosyvoice2: at most this many KV slots (streams the LM serves at once), fewer where "
        "--kv-memory-mb holds fewer",
    )
    s.add_argument(
        "--t2w-memory-mb",
        type=_or_words(_positive_float, "auto"),
        default="auto",
        help="cosyvoice2: memory for the streams' token2wav (flow) state, which grows with the audio "
        "a stream's flow attends to (about 190 MiB per second at the real model's size); it bounds "
        "the streams served at once (auto: half of what the flow device has free once the model is "
        "loaded, within the container's memory limit)",
    )
    s.add_argument(
        "--flow-window",
        type=_or_words(_non_negative_int, "auto", "none"),
        default="auto",
        help="cosyvoice2: seconds (25-token chunks) of earlier audio the flow attends to, like the "
        "official num_decoding_left_chunks (none: all of it, the official model's output, which only "
        "fits in --t2w-memory-mb for few streams; auto: the widest window with which every KV slot's "
        "stream fits in --t2w-memory-mb, at least 2, none when that fits)",
    )
    s.add_argument(
        "--cuda-graphs",
        choices=tuple(_SWITCH),
        default="auto",
        help="cosyvoice2: the LM's decode steps (one graph per batch size and key length) and, with "
        "--flow-slots, the flow's Euler steps for a round of whole chunks (one per batch size) as "
        "CUDA graphs recorded at start (auto: on with --device cuda and --lm batched)",
    )
    s.add_argument(
        "--lm-overlap",
        choices=tuple(_SWITCH),
        default="auto",
        help="cosyvoice2: draw speech tokens on the LM's device and enqueue each LM step before the "
        "previous step's tokens reach the host, feeding them from the device, so the host's work "
        "per step runs while the device computes (a row whose token turns out to end its request or "
        "to wait for text is dropped; tokens are those of steps taken one at a time) (auto: on with "
        "--device cuda and --lm batched)",
    )
    s.add_argument(
        "--flow-slots",
        choices=tuple(_SWITCH),
        default="auto",
        help="cosyvoice2: keep the streams' flow state in slots allocated at start (rings of the "
        "--flow-window's chunks), so that a token2wav round moves every stream's state in one "
        "operation per layer instead of several per stream, and a stream reserves its slot's exact "
        "size (auto: on with a window of at most 16 chunks and a --t2w-memory-mb budget: a full ring "
        "is attended whole, so a wider one costs more than buffers of its own)",
    )
    s.add_argument("--token", default=None, help="API token required on every route (env REALTIME_TOKEN)")
    s.add_argument(
        "--voice-alias",
        action="append",
        metavar="NAME=VOICE",
        help="another name for one of the engine's voices, for clients of other APIs (repeatable; "
        "OpenAI's voice names not given here mean the default voice)",
    )
    s.add_argument(
        "--max-streams",
        type=_positive_int,
        default=None,
        help="utterances (WebSocket contexts, HTTP syntheses) speaking at once; more wait up to "
        "--queue-timeout, then get 'overloaded' with retry_after_ms (default: the engine's own "
        "estimate, logged at start; a context waiting for its first text takes no place)",
    )
    s.add_argument(
        "--max-streams-per-session",
        type=_positive_int,
        default=None,
        help="places one WebSocket may hold at once; its other contexts wait for its own "
        "(default: half of --max-streams, at least 1)",
    )
    s.add_argument(
        "--queue-timeout",
        type=_positive_float,
        default=5.0,
        help="seconds an utterance may wait for a place held by others before 'overloaded'",
    )
    s.add_argument("--max-sessions", type=_positive_int, default=200, help="maximum open WebSocket sessions")
    s.add_argument(
        "--max-contexts", type=_positive_int, default=8, help="maximum open contexts per WebSocket"
    )
    s.add_argument(
        "--max-text-chars", type=_positive_int, default=100_000, help="maximum characters of text per context"
    )
    s.add_argument(
        "--max-frame-bytes", type=_positive_int, default=4 << 20, help="maximum size of one client frame"
    )
    s.add_argument(
        "--send-timeout",
        type=_positive_float,
        default=10.0,
        help="close a client that does not read a frame for this many seconds",
    )
    s.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=300.0,
        help="close a WebSocket with no open context that has sent no message and no ping for this many seconds",
    )
    s.add_argument(
        "--context-idle-timeout",
        type=_positive_float,
        default=30.0,
        help="end a context (typed 'timeout' error) that has had no text and produced no audio for "
        "this many seconds without an 'end'",
    )
    s.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds a client has to send its HTTP request headers (WebSocket upgrades included)",
    )
    s.add_argument(
        "--close-timeout",
        type=_positive_float,
        default=5.0,
        help="seconds a closing connection may keep unsent data or an unanswered close frame before "
        "it is aborted",
    )
    s.add_argument(
        "--buffer-ms",
        type=_positive_int,
        default=1000,
        help="audio buffered per context before the engine is paused",
    )
    s.add_argument(
        "--frame-ms",
        type=int,
        default=20,
        choices=(10, 20, 40, 60, 100),
        help="audio per PCM/G.711 frame (Opus packets are always 20 ms); larger frames cost less CPU per second of audio",
    )
    s.add_argument(
        "--realtime-lead-ms",
        type=_non_negative_int,
        default=300,
        help="pacing realtime: audio kept queued at the client ahead of playback (at least this much)",
    )
    s.add_argument(
        "--realtime-batch-ms",
        type=_non_negative_int,
        default=100,
        help="pacing realtime: a paced session wakes once per this much audio and sends what is due, "
        "so the client holds between lead and lead + batch + 30 ms; 0 sends frame by frame (more CPU)",
    )
    s.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=60.0,
        help="on SIGTERM: stop admitting (readiness fails, new clients get 503 going_away), let open "
        "contexts finish for up to this many seconds, then close the rest with going_away/1001 "
        "and exit 0; a second signal exits at once",
    )
    s.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log verbosity"
    )
    s.set_defaults(func=cmd_serve)


def _say_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "say",
        help="stream text to a server and save the audio",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Stream TEXT (or stdin with '-') in LLM-sized deltas and write the audio.",
    )
    c.add_argument("text", help="text to speak, or - to read stdin")
    c.add_argument("--url", default="ws://127.0.0.1:8000", help="server WebSocket URL")
    c.add_argument("--token", default=os.environ.get("REALTIME_TOKEN"), help="API token (env REALTIME_TOKEN)")
    c.add_argument("--voice", default=None)
    c.add_argument(
        "--format", default="pcm_s16le", choices=("pcm_s16le", "pcm_f32le", "mulaw", "alaw", "opus")
    )
    c.add_argument(
        "--container",
        default=None,
        choices=("raw", "wav", "ogg"),
        help="default: from the output file's extension",
    )
    c.add_argument("--sample-rate", type=int, default=None)
    c.add_argument("--speed", type=float, default=1.0)
    c.add_argument(
        "--tokens-per-second",
        type=_non_negative_float,
        default=30.0,
        help="LLM-like pacing of the text deltas (0: all at once)",
    )
    c.add_argument("-o", "--output", default=None, help="output file (.wav, .ogg, .raw) or - for stdout")
    c.set_defaults(func=cmd_say)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
