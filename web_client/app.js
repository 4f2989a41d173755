// The page: wires the controls to TtsClient, renders the live readouts, and exposes
// window.ttsClient for automation.

import { chatCompletionDeltas } from "./streams.js";
import { TtsClient } from "./tts-client.js";

const $ = (id) => document.getElementById(id);
const OPUS_RATES = [8000, 12000, 16000, 24000, 48000];
const FALLBACK_RATES = [8000, 16000, 22050, 24000, 48000];
const FORMAT_LABELS = { opus: "Opus", pcm_s16le: "PCM 16-bit", pcm_f32le: "PCM float" };

const params = new URLSearchParams(location.search);
const client = new TtsClient({ token: params.get("token") || "" });
let serverRates = FALLBACK_RATES;
let ratesByFormat = {};
let nativeRate = null;

// ---- settings -------------------------------------------------------------------------------

function settings() {
  return {
    voice: $("voice").value || null,
    format: $("format").value,
    sampleRate: Number($("rate").value),
    tokensPerSecond: Number($("tps").value) || 0,
  };
}

function fillRates() {
  const select = $("rate");
  const previous = Number(select.value) || 48000;
  const format = $("format").value;
  const rates =
    ratesByFormat[format] || (format === "opus" ? serverRates.filter((r) => OPUS_RATES.includes(r)) : serverRates);
  select.replaceChildren(
    ...rates.map((rate) => {
      const label = `${(rate / 1000).toLocaleString("en")} kHz${rate === nativeRate ? " (native)" : ""}`;
      return new Option(label, String(rate));
    }),
  );
  select.value = String(rates.includes(previous) ? previous : rates[rates.length - 1]);
}

function authHeaders() {
  return client.token ? { Authorization: `Bearer ${client.token}` } : {};
}

async function loadVoices() {
  try {
    const response = await fetch("/v1/voices", { headers: authHeaders() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    const voices = info.voices || [];
    $("voice").replaceChildren(
      ...voices.map((v) => new Option(v.name && v.name !== v.id ? `${v.name} · ${v.language || v.id}` : v.id, v.id)),
    );
    if (info.default_voice) $("voice").value = info.default_voice;
    if (Array.isArray(info.sample_rates) && info.sample_rates.length) serverRates = info.sample_rates;
    if (info.sample_rates_by_format) ratesByFormat = info.sample_rates_by_format;
    const pcm = ratesByFormat.pcm_s16le || serverRates;
    client.pcmRates = [...pcm].sort((a, b) => a - b);
    nativeRate = info.sample_rate || null;
    if (Array.isArray(info.formats)) {
      for (const option of [...$("format").options]) option.disabled = !info.formats.includes(option.value);
    }
    $("engine").textContent = `Engine: ${info.engine || "unknown"}${nativeRate ? ` · native ${nativeRate} Hz` : ""}`;
  } catch (err) {
    showError({ code: "voices_unavailable", message: `could not load /v1/voices (${err.message})` });
  }
  fillRates();
}

// ---- actions --------------------------------------------------------------------------------

async function run(makeUtterance) {
  hideError();
  try {
    await makeUtterance();
  } catch (err) {
    // The client has already put the server's error on the banner; show the rest here.
    if (!client.state.last_error) showError({ code: "error", message: err.message || String(err) });
  }
}

function speak(tokensPerSecond) {
  const s = settings();
  return run(() => client.speak($("text").value, { ...s, tokensPerSecond }));
}

function askChat() {
  const s = settings();
  const request = {
    url: $("chat-url").value.trim(),
    apiKey: $("chat-key").value.trim(),
    model: $("chat-model").value.trim(),
    prompt: $("chat-prompt").value,
    system: "You are a voice assistant. Answer in plain spoken sentences without markdown.",
  };
  if (!request.url) {
    showError({ code: "chat", message: "enter the URL of an OpenAI-compatible /chat/completions endpoint" });
    return Promise.resolve();
  }
  return run(() => client.speakStream((signal) => chatCompletionDeltas({ ...request, signal }), s));
}

// ---- rendering ------------------------------------------------------------------------------

const fmtMs = (v) => (v === null || v === undefined ? "—" : `${Math.round(v).toLocaleString("en")} ms`);
const levels = new Array(120).fill(0);
let renderQueued = false;
let transcript = "";

function showError({ code, message }) {
  $("error-code").textContent = code;
  $("error-message").textContent = message;
  $("error-banner").hidden = false;
}

function hideError() {
  $("error-banner").hidden = true;
}

function render() {
  renderQueued = false;
  const st = client.state;
  const conn = $("conn");
  conn.dataset.state = st.connection;
  $("conn-text").textContent =
    st.connection === "connected" ? "Connected" : st.connection === "connecting" ? "Connecting…" : "Disconnected";
  conn.title = st.session_id ? `Session ${st.session_id}` : "WebSocket /v1/tts/stream";

  const playback = st.speaking ? (st.playback === "idle" ? "buffering" : st.playback) : st.playback === "stopped" ? "stopped" : "idle";
  const labels = { idle: "Idle", buffering: "Buffering", playing: "Speaking", rebuffering: "Rebuffering", stopped: "Stopped" };
  $("playback").dataset.state = playback;
  $("playback").textContent = labels[playback] || playback;

  $("m-ttfa").textContent = fmtMs(st.ttfa_ms);
  $("m-ttfa-play").textContent = fmtMs(st.ttfa_play_ms);
  $("m-buffered").textContent = st.utterances ? fmtMs(st.buffered_ms) : "—";
  $("m-underruns").textContent = st.utterances ? String(st.underruns) : "—";
  $("m-underruns").classList.toggle("warn", st.underruns > 0);
  // Live: bytes received over the last second. Idle: the stream's average (bytes per audio second).
  const avgKbps = st.received_audio_ms > 0 ? (st.utterance_bytes * 8) / st.received_audio_ms : 0;
  $("m-bitrate-label").textContent = st.speaking || !st.utterances ? "Bitrate" : "Bitrate, average";
  $("m-bitrate").textContent = !st.utterances
    ? "—"
    : `${(st.speaking ? st.bitrate_kbps : avgKbps).toFixed(1)} kbit/s`;
  $("m-played").textContent = st.utterances ? `${(st.played_ms / 1000).toFixed(2)} s` : "—";

  const info = [];
  if (st.format) info.push(`${FORMAT_LABELS[st.format] || st.format} at ${(st.sample_rate / 1000).toLocaleString("en")} kHz`);
  if (st.decoder === "webcodecs-opus") info.push("decoded with WebCodecs");
  if (st.opus_fallback) info.push("Opus is not decodable in this browser, so PCM is used");
  if (st.audio_context_rate && st.sample_rate && st.audio_context_rate !== st.sample_rate) {
    info.push(`resampled to ${st.audio_context_rate} Hz`);
  }
  if (!st.speaking && st.last_stats?.rtf !== undefined) info.push(`server RTF ${Number(st.last_stats.rtf).toFixed(2)}`);
  $("stream-info").textContent = info.join(" · ");

  for (const id of ["stop", "chat-stop"]) $(id).disabled = !st.speaking;

  const heard = Math.min(st.heard_offset, transcript.length);
  const el = $("transcript");
  if (transcript) {
    const spoken = document.createElement("span");
    spoken.className = "heard";
    spoken.textContent = transcript.slice(0, heard);
    el.replaceChildren(spoken, document.createTextNode(transcript.slice(heard)));
  }
  $("transcript-meta").textContent = transcript ? `${st.chars_sent} characters` : "";
}

function queueRender() {
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(render);
  }
}

function drawMeter() {
  const canvas = $("meter");
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * dpr)) canvas.width = Math.round(width * dpr);
  if (canvas.height !== Math.round(height * dpr)) canvas.height = Math.round(height * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const bar = width / levels.length;
  const mid = height / 2;
  g.fillStyle = style.getPropertyValue("--meter-idle").trim();
  g.fillRect(0, mid - 0.5, width, 1);
  g.fillStyle = style.getPropertyValue("--accent").trim();
  for (let i = 0; i < levels.length; i++) {
    // RMS to a perceptual-ish scale: -60 dBFS at the floor, 0 dBFS at full height.
    const db = 20 * Math.log10(Math.max(levels[i], 1e-6));
    const h = Math.max(0, Math.min(1, (db + 60) / 60)) * (height - 4);
    if (h > 0.5) g.fillRect(i * bar + 1, mid - h / 2, Math.max(1, bar - 2), h);
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["text", "chat"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
}

client.addEventListener("change", queueRender);
client.addEventListener("servererror", (event) => showError(event.detail));
client.addEventListener("serverwarning", (event) => showError(event.detail));
client.addEventListener("textsent", (event) => {
  transcript += event.detail;
  queueRender();
});

function beginTranscript() {
  transcript = "";
  $("transcript").replaceChildren();
}

$("speak").addEventListener("click", () => {
  beginTranscript();
  speak(0);
});
$("stream").addEventListener("click", () => {
  beginTranscript();
  speak(settings().tokensPerSecond || 20);
});
$("panel-chat").addEventListener("submit", (event) => {
  event.preventDefault();
  beginTranscript();
  askChat();
});
$("token-form").addEventListener("submit", (event) => event.preventDefault());
for (const id of ["stop", "chat-stop"]) $(id).addEventListener("click", () => client.stop());
$("error-dismiss").addEventListener("click", hideError);
$("tab-text").addEventListener("click", () => selectTab("text"));
$("tab-chat").addEventListener("click", () => selectTab("chat"));
$("format").addEventListener("change", fillRates);
$("token").value = client.token;
$("token").addEventListener("change", () => {
  client.token = $("token").value.trim();
  client.disconnect();
  hideError();
  loadVoices().then(connectNow);
});
// Browsers without an autoplay exemption start audio only from a user gesture.
document.addEventListener("pointerdown", () => client.resumeAudio());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") client.stop();
});

setInterval(() => {
  levels.shift();
  levels.push(client.state.speaking ? client.state.level : 0);
  drawMeter();
}, 50);

// Automation: speak() resolves when the audio has finished playing (or was stopped).
window.ttsClient = {
  speak(text, opts = {}) {
    const s = settings();
    beginTranscript();
    hideError();
    return client.speak(text, {
      voice: opts.voice ?? s.voice,
      format: opts.format ?? s.format,
      sampleRate: opts.sampleRate ?? s.sampleRate,
      tokensPerSecond: opts.tokensPerSecond ?? 0,
    });
  },
  speakStream: (makeDeltas, opts = {}) => {
    beginTranscript();
    hideError();
    return client.speakStream(makeDeltas, { ...settings(), ...opts });
  },
  ask: askChat,
  stop: () => client.stop(),
  get state() {
    return client.state;
  },
  client,
};

// Connect up front so the first utterance does not pay for the handshake.
function connectNow() {
  render();
  const s = settings();
  client
    .resolveFormat(s.format, s.sampleRate)
    .then((f) => client.connect({ voice: s.voice, format: f.format, sampleRate: f.sampleRate }))
    .catch(() => {});
}

loadVoices().then(connectNow);
render();
