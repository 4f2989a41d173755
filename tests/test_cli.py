"""The ``realtime`` command line as a user runs it: ``serve`` in a subprocess, ``say`` against it."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
import soundfile as sf

from cosyvoice.tiny import write_model_dir
from realtime.cli import _deltas, _is_loopback, build_parser
from tests.serving import free_port, start_cli_server


@pytest.fixture(scope="module")
def tone_server():
    proc, base = start_cli_server()
    yield base
    proc.terminate()
    proc.wait(10)


def say(base: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    url = base.replace("http://", "ws://")
    return subprocess.run(
        [sys.executable, "-m", "realtime.cli", "say", *args, "--url", url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_say_writes_wav_and_reports_latency(tone_server, tmp_path):
    out = tmp_path / "out.wav"
    r = say(tone_server, "one two three ", "-o", str(out), "--tokens-per-second", "100")
    assert r.returncode == 0, r.stderr
    assert "time to first audio" in r.stderr and "real-time factor" in r.stderr
    x, sr = sf.read(out)
    assert sr == 24000 and len(x) == 3 * 4800


def test_say_reads_stdin_and_writes_ogg(tone_server, tmp_path):
    import av

    out = tmp_path / "out.ogg"
    r = say(
        tone_server, "-", "--format", "opus", "-o", str(out), "--tokens-per-second", "0", stdin="one two "
    )
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        n = sum(f.samples for f in c.decode(audio=0))
    assert abs(n / 48000 - 0.4) < 0.03


def test_say_reports_server_errors(tone_server):
    r = say(tone_server, "hello ", "--voice", "nobody")
    assert r.returncode == 1 and "unknown_voice" in r.stderr and "Traceback" not in r.stderr


def test_say_reports_refusals_in_one_line(tmp_path):
    """A server that wants a token (401 without one, 403 with a wrong one): one clear line and exit
    1, no traceback."""
    proc, base = start_cli_server("--token", "sekret", "--voice-alias", "nova=b")
    try:
        for extra, needle in (((), "HTTP 401"), (("--token", "nope"), "HTTP 403")):
            r = say(base, "one two ", *extra)
            assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        r = say(base, "one two ", "--token", "sekret", "-o", str(tmp_path / "a.wav"))
        assert r.returncode == 0, r.stderr
        speech = httpx.post(
            base + "/v1/audio/speech",
            headers={"Authorization": "Bearer sekret"},
            json={"model": "tts-1", "voice": "nova", "input": "one two ", "response_format": "wav"},
        )
        x, rate = sf.read(io.BytesIO(speech.content))
        assert speech.status_code == 200 and len(x) == 2 * 4800
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_refuses_an_alias_of_a_voice_it_does_not_have():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "realtime.cli",
            "serve",
            "--engine",
            "tone",
            "--port",
            "1",
            "--voice-alias",
            "nova=nobody",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--voice-alias" in r.stderr and "Traceback" not in r.stderr


def test_say_without_server_fails_cleanly():
    r = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "say", "hi", "--url", f"ws://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_serve_help_documents_every_option():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    help_text = serve.format_help()
    for action in serve._actions:
        for flag in action.option_strings:
            assert flag in help_text
        assert action.help, f"{action.option_strings} has no help text"
    for flag in (
        "--max-streams",
        "--max-streams-per-session",
        "--queue-timeout",
        "--idle-timeout",
        "--context-idle-timeout",
        "--header-timeout",
        "--close-timeout",
        "--send-timeout",
    ):
        assert flag in help_text


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--max-streams", "0", "at least 1"),
        ("--context-idle-timeout", "0", "greater than 0"),
        ("--max-sessions", "-3", "at least 1"),
        ("--send-timeout", "0", "greater than 0"),
        ("--realtime-batch-ms", "-1", "0 or more"),
        ("--realtime-lead-ms", "soon", "not a number"),
        ("--flow-window", "-3", "0 or more"),
        ("--flow-window", "wide", "not a number"),
        ("--t2w-memory-mb", "0", "greater than 0"),
        ("--kv-slots", "0", "at least 1"),
        ("--kv-memory-mb", "-1", "greater than 0"),
    ],
)
def test_serve_refuses_bad_numbers_with_a_message(flag: str, value: str, needle: str):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["serve", flag, value])
    assert e.value.code == 2
    args = parser.parse_args(["serve", "--realtime-batch-ms", "0", "--realtime-lead-ms", "150"])
    assert (args.realtime_batch_ms, args.realtime_lead_ms) == (0, 150)
    assert (args.flow_window, args.t2w_memory_mb) == ("auto", "auto")
    args = parser.parse_args(["serve", "--flow-window", "none", "--t2w-memory-mb", "512.5"])
    assert (args.flow_window, args.t2w_memory_mb) == (None, 512.5)
    assert parser.parse_args(["serve", "--flow-window", "4"]).flow_window == 4


def test_bad_number_message_names_the_problem(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-streams", "0"])
    assert "--max-streams: must be at least 1, got 0" in capsys.readouterr().err


def test_loopback_detection_and_llm_like_deltas():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")
    text = "Hello, world. How are you?"
    pieces = _deltas(text)
    assert "".join(pieces) == text and max(map(len, pieces)) == 4


def test_serve_refuses_cosyvoice2_without_model_dir():
    r = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "serve", "--engine", "cosyvoice2", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--model-dir" in r.stderr


def test_serve_refuses_a_token2wav_budget_that_holds_no_stream(tmp_path):
    root = write_model_dir(tmp_path / "tiny")
    r = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "serve", "--model-dir", str(root), "--port", "1"]
        + ["--flow-window", "none", "--t2w-memory-mb", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "holds no stream" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_cuda_graphs_without_a_gpu(tmp_path):
    root = write_model_dir(tmp_path / "tiny")
    r = subprocess.run(
        [sys.executable, "-m", "realtime.cli", "serve", "--model-dir", str(root), "--port", "1"]
        + ["--cuda-graphs", "on"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "CUDA graphs need" in r.stderr and "Traceback" not in r.stderr


def test_metrics_count_sessions(tone_server, tmp_path):
    say(tone_server, "one ", "-o", str(tmp_path / "a.wav"))
    text = httpx.get(tone_server + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("realtime_sessions_total"))
    assert float(line.split()[-1]) >= 1
    assert np.isfinite(
        float(
            next(ln for ln in text.splitlines() if ln.startswith("realtime_audio_seconds_total")).split()[-1]
        )
    )
