// AudioWorkletProcessor that plays one utterance at a time from a growable ring buffer.
//
// Why a worklet: audio arrives from the socket in bursts (the server sends as fast as it
// synthesizes), and the render thread must never wait for the main thread. The ring buffer
// absorbs the bursts; a small jitter buffer (prebuffer) protects the start; a short fade-in
// after an underrun and a fade-out on stop keep chunk boundaries and barge-ins click-free.
//
// Messages in (port):
//   {type: "begin", id, inputRate, prebufferMs}  start a new utterance, drop everything queued
//   {type: "push", id, samples: Float32Array}   mono samples at inputRate (ignored if id is stale)
//   {type: "end", id}                           no more samples will come for this utterance
//   {type: "stop"}                              barge-in: fade out within this render quantum, drop all
// Messages out (port):
//   {type: "started", id}                       first sample of the utterance reached the output
//   {type: "stats", id, state, bufferedMs, playedMs, underruns, level}   about 20 per second
//   {type: "finished", id, playedMs, underruns, stopped}

const STATS_INTERVAL_S = 0.05;
const FADE_IN_S = 0.005;

class RingBuffer {
  constructor(capacity) {
    this.data = new Float32Array(capacity);
    this.read = 0; // index of the oldest sample
    this.size = 0; // samples stored
  }

  clear() {
    this.read = 0;
    this.size = 0;
  }

  // Grows instead of overwriting: an utterance that arrives faster than real time must not lose audio.
  write(samples) {
    if (this.size + samples.length > this.data.length) {
      let capacity = this.data.length * 2;
      while (capacity < this.size + samples.length) capacity *= 2;
      const grown = new Float32Array(capacity);
      for (let i = 0; i < this.size; i++) grown[i] = this.data[(this.read + i) % this.data.length];
      this.data = grown;
      this.read = 0;
    }
    const cap = this.data.length;
    let w = (this.read + this.size) % cap;
    const first = Math.min(samples.length, cap - w);
    this.data.set(samples.subarray(0, first), w);
    if (first < samples.length) this.data.set(samples.subarray(first), 0);
    this.size += samples.length;
  }

  // Sample at offset i from the read position (i < size).
  at(i) {
    return this.data[(this.read + i) % this.data.length];
  }

  skip(n) {
    n = Math.min(n, this.size);
    this.read = (this.read + n) % this.data.length;
    this.size -= n;
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new RingBuffer(sampleRate * 4);
    this.id = null;
    this.inputRate = sampleRate;
    this.step = 1; // input samples per output sample
    this.frac = 0; // fractional read position between ring[0] and ring[1]
    this.prebuffer = 0; // input samples needed before (re)starting
    // idle -> buffering -> playing <-> rebuffering -> idle
    this.state = "idle";
    this.ended = false;
    this.started = false;
    this.consumed = 0; // input samples played
    this.underruns = 0;
    this.gain = 1;
    this.fadeIn = false;
    this.stopping = false;
    this.sumSquares = 0;
    this.levelFrames = 0;
    this.sinceStats = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "begin") {
      this.ring.clear();
      this.id = msg.id;
      this.inputRate = msg.inputRate;
      this.step = msg.inputRate / sampleRate;
      this.frac = 0;
      this.prebuffer = Math.round((msg.prebufferMs / 1000) * msg.inputRate);
      this.state = "buffering";
      this.ended = false;
      this.started = false;
      this.consumed = 0;
      this.underruns = 0;
      this.gain = 1;
      this.fadeIn = false;
      this.stopping = false;
    } else if (msg.type === "push") {
      if (msg.id !== this.id || this.state === "idle" || this.stopping) return;
      this.ring.write(msg.samples);
    } else if (msg.type === "end") {
      if (msg.id === this.id) this.ended = true;
    } else if (msg.type === "stop") {
      // Drop the queue now; the next render quantum fades the sound that is still playing to zero.
      if (this.state === "idle") return;
      this.stopping = true;
    }
  }

  bufferedMs() {
    return (this.ring.size / this.inputRate) * 1000;
  }

  finish(stopped) {
    const playedMs = (this.consumed / this.inputRate) * 1000;
    this.port.postMessage({ type: "finished", id: this.id, playedMs, underruns: this.underruns, stopped });
    this.ring.clear();
    this.state = "idle";
    this.stopping = false;
    this.postStats();
  }

  postStats() {
    const level = this.levelFrames ? Math.sqrt(this.sumSquares / this.levelFrames) : 0;
    this.sumSquares = 0;
    this.levelFrames = 0;
    this.sinceStats = 0;
    this.port.postMessage({
      type: "stats",
      id: this.id,
      state: this.state,
      bufferedMs: this.bufferedMs(),
      playedMs: (this.consumed / this.inputRate) * 1000,
      underruns: this.underruns,
      level,
    });
  }

  // Linear interpolation between neighbouring input samples; exact copy when the rates match.
  nextSample() {
    const ring = this.ring;
    const a = ring.at(0);
    const b = ring.size > 1 ? ring.at(1) : a;
    const value = a + (b - a) * this.frac;
    this.frac += this.step;
    const whole = Math.floor(this.frac);
    if (whole > 0) {
      ring.skip(whole);
      this.consumed += whole;
      this.frac -= whole;
    }
    return value;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const n = out.length;
    out.fill(0);

    if (this.stopping) {
      // Fade out whatever was audible over this one quantum, then silence.
      for (let i = 0; i < n && this.ring.size > 0; i++) {
        out[i] = this.nextSample() * this.gain * (1 - (i + 1) / n);
      }
      this.finish(true);
    } else if (this.state === "buffering" || this.state === "rebuffering") {
      if (this.ring.size >= this.prebuffer || (this.ended && this.ring.size > 0)) {
        this.fadeIn = this.state === "rebuffering";
        this.gain = this.fadeIn ? 0 : 1;
        this.state = "playing";
      } else if (this.ended && this.ring.size === 0) {
        this.finish(false);
      }
    }

    if (this.state === "playing") {
      const fadeStep = 1 / Math.max(1, FADE_IN_S * sampleRate);
      let i = 0;
      for (; i < n && this.ring.size > 0; i++) {
        if (this.fadeIn) {
          this.gain = Math.min(1, this.gain + fadeStep);
          if (this.gain >= 1) this.fadeIn = false;
        }
        const v = this.nextSample() * this.gain;
        out[i] = v;
        this.sumSquares += v * v;
      }
      this.levelFrames += i;
      if (i > 0 && !this.started) {
        this.started = true;
        this.port.postMessage({ type: "started", id: this.id });
      }
      if (this.ring.size === 0 && this.ended) {
        this.finish(false);
      } else if (i < n) {
        // Starved mid-quantum while the utterance is still open: count it, fade back in once refilled.
        this.underruns += 1;
        this.state = "rebuffering";
      }
    }

    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);

    this.sinceStats += n / sampleRate;
    if (this.sinceStats >= STATS_INTERVAL_S && this.state !== "idle") this.postStats();
    return true;
  }
}

registerProcessor("tts-player", PlayerProcessor);
