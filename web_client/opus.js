// Raw Opus packets (one 20 ms packet per WebSocket frame, mono) -> Float32 PCM via WebCodecs.
// WebCodecs exists only in secure contexts (https or localhost) and not in every browser, so
// callers ask `opusDecodingSupported` first and fall back to PCM from the server.

const PACKET_US = 20_000;

export async function opusDecodingSupported(sampleRate) {
  if (typeof AudioDecoder === "undefined" || typeof EncodedAudioChunk === "undefined") return false;
  try {
    const { supported } = await AudioDecoder.isConfigSupported({ codec: "opus", sampleRate, numberOfChannels: 1 });
    return Boolean(supported);
  } catch {
    return false;
  }
}

// Linear resampling for the rare decoder that does not output the stream's rate.
function resample(samples, fromRate, toRate) {
  const length = Math.round((samples.length * toRate) / fromRate);
  const out = new Float32Array(length);
  const step = fromRate / toRate;
  for (let i = 0; i < length; i++) {
    const pos = i * step;
    const j = Math.floor(pos);
    const a = samples[j];
    const b = j + 1 < samples.length ? samples[j + 1] : a;
    out[i] = a + (b - a) * (pos - j);
  }
  return out;
}

export class OpusStreamDecoder {
  // onSamples(Float32Array) receives mono samples at `sampleRate`, in packet order.
  constructor(sampleRate, onSamples, onError) {
    this.sampleRate = sampleRate;
    this.timestamp = 0;
    this.closed = false;
    this.decoder = new AudioDecoder({
      output: (data) => {
        try {
          if (!this.closed) onSamples(this.toMono(data));
        } finally {
          data.close();
        }
      },
      error: (err) => {
        if (!this.closed) onError(err);
      },
    });
    this.decoder.configure({ codec: "opus", sampleRate, numberOfChannels: 1 });
  }

  toMono(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    return data.sampleRate === this.sampleRate ? samples : resample(samples, data.sampleRate, this.sampleRate);
  }

  decode(packet) {
    if (this.closed) return;
    const chunk = new EncodedAudioChunk({
      type: "key",
      timestamp: this.timestamp,
      duration: PACKET_US,
      data: packet,
    });
    this.timestamp += PACKET_US;
    this.decoder.decode(chunk);
  }

  // Resolves once every packet given so far has come out of onSamples.
  async flush() {
    if (this.closed) return;
    await this.decoder.flush();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.decoder.state !== "closed") this.decoder.close();
  }
}
