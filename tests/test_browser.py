"""The web client in a real headless Chromium against a real ``realtime serve`` (embedded voice).

One server and one page for the module: every test speaks on the same long-lived socket, the way
the page is meant to be used.  Tests run in file order: the stop test saves the screenshot
(artifacts/browser.png, mid-utterance) and the last one checks that nothing reached the console.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser_util import CHROMIUM, free_port, launch_chromium, start_server, stop_process, wait_healthy

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"

# One sentence (about 2 s of speech): the engine speaks sentence by sentence, so a single sentence
# arrives as one burst and any underrun would be the client's fault, not the server's pace.
SENTENCE = "Hello there, how are you doing today?"
LONG_TEXT = " ".join(
    [
        "Here is a long answer.",
        "The assistant keeps reading it aloud while new words are still arriving.",
        "It goes on for several sentences so that there is plenty of time to interrupt it.",
        "Nobody should ever hear this third sentence, because the test stops the voice first.",
        "And this fourth one is only here to keep the stream busy for a little longer.",
    ]
)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(server URL, page, problems): Chromium starts while the server loads and warms its voice."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing (run tests/ensure_chromium.sh as root, or apt-get install chromium)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc = start_server(port, log)
    try:
        with sync_api.sync_playwright() as pw:
            context = launch_chromium(
                pw, tmp_path_factory.mktemp("chromium-profile"), viewport={"width": 1280, "height": 900}
            )
            try:
                wait_healthy(url, proc)
            except Exception as e:
                pytest.fail(f"realtime serve did not start: {e}\n{log.read_text(errors='replace')[-3000:]}")
            page = context.new_page()
            problems: list[str] = []
            page.on(
                "console",
                lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.goto(url + "/")
            page.wait_for_function("window.ttsClient && window.ttsClient.state.connected", timeout=20_000)
            yield url, page, problems
            context.close()
    finally:
        stop_process(proc)


@pytest.fixture
def browser(session):
    _, page, problems = session
    return page, problems


@pytest.fixture
def server(session):
    return session[0]


def speak(page, text: str, **opts) -> dict:
    return page.evaluate("([text, opts]) => window.ttsClient.speak(text, opts)", [text, opts])


def state(page) -> dict:
    return page.evaluate("({...window.ttsClient.state})")


def test_page_connects_and_audio_clock_runs_headless(browser):
    page, _ = browser
    # The automation hook exists and the page reached the server over the WebSocket.
    st = state(page)
    assert st["connection"] == "connected" and st["session_id"]
    assert page.evaluate("typeof AudioWorkletNode") == "function"
    assert page.evaluate("typeof AudioDecoder") == "function", (
        "WebCodecs needs a secure context (loopback is one)"
    )
    # Without a sound card, headless Chromium renders into a fake output: the context must still
    # be running and its clock advancing, or nothing would ever play.
    clock = page.evaluate("""async () => {
      const ctx = new AudioContext({ sampleRate: 22050 });
      const t0 = ctx.currentTime;
      await new Promise((r) => setTimeout(r, 300));
      const out = { state: ctx.state, advanced: ctx.currentTime - t0 };
      await ctx.close();
      return out;
    }""")
    assert clock["state"] == "running" and clock["advanced"] > 0.1, clock


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [("opus", 48000), ("pcm_s16le", 22050)],
    ids=["opus-48k", "pcm16-22k"],
)
def test_plays_more_than_a_second_without_underrun(browser, fmt, rate):
    page, _ = browser
    result = speak(page, SENTENCE, format=fmt, sampleRate=rate)
    st = state(page)
    assert result["stopped"] is False
    assert result["played_ms"] > 1000, result
    assert result["underruns"] == 0, result
    assert result["ttfa_ms"] is not None and 0 < result["ttfa_ms"] < 30_000, result
    assert result["ttfa_play_ms"] >= result["ttfa_ms"], result
    # The whole utterance played: the server's audio length matches what the worklet consumed.
    assert abs(result["played_ms"] - result["stats"]["audio_ms"]) < 60, result
    assert st["format"] == fmt and st["sample_rate"] == rate
    assert st["decoder"] == ("webcodecs-opus" if fmt == "opus" else "pcm")
    assert st["audio_context_state"] == "running"
    assert st["audio_context_rate"] == rate, "the AudioContext runs at the stream's rate: no resampling"
    assert st["buffered_ms"] == 0 and not st["speaking"]
    # What arrived is the whole utterance, at the bitrate the format implies.
    assert abs(st["received_audio_ms"] - result["stats"]["audio_ms"]) < 60, st
    kbps = result["bytes"] * 8 / st["received_audio_ms"]
    if fmt == "opus":
        assert 6 < kbps < 128, kbps
    else:
        assert kbps == pytest.approx(rate * 16 / 1000, rel=1e-3)
    # the readout repaints on the next frame after the utterance ends: wait for the average to show
    page.wait_for_function(
        "document.getElementById('m-bitrate-label').textContent === 'Bitrate, average'", timeout=5000
    )
    shown = page.inner_text("#m-bitrate")
    assert shown.endswith(" kbit/s") and float(shown.split()[0]) == pytest.approx(kbps, abs=0.051)


def test_stop_silences_at_once_and_server_acks_cancel(browser):
    page, _ = browser
    before = state(page)
    page.evaluate(
        "(text) => { window.__utt = window.ttsClient.speak(text, {format: 'opus', sampleRate: 48000, tokensPerSecond: 12}); }",
        LONG_TEXT,
    )
    page.wait_for_function(
        "window.ttsClient.state.speaking && window.ttsClient.state.played_ms > 600", timeout=30_000
    )
    session = state(page)["session_id"]
    # The page mid-utterance, level meter moving, is the screenshot worth looking at.
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
    page.evaluate("window.ttsClient.stop()")
    result = page.evaluate("window.__utt")
    assert result["stopped"] is True
    # The worklet drops its buffer and its last report says so; nothing more plays.
    page.wait_for_function("window.ttsClient.state.buffered_ms === 0", timeout=2_000)
    played = state(page)["played_ms"]
    assert played - result["played_ms"] < 250, "audio kept playing after stop()"
    page.wait_for_timeout(400)
    after = state(page)
    assert after["played_ms"] == played
    assert not after["speaking"] and after["playback"] == "stopped"
    assert page.inner_text("#playback") == "Stopped" and page.is_disabled("#stop")
    # The server stops the context (its synthesis thread too) and acknowledges it.
    page.wait_for_function(
        f"window.ttsClient.state.cancelled_acks > {before['cancelled_acks']}", timeout=15_000
    )
    assert state(page)["session_id"] == session, "stop must not cost the socket"


def test_new_utterance_right_after_stop_on_same_socket(browser):
    page, _ = browser
    session = state(page)["session_id"]
    page.evaluate(
        "(text) => { window.__utt = window.ttsClient.speak(text, {format: 'opus', sampleRate: 48000}); }",
        LONG_TEXT,
    )
    page.wait_for_function("window.ttsClient.state.played_ms > 300", timeout=30_000)
    acks = state(page)["cancelled_acks"]
    # Barge in with a new utterance without waiting for the cancel ack: frames of the cancelled
    # context must not leak into the new one.
    result = speak(page, "Sorry, go ahead.", format="opus", sampleRate=48000)
    assert page.evaluate("window.__utt.then(r => r.stopped)") is True
    assert result["stopped"] is False and result["played_ms"] > 300
    assert abs(result["played_ms"] - result["stats"]["audio_ms"]) < 60, (
        "audio of the cancelled context leaked in"
    )
    st = state(page)
    assert st["session_id"] == session and st["cancelled_acks"] == acks + 1


def test_racing_speak_calls_keep_only_the_last(browser):
    page, _ = browser
    # The second call supersedes the first while the first is still reconnecting for its format.
    first, second = page.evaluate("""async () => {
      const a = window.ttsClient.speak('This one is superseded.', {format: 'pcm_f32le', sampleRate: 16000});
      const b = window.ttsClient.speak('Second one wins.', {format: 'opus', sampleRate: 24000});
      return [await a, await b];
    }""")
    assert first["stopped"] is True and first["bytes"] == 0
    assert second["stopped"] is False and second["played_ms"] > 500 and second["underruns"] == 0
    st = state(page)
    assert st["format"] == "opus" and st["sample_rate"] == 24000 and st["audio_context_rate"] == 24000


def test_server_error_is_shown_and_page_recovers(browser):
    page, _ = browser
    message = page.evaluate(
        "() => window.ttsClient.speak('Hello.', {voice: 'no-such-voice', format: 'pcm_s16le', sampleRate: 22050})"
        ".then(() => 'resolved', e => e.message)"
    )
    assert "unknown_voice" in message
    assert state(page)["last_error"]["code"] == "unknown_voice"
    assert page.is_visible("#error-banner")
    assert page.inner_text("#error-code") == "unknown_voice"
    # The next utterance with a real voice works and clears the banner.
    result = speak(page, "Back again.", format="pcm_s16le", sampleRate=22050)
    assert result["played_ms"] > 300 and state(page)["last_error"] is None


def test_text_the_voice_cannot_speak_is_named_on_the_page(browser):
    """The default voice speaks English: the Chinese in the middle is skipped, and the page says
    so (the server's unsupported_language warning) while the English is spoken."""
    page, _ = browser
    result = speak(
        page, "Hello there. 你好，今天天气很好。 See you soon.", format="pcm_s16le", sampleRate=22050
    )
    assert result["played_ms"] > 500 and not result["stopped"]
    warning = state(page)["last_warning"]
    assert warning["code"] == "unsupported_language" and "你好" in warning["skipped"]
    assert page.is_visible("#error-banner")
    assert page.inner_text("#error-code") == "unsupported_language"
    page.click("#error-dismiss")


def test_ui_falls_back_to_pcm_without_webcodecs(browser):
    page, _ = browser
    # A browser without WebCodecs: the page asks the server for PCM instead of Opus by itself.
    page.evaluate("() => { window.__AudioDecoder = window.AudioDecoder; delete window.AudioDecoder; }")
    try:
        before = state(page)
        page.select_option("#format", "opus")
        page.select_option("#rate", "24000")
        page.fill("#text", "Falling back to plain samples.")
        page.click("#speak")
        page.wait_for_function(
            f"window.ttsClient.state.done_acks > {before['done_acks']} && !window.ttsClient.state.speaking",
            timeout=30_000,
        )
        st = state(page)
        assert st["opus_fallback"] is True and st["format"] == "pcm_s16le" and st["decoder"] == "pcm"
        assert st["sample_rate"] == 24000 and st["played_ms"] > 500 and st["underruns"] == 0
        assert "PCM is used" in page.inner_text("#stream-info")
    finally:
        page.evaluate("() => { window.AudioDecoder = window.__AudioDecoder; }")


def _sse(*events: str) -> str:
    return "".join(f"data: {e}\n\n" for e in events)


def test_chat_panel_streams_completion_deltas_into_speech(browser, server):
    page, _ = browser
    seen: list[dict] = []
    deltas = ["Speech", " starts", " before", " the", " answer", " ends."]
    body = _sse(
        json.dumps({"choices": [{"delta": {"role": "assistant"}}]}),
        *(json.dumps({"choices": [{"delta": {"content": d}}]}) for d in deltas),
        json.dumps({"choices": [{"delta": {}, "finish_reason": "stop"}]}),
        "[DONE]",
    )

    def fake_llm(route):
        seen.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    url = server + "/fake-llm/v1/chat/completions"
    page.route(url, fake_llm)
    before = state(page)
    page.click("#tab-chat")
    page.fill("#chat-url", url)
    page.fill("#chat-model", "test-model")
    page.fill("#chat-key", "sk-test")
    page.fill("#chat-prompt", "Why stream?")
    page.click("#chat-send")
    page.wait_for_function(
        f"window.ttsClient.state.done_acks > {before['done_acks']} && !window.ttsClient.state.speaking",
        timeout=30_000,
    )
    st = state(page)
    assert seen and seen[0]["stream"] is True and seen[0]["model"] == "test-model"
    assert seen[0]["messages"][-1] == {"role": "user", "content": "Why stream?"}
    assert st["chars_sent"] == len("".join(deltas))
    assert st["played_ms"] > 500 and st["underruns"] == 0
    assert page.inner_text("#transcript") == "".join(deltas)

    # A chat endpoint that fails mid-stream: the error is shown, the voice stops.
    page.unroute(url)
    page.route(
        url,
        lambda r: r.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=_sse(json.dumps({"error": {"message": "quota exceeded"}})),
        ),
    )
    page.click("#chat-send")
    page.wait_for_selector("#error-banner:not([hidden])", timeout=10_000)
    assert "quota exceeded" in page.inner_text("#error-banner")
    page.wait_for_function("!window.ttsClient.state.speaking", timeout=10_000)
    page.unroute(url)
    page.click("#tab-text")


def test_token_field_reaches_voices_and_stream(browser):
    page, _ = browser
    # This server has no token configured (it ignores one), so only the plumbing is checked here:
    # /v1/voices gets it as a Bearer header, the WebSocket as ?token= (browsers cannot set headers).
    with page.expect_websocket() as ws_info, page.expect_request("**/v1/voices") as voices_info:
        page.click(".token summary")
        page.fill("#token", "s3cret token")
        page.dispatch_event("#token", "change")
    assert voices_info.value.headers.get("authorization") == "Bearer s3cret token"
    assert "token=s3cret+token" in ws_info.value.url or "token=s3cret%20token" in ws_info.value.url
    page.wait_for_function("window.ttsClient.state.connected", timeout=10_000)
    page.fill("#token", "")
    page.dispatch_event("#token", "change")
    page.wait_for_function("window.ttsClient.state.connected", timeout=10_000)


def test_no_console_errors(browser):
    page, problems = browser
    assert (ARTIFACTS / "browser.png").is_file()
    assert problems == []


# ---- the AudioWorklet processor, driven quantum by quantum --------------------------------------
# The processor is plain script; these tests load it with a stand-in AudioWorkletGlobalScope and call
# process() themselves, so the jitter buffer, underrun, fade and stop logic are checked sample-exactly.

_HARNESS = """
([src, rate]) => {
  let Processor = null;
  class AudioWorkletProcessor {
    constructor() { this.port = { postMessage: (m) => posted.push(m), onmessage: null }; }
  }
  const posted = [];
  new Function("AudioWorkletProcessor", "registerProcessor", "sampleRate", src)(
    AudioWorkletProcessor, (name, cls) => { Processor = cls; }, rate);
  const proc = new Processor();
  const send = (m) => proc.port.onmessage({ data: m });
  const render = (quanta) => {
    const out = [];
    for (let q = 0; q < quanta; q++) {
      const outputs = [[new Float32Array(128)]];
      proc.process([], outputs);
      out.push(...outputs[0][0]);
    }
    return out;
  };
  const ramp = (n, from) => Float32Array.from({ length: n }, (_, i) => ((from + i) % 1000) / 1000);
  window.__player = { proc, send, render, posted, ramp };
  return true;
}
"""


@pytest.fixture
def player(browser):
    page, _ = browser
    src = (REPO / "web_client" / "player-worklet.js").read_text()

    def make(rate: int = 48000):
        page.evaluate(_HARNESS, [src, rate])
        return page

    return make


def test_worklet_waits_for_jitter_buffer_then_plays_samples_exactly(player):
    page = player(48000)
    r = page.evaluate("""() => {
      const { send, render, posted, ramp } = window.__player;
      send({ type: "begin", id: 1, inputRate: 48000, prebufferMs: 80 });
      send({ type: "push", id: 1, samples: ramp(48 * 50, 0) });          // 50 ms < 80 ms jitter buffer
      const waiting = render(4);
      send({ type: "push", id: 1, samples: ramp(48 * 50, 48 * 50) });    // now 100 ms
      const playing = render(2);
      send({ type: "push", id: 2, samples: ramp(480, 0) });              // a stale utterance's audio
      send({ type: "end", id: 1 });
      const rest = render(40);
      const finished = posted.filter((m) => m.type === "finished");
      return { waiting: waiting.some((v) => v !== 0), first: playing.slice(0, 256),
               started: posted.some((m) => m.type === "started"),
               tail: rest.slice(4800 - 256).some((v) => v !== 0), finished };
    }""")
    assert r["waiting"] is False, "played before the jitter buffer filled"
    assert r["started"] is True
    expected = [((i % 1000) / 1000) for i in range(256)]
    assert r["first"] == pytest.approx(expected, abs=1e-6), "samples must pass untouched when the rates match"
    assert r["tail"] is False, "audio of a stale utterance id was played"
    assert len(r["finished"]) == 1 and r["finished"][0]["stopped"] is False
    assert r["finished"][0]["underruns"] == 0
    assert r["finished"][0]["playedMs"] == pytest.approx(100, abs=0.1)


def test_worklet_counts_underrun_and_fades_back_in(player):
    page = player(48000)
    r = page.evaluate("""() => {
      const { send, render, posted } = window.__player;
      send({ type: "begin", id: 1, inputRate: 48000, prebufferMs: 10 });
      send({ type: "push", id: 1, samples: new Float32Array(480 + 64).fill(0.5) });
      const before = render(5);          // 640 frames wanted, 544 available: starves mid-quantum
      const starved = render(3);         // rebuffering: silence, not another underrun per quantum
      send({ type: "push", id: 1, samples: new Float32Array(4800).fill(0.5) });
      const after = render(4);
      const stats = posted.filter((m) => m.type === "stats").pop();
      return { underruns: window.__player.proc.underruns, starvedSilent: starved.every((v) => v === 0),
               fadeStart: after[0], fadeMid: after[100], fadeDone: after[400], hadFull: before[0] };
    }""")
    assert r["hadFull"] == 0.5
    assert r["underruns"] == 1
    assert r["starvedSilent"] is True
    # a 5 ms (240-frame) fade-in after the underrun instead of a click
    assert r["fadeStart"] < 0.01 and 0.1 < r["fadeMid"] < 0.4 and r["fadeDone"] == 0.5


def test_worklet_stop_silences_within_one_quantum_and_drops_buffer(player):
    page = player(48000)
    r = page.evaluate("""() => {
      const { send, render, posted } = window.__player;
      send({ type: "begin", id: 1, inputRate: 48000, prebufferMs: 20 });
      send({ type: "push", id: 1, samples: new Float32Array(48000).fill(0.5) });   // 1 s buffered
      render(2);
      send({ type: "stop" });
      const fade = render(1);
      const after = render(10);
      const finished = posted.filter((m) => m.type === "finished");
      return { fade, afterSilent: after.every((v) => v === 0), finished,
               buffered: posted.filter((m) => m.type === "stats").pop().bufferedMs };
    }""")
    fade = r["fade"]
    assert fade[0] == pytest.approx(0.5, rel=0.02) and fade[-1] == 0.0, "fade-out over exactly one quantum"
    assert all(a >= b for a, b in zip(fade[:-1], fade[1:], strict=True)), "fade-out must fall monotonically"
    assert r["afterSilent"] is True
    assert r["buffered"] == 0
    assert len(r["finished"]) == 1 and r["finished"][0]["stopped"] is True
    assert r["finished"][0]["playedMs"] == pytest.approx(384 / 48, abs=0.1)


def test_worklet_resamples_when_context_rate_differs(player):
    page = player(48000)
    r = page.evaluate("""() => {
      const { send, render, posted } = window.__player;
      send({ type: "begin", id: 1, inputRate: 16000, prebufferMs: 0 });
      // a 16 kHz ramp 0..1 over 1600 samples (100 ms), pushed as many small chunks and one big one
      const x = Float32Array.from({ length: 1600 }, (_, i) => i / 1600);
      for (let i = 0; i < 800; i += 80) send({ type: "push", id: 1, samples: x.slice(i, i + 80) });
      send({ type: "push", id: 1, samples: x.slice(800) });
      send({ type: "end", id: 1 });
      const out = render(40);
      return { out: out.slice(0, 4800), finished: posted.filter((m) => m.type === "finished") };
    }""")
    out = r["out"]
    # 3 output samples per input sample, linearly interpolated: a smooth ramp at a third of the slope
    assert out[3] == pytest.approx(1 / 1600, abs=1e-6) and out[1] == pytest.approx(1 / 4800, abs=1e-6)
    steps = [b - a for a, b in zip(out[:4699], out[1:4700], strict=True)]
    assert max(steps) < 1 / 4800 + 1e-5 and min(steps) > 0, "resampled ramp must be smooth"
    assert r["finished"][0]["playedMs"] == pytest.approx(100, abs=0.2)
    assert r["finished"][0]["underruns"] == 0
