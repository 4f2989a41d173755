// Protocol v1 client for /v1/tts/stream plus WebAudio playback. No DOM: copy this file (with
// opus.js, streams.js and player-worklet.js) into your own front end.
//
// One long-lived socket carries every utterance. Each utterance is a context with a
// client-chosen context_id. In binary transport the server speaks contexts one after another,
// so a binary frame belongs to the oldest context whose `done`/`cancelled` has not arrived
// yet: that is `this.contexts[0]`. Frames of a context we cancelled are dropped until the
// server's `cancelled` ack retires it.

import { OpusStreamDecoder, opusDecodingSupported } from "./opus.js";
import { textDeltas } from "./streams.js";

const WORKLET_URL = new URL("./player-worklet.js", import.meta.url);
const PREBUFFER_MS = 80;
const OPUS_RATES = new Set([8000, 12000, 16000, 24000, 48000]);

function freshState() {
  return {
    connection: "disconnected", // disconnected | connecting | connected
    connected: false,
    session_id: null,
    voice: null,
    format: null,
    sample_rate: null,
    decoder: null, // "webcodecs-opus" | "pcm"
    opus_fallback: false, // Opus was asked for but this browser cannot decode it
    audio_context_rate: null,
    audio_context_state: null,
    speaking: false,
    playback: "idle", // idle | buffering | playing | rebuffering (from the worklet) | stopped
    context_id: null,
    ttfa_ms: null, // first text sent -> first audio frame received from the socket
    ttfa_play_ms: null, // first text sent -> first sample handed to the audio output
    buffered_ms: 0,
    played_ms: 0,
    underruns: 0,
    level: 0,
    bytes_received: 0, // all audio bytes on this page, every utterance
    utterance_bytes: 0,
    received_audio_ms: 0, // audio duration of this utterance's frames (20 ms per Opus packet)
    bitrate_kbps: 0, // over the last second
    chars_sent: 0,
    heard_offset: 0, // characters of the sent text spoken by now (from `mark`)
    last_error: null, // {code, message, fatal}
    last_warning: null, // {code, message, skipped}: text the voice skipped (a language it does not speak)
    last_stats: null, // `done.stats` of the last finished utterance
    cancelled_acks: 0,
    done_acks: 0,
    utterances: 0,
  };
}

export class TtsClient extends EventTarget {
  constructor({ token = "", prebufferMs = PREBUFFER_MS } = {}) {
    super();
    this.token = token;
    this.prebufferMs = prebufferMs;
    this.pcmRates = null; // sorted PCM rates of the server (from /v1/voices), for the Opus fallback
    this.state = freshState();
    this.ws = null;
    this.wsKey = null;
    this.connecting = null;
    this.contexts = []; // open contexts in server order; binary frames go to contexts[0]
    this.current = null; // the utterance being spoken or played
    this.pending = null; // a speak() still waiting for audio/socket setup
    this.nextId = 0;
    this.playId = null; // the utterance the worklet is playing or last played
    this.audio = null; // {ctx, node}
    this.arrivals = []; // [time, bytes] of the last second, for the bitrate
    this.bitrateTimer = setInterval(() => this.updateBitrate(), 250);
  }

  emit() {
    this.dispatchEvent(new Event("change"));
  }

  setError(code, message, fatal = false) {
    this.state.last_error = { code, message, fatal };
    this.dispatchEvent(new CustomEvent("servererror", { detail: this.state.last_error }));
    this.emit();
  }

  // ---- audio --------------------------------------------------------------------------------

  // An AudioContext at the stream's rate plays samples untouched; when the browser refuses that
  // rate the worklet resamples. Calls are serialized so that racing speak() calls share one context.
  ensureAudio(rate) {
    const run = (this.audioQueue || Promise.resolve()).catch(() => {}).then(() => this.openAudio(rate));
    this.audioQueue = run;
    return run;
  }

  async openAudio(rate) {
    if (this.audio && this.audio.rate !== rate) {
      const old = this.audio;
      this.audio = null;
      await old.ctx.close().catch(() => {});
    }
    if (!this.audio) {
      let ctx;
      try {
        ctx = new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
      } catch {
        ctx = new AudioContext({ latencyHint: "interactive" });
      }
      await ctx.audioWorklet.addModule(WORKLET_URL);
      const node = new AudioWorkletNode(ctx, "tts-player", { numberOfInputs: 0, outputChannelCount: [1] });
      node.connect(ctx.destination);
      node.port.onmessage = (event) => this.onWorklet(event.data);
      ctx.onstatechange = () => {
        this.state.audio_context_state = ctx.state;
        this.emit();
      };
      this.audio = { ctx, node, rate }; // rate: the one asked for, even if the browser chose another
      this.state.audio_context_rate = ctx.sampleRate;
    }
    const { ctx } = this.audio;
    if (ctx.state === "suspended") {
      // Browsers without the autoplay flag only resume after a user gesture; do not hang on it.
      await Promise.race([ctx.resume(), new Promise((r) => setTimeout(r, 1000))]);
    }
    this.state.audio_context_state = ctx.state;
    if (ctx.state !== "running") {
      this.setError("audio_blocked", "The browser has not allowed audio yet: click anywhere on the page and try again.");
    }
    return this.audio;
  }

  // Call from a user gesture (click) when the browser kept the AudioContext suspended.
  resumeAudio() {
    if (this.audio && this.audio.ctx.state === "suspended") this.audio.ctx.resume();
  }

  onWorklet(msg) {
    // Stats of a stopped utterance still count until the next one begins: they show the drain.
    if (msg.id !== this.playId) return;
    const utt = this.current && this.current.id === msg.id ? this.current : null;
    if (msg.type === "stats") {
      this.state.buffered_ms = msg.bufferedMs;
      this.state.played_ms = msg.playedMs;
      this.state.underruns = msg.underruns;
      this.state.level = msg.level;
      if (utt) {
        this.state.playback = msg.state;
        this.updateHeard(utt);
      }
      this.emit();
    } else if (!utt) {
      return;
    } else if (msg.type === "started") {
      utt.playStartAt = performance.now();
      if (utt.firstSendAt !== null) this.state.ttfa_play_ms = Math.round(utt.playStartAt - utt.firstSendAt);
      this.emit();
    } else if (msg.type === "finished") {
      this.state.played_ms = msg.playedMs;
      this.state.underruns = msg.underruns;
      this.state.buffered_ms = 0;
      this.state.level = 0;
      this.state.playback = "idle";
      if (!msg.stopped) this.state.heard_offset = this.state.chars_sent;
      this.settle(utt, null, msg.stopped);
    }
  }

  updateHeard(utt) {
    let heard = this.state.heard_offset;
    for (const mark of utt.marks) if (mark.audio_ms <= this.state.played_ms) heard = Math.max(heard, mark.text_offset);
    this.state.heard_offset = heard;
  }

  // ---- connection ---------------------------------------------------------------------------

  async connect({ voice, format, sampleRate }) {
    const key = JSON.stringify([voice, format, sampleRate, this.token]);
    if (this.ws && this.wsKey === key && this.ws.readyState === WebSocket.OPEN) return;
    if (this.connecting && this.connecting.key === key) return this.connecting.promise;
    this.disconnect();
    const url = new URL("/v1/tts/stream", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.token) url.searchParams.set("token", this.token);
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.wsKey = key;
    this.state.connection = "connecting";
    this.emit();
    let rejectConnect;
    const promise = new Promise((resolve, reject) => {
      rejectConnect = reject;
      ws.onopen = () => {
        const start = { type: "start", format, sample_rate: sampleRate, container: "raw", audio_transport: "binary", pacing: "asap" };
        if (voice) start.voice = voice;
        ws.send(JSON.stringify(start));
      };
      ws.onmessage = (event) => {
        if (typeof event.data !== "string") return this.onAudio(event.data);
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          return this.setError("bad_message", `server sent a text frame that is not JSON: ${event.data.slice(0, 80)}`);
        }
        if (msg.type === "ready") {
          Object.assign(this.state, {
            connection: "connected",
            connected: true,
            session_id: msg.session_id ?? null,
            voice: msg.voice ?? voice,
            format: msg.format ?? format,
            sample_rate: msg.sample_rate ?? sampleRate,
          });
          this.emit();
          resolve();
        } else if (msg.type === "error" && this.state.connection === "connecting") {
          // `start` was refused (e.g. unknown voice): this socket is no use, the next call reconnects.
          this.setError(msg.code, msg.message, msg.fatal);
          reject(new Error(`${msg.code}: ${msg.message}`));
          if (this.ws === ws) this.disconnect();
        } else {
          this.onControl(msg);
        }
      };
      ws.onclose = (event) => {
        if (this.ws !== ws) return;
        const wasOpen = this.state.connection === "connected";
        this.ws = null;
        this.wsKey = null;
        Object.assign(this.state, { connection: "disconnected", connected: false, session_id: null });
        const reason = event.reason || `code ${event.code}`;
        if (!wasOpen) {
          const msg = `could not open the stream (${reason}); is the server running, and is the token right?`;
          if (!this.state.last_error || !this.state.last_error.fatal) this.setError("connect_failed", msg, true);
          reject(new Error(msg));
        } else if (event.code !== 1000) {
          if (!this.state.last_error?.fatal) this.setError("disconnected", `the server closed the stream (${reason})`, true);
        }
        this.contexts = [];
        if (this.current) this.abortCurrent(new Error(`connection closed (${reason})`));
        this.emit();
      };
    });
    this.connecting = { key, promise, reject: rejectConnect };
    try {
      await promise;
    } finally {
      if (this.connecting?.promise === promise) this.connecting = null;
    }
  }

  disconnect() {
    if (this.connecting) {
      // A speak() waiting on this handshake must not hang: it was superseded.
      this.connecting.reject(new Error("connection superseded by a newer one"));
      this.connecting = null;
    }
    const ws = this.ws;
    this.ws = null;
    this.wsKey = null;
    this.contexts = [];
    if (ws) {
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(1000, "client reconnects");
    }
    Object.assign(this.state, { connection: "disconnected", connected: false, session_id: null });
    this.emit();
  }

  send(msg) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("not connected");
    this.ws.send(JSON.stringify(msg));
  }

  // ---- server messages ----------------------------------------------------------------------

  findContext(contextId) {
    if (contextId === undefined || contextId === null) return this.contexts[0] || null;
    return this.contexts.find((c) => c.contextId === contextId) || null;
  }

  retire(ctx) {
    this.contexts = this.contexts.filter((c) => c !== ctx);
  }

  onAudio(buffer) {
    const bytes = buffer.byteLength;
    this.state.bytes_received += bytes;
    this.arrivals.push([performance.now(), bytes]);
    const utt = this.contexts[0];
    if (!utt || utt.stopped || utt !== this.current) return; // audio of a cancelled context
    this.state.utterance_bytes += bytes;
    if (utt.firstAudioAt === null) {
      utt.firstAudioAt = performance.now();
      if (utt.firstSendAt !== null) this.state.ttfa_ms = Math.round(utt.firstAudioAt - utt.firstSendAt);
    }
    if (utt.decoder) {
      this.state.received_audio_ms += 20;
      try {
        utt.decoder.decode(buffer);
      } catch (err) {
        this.failUtterance(utt, "decode_failed", `Opus decoding failed: ${err.message}`);
      }
      return;
    }
    this.pushPcm(utt, buffer);
  }

  pushPcm(utt, buffer) {
    // Keep a partial sample for the next frame, should the server ever split one.
    let data = new Uint8Array(buffer);
    if (utt.carry) {
      const joined = new Uint8Array(utt.carry.length + data.length);
      joined.set(utt.carry);
      joined.set(data, utt.carry.length);
      data = joined;
      utt.carry = null;
    }
    const width = utt.format === "pcm_f32le" ? 4 : 2;
    const whole = data.length - (data.length % width);
    if (whole < data.length) utt.carry = data.slice(whole);
    const view = new DataView(data.buffer, data.byteOffset, whole);
    const samples = new Float32Array(whole / width);
    this.state.received_audio_ms += (samples.length / this.state.sample_rate) * 1000;
    if (width === 4) for (let i = 0; i < samples.length; i++) samples[i] = view.getFloat32(i * 4, true);
    else for (let i = 0; i < samples.length; i++) samples[i] = view.getInt16(i * 2, true) / 32768;
    this.pushSamples(utt, samples);
  }

  pushSamples(utt, samples) {
    if (utt.stopped || utt !== this.current || !this.audio) return;
    this.audio.node.port.postMessage({ type: "push", id: utt.id, samples }, [samples.buffer]);
  }

  onControl(msg) {
    const ctx = this.findContext(msg.context_id);
    switch (msg.type) {
      case "mark":
        if (ctx) ctx.marks.push({ text_offset: msg.text_offset, audio_ms: msg.audio_ms });
        break;
      case "flushed":
        break;
      case "warning":
        // the utterance goes on; the page says what was not spoken
        this.state.last_warning = { code: msg.code, message: msg.message, skipped: msg.skipped ?? null };
        this.dispatchEvent(new CustomEvent("serverwarning", { detail: this.state.last_warning }));
        break;
      case "done":
        this.state.done_acks += 1;
        if (!ctx) break;
        this.retire(ctx);
        ctx.serverDone = true;
        if (msg.stats) this.state.last_stats = msg.stats;
        if (!ctx.stopped) this.endPlayback(ctx);
        break;
      case "cancelled":
        this.state.cancelled_acks += 1;
        if (ctx) this.retire(ctx);
        break;
      case "error": {
        this.setError(msg.code, msg.message, Boolean(msg.fatal));
        // A context the server rejected will never see done/cancelled: retire it so that the
        // binary frames of the next context are not attributed to it.
        const failed = msg.context_id != null ? ctx : this.current && !this.current.serverDone ? this.current : null;
        if (failed) {
          this.retire(failed);
          this.failUtterance(failed, msg.code, msg.message);
        }
        break;
      }
      default:
        break;
    }
    this.emit();
  }

  // All audio of the context has arrived: let the decoder drain, then tell the worklet.
  async endPlayback(utt) {
    try {
      if (utt.decoder) await utt.decoder.flush();
    } catch {
      // closed by a stop in the meantime
    }
    if (utt.stopped || utt !== this.current || !this.audio) return;
    this.audio.node.port.postMessage({ type: "end", id: utt.id });
  }

  updateBitrate() {
    const now = performance.now();
    while (this.arrivals.length && now - this.arrivals[0][0] > 1000) this.arrivals.shift();
    const bytes = this.arrivals.reduce((sum, [, b]) => sum + b, 0);
    const kbps = Math.round((bytes * 8) / 100) / 10;
    if (kbps !== this.state.bitrate_kbps) {
      this.state.bitrate_kbps = kbps;
      this.emit();
    }
  }

  // ---- utterances ---------------------------------------------------------------------------

  async resolveFormat(format, sampleRate) {
    if (format !== "opus") return { format, sampleRate, fallback: false };
    if (OPUS_RATES.has(sampleRate) && (await opusDecodingSupported(sampleRate))) {
      return { format, sampleRate, fallback: false };
    }
    // PCM may not exist at every Opus rate (12 kHz): take the next rate up the server offers.
    const pcm = this.pcmRates;
    let rate = sampleRate;
    if (pcm && pcm.length && !pcm.includes(rate)) rate = pcm.find((r) => r >= sampleRate) ?? pcm[pcm.length - 1];
    return { format: "pcm_s16le", sampleRate: rate, fallback: true };
  }

  // Speak text: all at once, or streamed token by token like an LLM (tokensPerSecond > 0).
  // Resolves when the audio has finished playing, or was stopped.
  speak(text, opts = {}) {
    return this.speakStream((signal) => textDeltas(text, opts.tokensPerSecond || 0, signal), opts);
  }

  // makeDeltas(signal) -> async iterable of text deltas (each is sent as it arrives).
  async speakStream(makeDeltas, { format = "opus", sampleRate = 48000, voice = null } = {}) {
    this.stop();
    // Until the audio path and the socket are ready, stop() cancels this pending request.
    const pending = { stopped: false };
    this.pending = pending;
    this.playId = null; // ignore the stopped utterance's last worklet reports
    Object.assign(this.state, { speaking: true, playback: "buffering", ttfa_ms: null, ttfa_play_ms: null,
      buffered_ms: 0, played_ms: 0, underruns: 0, utterance_bytes: 0, received_audio_ms: 0, chars_sent: 0, heard_offset: 0,
      last_error: null, last_warning: null, context_id: null });
    this.emit();
    const stoppedResult = { ttfa_ms: null, ttfa_play_ms: null, played_ms: 0, underruns: 0, stopped: true, bytes: 0, stats: null };
    let resolved, node;
    try {
      // A request stopped (or superseded) during setup must not go on to touch the socket.
      resolved = await this.resolveFormat(format, sampleRate);
      if (pending.stopped) return stoppedResult;
      ({ node } = await this.ensureAudio(resolved.sampleRate));
      if (pending.stopped) return stoppedResult;
      await this.connect({ voice, format: resolved.format, sampleRate: resolved.sampleRate });
    } catch (err) {
      if (this.pending === pending) {
        this.pending = null;
        this.state.speaking = false;
        this.state.playback = "idle";
        this.emit();
      }
      if (!pending.stopped) throw err;
    }
    if (pending.stopped || this.pending !== pending) return stoppedResult;
    this.pending = null;

    const rate = this.state.sample_rate;
    const utt = {
      id: ++this.nextId,
      contextId: `u${this.nextId}-${Math.random().toString(36).slice(2, 8)}`,
      format: this.state.format,
      decoder: null,
      carry: null,
      marks: [],
      firstSendAt: null,
      firstAudioAt: null,
      playStartAt: null,
      stopped: false,
      opened: false, // the server has seen this context_id
      serverDone: false,
      abort: new AbortController(),
    };
    utt.promise = new Promise((resolve, reject) => {
      utt.resolve = resolve;
      utt.reject = reject;
    });
    if (utt.format === "opus") {
      utt.decoder = new OpusStreamDecoder(
        rate,
        (samples) => this.pushSamples(utt, samples),
        (err) => this.failUtterance(utt, "decode_failed", `Opus decoding failed: ${err.message || err}`),
      );
    }
    this.current = utt;
    this.contexts.push(utt);
    Object.assign(this.state, {
      context_id: utt.contextId,
      decoder: utt.decoder ? "webcodecs-opus" : "pcm",
      opus_fallback: resolved.fallback,
      utterances: this.state.utterances + 1,
    });
    this.sentText = "";
    this.playId = utt.id;
    node.port.postMessage({ type: "begin", id: utt.id, inputRate: rate, prebufferMs: this.prebufferMs });
    this.emit();

    this.pump(utt, makeDeltas);
    return utt.promise;
  }

  async pump(utt, makeDeltas) {
    try {
      for await (const delta of makeDeltas(utt.abort.signal)) {
        if (utt.stopped || utt.settled) return;
        if (!delta) continue;
        if (utt.firstSendAt === null) utt.firstSendAt = performance.now();
        this.send({ type: "text", text: delta, context_id: utt.contextId });
        utt.opened = true;
        this.sentText += delta;
        this.state.chars_sent = this.sentText.length;
        this.dispatchEvent(new CustomEvent("textsent", { detail: delta }));
        this.emit();
      }
      if (utt.stopped || utt.settled) return;
      if (utt.firstSendAt === null) utt.firstSendAt = performance.now();
      this.send({ type: "end", context_id: utt.contextId });
      utt.opened = true;
    } catch (err) {
      if (utt.stopped || utt.settled) return;
      // The text source failed (e.g. the chat endpoint): cancel what the server has so far.
      this.cancelOnServer(utt);
      this.failUtterance(utt, "text_source", err.message || String(err));
    }
  }

  settle(utt, error, stopped = false) {
    if (utt.settled) return;
    utt.settled = true;
    utt.abort.abort();
    if (utt.decoder) utt.decoder.close();
    if (this.current === utt) {
      this.current = null;
      this.state.speaking = false;
      this.emit();
    }
    if (error) utt.reject(error);
    else
      utt.resolve({
        ttfa_ms: this.state.ttfa_ms,
        ttfa_play_ms: this.state.ttfa_play_ms,
        played_ms: Math.round(this.state.played_ms),
        underruns: this.state.underruns,
        stopped,
        bytes: this.state.utterance_bytes,
        stats: utt.serverDone ? this.state.last_stats : null,
      });
  }

  failUtterance(utt, code, message) {
    if (utt.settled) return;
    if (code !== this.state.last_error?.code) this.setError(code, message);
    utt.stopped = true;
    if (this.current === utt && this.audio) this.audio.node.port.postMessage({ type: "stop" });
    this.settle(utt, new Error(`${code}: ${message}`));
  }

  abortCurrent(error) {
    const utt = this.current;
    if (!utt) return;
    utt.stopped = true;
    if (this.audio) this.audio.node.port.postMessage({ type: "stop" });
    this.settle(utt, error);
  }

  // A context the server has not heard of yet is only dropped here; one it has finished needs nothing.
  cancelOnServer(utt) {
    if (utt.serverDone || !this.contexts.includes(utt)) return;
    if (!utt.opened) return this.retire(utt);
    try {
      this.send({ type: "cancel", context_id: utt.contextId });
    } catch {
      this.retire(utt);
    }
  }

  // Barge-in: silence now (the worklet fades out within one render quantum and drops its
  // buffer), and cancel the context on the server if it is still producing audio.
  stop() {
    if (this.pending) {
      this.pending.stopped = true;
      this.pending = null;
      this.state.speaking = false;
      this.state.playback = "idle";
      this.emit();
      return true;
    }
    const utt = this.current;
    if (!utt || utt.stopped) return false;
    utt.stopped = true;
    utt.abort.abort();
    if (utt.decoder) utt.decoder.close();
    this.cancelOnServer(utt);
    if (this.audio) this.audio.node.port.postMessage({ type: "stop" });
    // Settle now rather than on the worklet's reply: a new utterance may begin before that reply.
    this.settle(utt, null, true);
    this.state.playback = "stopped";
    this.emit();
    return true;
  }
}
