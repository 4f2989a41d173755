"""Turn engine audio (mono float32 at the engine's rate) into the frames a client asked for.

One encoder per utterance: it owns a :class:`StreamResampler` to the output rate and returns frames
that are ready to send as soon as they exist.  PCM and G.711 hold nothing back (beyond the
resampler's filter tail); Opus holds at most one unfinished 20 ms frame.

Opus notes (libopus through PyAV):

* raw: every returned frame is exactly one 20 ms Opus packet.  The encoder's lookahead ("pre-skip",
  312 samples at 48 kHz = 6.5 ms, see :attr:`OpusEncoder.pre_skip`) means the first 6.5 ms a decoder
  produces are warm-up, and the real audio ends 6.5 ms later than the input did; so :meth:`finish`
  pads the last partial frame with zeros and adds packets until the padded stream covers
  ``real audio + pre-skip``: ``ceil((n + pre_skip) / frame)`` packets in all.
* ogg: we write the Ogg pages ourselves (RFC 3533 / RFC 7845), one packet per page, each page as
  soon as its packet exists.  FFmpeg's Ogg muxer (through PyAV 18.1) keeps the newest page until the
  next packet arrives, so that it can flag the last one, and PyAV offers no muxer flush; that would
  hold 20 ms more than a packet.  The last page carries the end-of-stream flag and a granule position
  that trims the padding, so decoders return exactly the real audio.
* application "audio" (libopus: "as close as possible to the input") rather than "voip" (favours
  intelligibility, adds speech-only processing): synthetic speech is clean and we want it unaltered;
  "lowdelay" would drop the pre-skip to 2.5 ms but disables the speech (SILK) layer.

``samples_out`` counts output-rate samples of real audio (never padding) carried by the frames
returned so far; after :meth:`AudioEncoder.finish` it is ``round(n_in * sample_rate / source_rate)``
(plus at most a sample per :meth:`AudioEncoder.flush`, which restarts the resampler).

:meth:`AudioEncoder.flush` is for the protocol's ``flush``: it sends out all that is held without
ending the stream, at the price of a little inserted silence for Opus.  Raw Opus clients should drop
the first ``pre_skip`` samples (48 kHz units) they decode; :attr:`OpusEncoder.opus_head` has it too.
"""

from __future__ import annotations

import fractions
import random
import struct
import zlib
from abc import ABC, abstractmethod

import av
import numpy as np

from .formats import (  # noqa: F401  (re-exported: the encoders' public API)
    COMMON_RATES,
    CONTAINERS,
    FORMATS,
    OPUS_RATES,
    allowed_sample_rates,
    default_sample_rate,
    validate_audio_format,
)
from .g711 import linear_to_alaw, linear_to_ulaw
from .resample import StreamResampler

OPUS_FRAME_MS = 20
DEFAULT_OPUS_BITRATE = 32_000
DEFAULT_OPUS_APPLICATION = "audio"


def clean(x: np.ndarray) -> np.ndarray:
    """float32 clipped to [-1, 1] with NaN as silence.  Called for every 20 ms frame, so it avoids
    ``np.nan_to_num``, whose Python-level overhead dominated the service's per-frame cost."""
    y = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    y[np.isnan(y)] = 0.0
    return y


def to_int16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16, clipped and rounded (NaN becomes silence)."""
    return np.rint(clean(x) * 32767.0).astype(np.int16)


class AudioEncoder(ABC):
    """Engine-rate float32 in, ready-to-send frames out.  Subclasses see output-rate audio only."""

    content_type: str

    def __init__(self, format: str, sample_rate: int, container: str, source_rate: int) -> None:
        self.format = format
        self.sample_rate = int(sample_rate)
        self.container = container
        self.source_rate = int(source_rate)
        self.samples_out = 0
        self._resampler = StreamResampler(self.source_rate, self.sample_rate)
        self._finished = False

    def encode(self, samples: np.ndarray) -> list[bytes]:
        """Frames for the next chunk of engine audio (possibly none while a frame fills up)."""
        if self._finished:
            raise RuntimeError("encode() after finish()")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim > 1 and samples.size != samples.shape[0]:
            raise ValueError(f"expected mono audio, got shape {samples.shape}")
        return self._encode(self._resampler.process(samples.reshape(-1)))

    def flush(self) -> list[bytes]:
        """Everything held so far, keeping the stream open: for the protocol's ``flush``, whose
        audio must be complete on the client before ``flushed`` is sent.

        Costs a resampler restart (see :meth:`StreamResampler.drain`) and, for Opus, up to one frame
        plus the lookahead of inserted silence (not counted in ``samples_out``).
        """
        if self._finished:
            raise RuntimeError("flush() after finish()")
        return self._flush(self._resampler.drain())

    def finish(self) -> list[bytes]:
        """Everything still held: resampler tail, the last (padded) frame, end-of-stream markers."""
        if self._finished:
            return []
        self._finished = True
        return self._finish(self._resampler.flush())

    @abstractmethod
    def _encode(self, y: np.ndarray) -> list[bytes]: ...

    @abstractmethod
    def _flush(self, y: np.ndarray) -> list[bytes]: ...

    @abstractmethod
    def _finish(self, y: np.ndarray) -> list[bytes]: ...


# -- PCM and G.711 --------------------------------------------------------------------------------

# format -> (WAVE format tag, bits per sample, sample packer)
_SAMPLE_CODECS = {
    "pcm_s16le": (1, 16, lambda y: to_int16(y).astype("<i2").tobytes()),
    "pcm_f32le": (3, 32, lambda y: clean(y).astype("<f4").tobytes()),
    "mulaw": (7, 8, lambda y: linear_to_ulaw(to_int16(y)).tobytes()),
    "alaw": (6, 8, lambda y: linear_to_alaw(to_int16(y)).tobytes()),
}
_UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(format_tag: int, sample_rate: int, bits: int) -> bytes:
    """Mono WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF).

    PCM gets the classic 44 bytes; IEEE float and G.711 are "non-PCM" in the WAVE spec, which asks
    for the 18-byte fmt chunk (cbSize = 0) and a ``fact`` chunk (sample count, also unknown): 58 bytes.
    soundfile (libsndfile), PyAV (FFmpeg's wav demuxer) read all four until the end of the data;
    Python's ``wave`` reads the PCM one and refuses the others (it knows only PCM).
    """
    block = bits // 8
    fields = (format_tag, 1, sample_rate, sample_rate * block, block, bits)
    if format_tag == 1:
        chunks = struct.pack("<4sIHHIIHH", b"fmt ", 16, *fields)
    else:
        chunks = struct.pack("<4sIHHIIHHH", b"fmt ", 18, *fields, 0)
        chunks += struct.pack("<4sII", b"fact", 4, _UNKNOWN_SIZE)
    chunks += struct.pack("<4sI", b"data", _UNKNOWN_SIZE)
    return struct.pack("<4sI4s", b"RIFF", _UNKNOWN_SIZE, b"WAVE") + chunks


class SampleEncoder(AudioEncoder):
    """Little-endian PCM or 8-bit G.711, raw or after a streaming WAV header; holds nothing.

    With ``frame_samples`` the encoded bytes of each call are cut into frames of at most that many
    samples, so a whole engine chunk is converted in one numpy pass (per-frame conversion was a
    large share of the service's cost per frame) and still leaves as frames of the configured size.
    """

    def __init__(
        self,
        format: str,
        sample_rate: int,
        container: str,
        source_rate: int,
        frame_samples: int | None = None,
    ) -> None:
        super().__init__(format, sample_rate, container, source_rate)
        tag, bits, self._pack = _SAMPLE_CODECS[format]
        self._frame_bytes = frame_samples * bits // 8 if frame_samples else None
        self._header = wav_header(tag, self.sample_rate, bits) if container == "wav" else None
        if container == "wav":
            self.content_type = "audio/wav"
        elif format == "mulaw":
            self.content_type = (
                "audio/basic" if self.sample_rate == 8000 else f"audio/PCMU;rate={self.sample_rate}"
            )
        elif format == "alaw":
            self.content_type = f"audio/PCMA;rate={self.sample_rate}"
        else:
            # audio/L16 is big-endian by definition (RFC 2586), so it would mislabel our samples.
            self.content_type = f"audio/pcm;rate={self.sample_rate};channels=1;format={format[4:]}"

    def _frames(self, y: np.ndarray) -> list[bytes]:
        frames = []
        if self._header is not None:
            frames.append(self._header)
            self._header = None
        if y.size:
            data = self._pack(y)
            step = self._frame_bytes or len(data)
            frames.extend(data[i : i + step] for i in range(0, len(data), step))
            self.samples_out += y.size
        return frames

    _encode = _frames
    _flush = _frames
    _finish = _frames


# -- Opus -----------------------------------------------------------------------------------------

_CRC_REFLECT = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (poly 0x04C11DB7, MSB first, no init/xor), computed with zlib's reflected CRC.

    A reflected CRC of bit-reversed bytes is the bit-reversed plain CRC, and subtracting the CRC of as
    many zero bytes cancels zlib's 0xFFFFFFFF init and final xor; both run in C.
    """
    crc = zlib.crc32(data.translate(_CRC_REFLECT)) ^ zlib.crc32(bytes(len(data)))
    return int(f"{crc:032b}"[::-1], 2)


class OggPageWriter:
    """One logical Ogg stream, one packet per page (packets < 64 KiB, as Opus packets are)."""

    BOS, EOS = 0x02, 0x04

    def __init__(self, serial: int | None = None) -> None:
        self.serial = random.getrandbits(32) if serial is None else serial
        self.sequence = 0

    def page(self, packet: bytes, granule: int, flags: int = 0) -> bytes:
        if len(packet) >= 255 * 255:
            raise ValueError("packet too large for a single Ogg page")
        n_full, last = divmod(len(packet), 255)
        lacing = bytes([255] * n_full + [last])
        header = struct.pack(
            "<4sBBqIIIB", b"OggS", 0, flags, granule, self.serial, self.sequence, 0, len(lacing)
        )
        page = header + lacing + packet
        self.sequence += 1
        return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def opus_tags(vendor: str = "cosyvoice-realtime") -> bytes:
    v = vendor.encode()
    return b"OpusTags" + struct.pack("<I", len(v)) + v + struct.pack("<I", 0)


class OpusEncoder(AudioEncoder):
    """20 ms Opus packets (raw) or an Ogg Opus stream paged per packet (ogg)."""

    def __init__(
        self,
        sample_rate: int,
        container: str,
        source_rate: int,
        bitrate: int = DEFAULT_OPUS_BITRATE,
        application: str = DEFAULT_OPUS_APPLICATION,
    ) -> None:
        super().__init__("opus", sample_rate, container, source_rate)
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = self.sample_rate
        codec.layout = "mono"
        codec.format = "flt"
        codec.bit_rate = int(bitrate)
        codec.time_base = fractions.Fraction(1, self.sample_rate)
        codec.options = {"application": application, "frame_duration": str(OPUS_FRAME_MS)}
        codec.open()
        self._codec = codec
        self.frame_size = self.sample_rate * OPUS_FRAME_MS // 1000  # samples per packet at our rate
        self.opus_head = bytes(codec.extradata)  # RFC 7845 identification header, from libopus
        self.pre_skip = struct.unpack_from("<H", self.opus_head, 10)[0]  # always in 48 kHz samples
        self._to_48k = 48000 // self.sample_rate
        self._pre_skip_here = -(-self.pre_skip // self._to_48k)  # at our rate, rounded up
        self._pending = np.zeros(0, dtype=np.float32)  # < one frame, waiting for more audio
        self._real = 0  # real (not padding) samples handed to libopus
        self._real_end = 0  # where the real audio ends on the codec's timeline (flush() pads)
        self._packets = 0
        self._ogg = OggPageWriter() if container == "ogg" else None
        self._headers_sent = False
        self.content_type = "audio/ogg; codecs=opus" if container == "ogg" else "audio/opus"

    def _packet(self, frame: np.ndarray, real: int) -> bytes:
        f = av.AudioFrame.from_ndarray(frame[None, :], format="flt", layout="mono")
        f.sample_rate = self.sample_rate
        f.pts = self._packets * self.frame_size
        if real:
            self._real_end = self._packets * self.frame_size + real
        packets = self._codec.encode(f)
        if len(packets) != 1:  # libopus emits one packet per frame at once; anything else is a bug
            raise RuntimeError(f"libopus returned {len(packets)} packets for one frame")
        self._packets += 1
        self._real += real
        self.samples_out = self._real
        return bytes(packets[0])

    def _headers(self) -> list[bytes]:
        if self._ogg is None or self._headers_sent:
            return []
        self._headers_sent = True
        return [self._ogg.page(self.opus_head, 0, OggPageWriter.BOS) + self._ogg.page(opus_tags(), 0)]

    def _wrap(self, packet: bytes, last: bool) -> bytes:
        if self._ogg is None:
            return packet
        granule = self._packets * OPUS_FRAME_MS * 48
        if last:  # end trimming (within the last packet only): where the real audio stops
            end = max(self.pre_skip + self._real_end * self._to_48k, granule - OPUS_FRAME_MS * 48)
            return self._ogg.page(packet, end, OggPageWriter.EOS)
        return self._ogg.page(packet, granule)

    def _encode(self, y: np.ndarray) -> list[bytes]:
        frames = self._headers()
        buf = np.concatenate([self._pending, clean(y)])
        n_full = buf.size // self.frame_size * self.frame_size
        for i in range(0, n_full, self.frame_size):
            frames.append(self._wrap(self._packet(buf[i : i + self.frame_size], self.frame_size), last=False))
        self._pending = buf[n_full:].copy()
        return frames

    def _pad_out(self, final: bool) -> list[bytes]:
        """Encode the pending partial frame zero-padded, plus what it takes to get the last real
        sample past the encoder's lookahead, so that a decoder can output all audio fed so far.
        The final call always writes a packet in Ogg, whose page carries the end-of-stream flag."""
        pending, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        start = self._packets * self.frame_size
        real_end = start + pending.size if pending.size else self._real_end
        n_new = -(-(real_end + self._pre_skip_here) // self.frame_size) - self._packets if real_end else 0
        if final and self._ogg is not None:
            n_new = max(n_new, 1)
        frames = []
        for k in range(n_new):
            frame = np.zeros(self.frame_size, dtype=np.float32)
            real = pending.size if k == 0 else 0
            frame[:real] = pending[:real]
            frames.append(self._wrap(self._packet(frame, real), last=final and k == n_new - 1))
        return frames

    def _flush(self, y: np.ndarray) -> list[bytes]:
        return self._encode(y) + self._pad_out(final=False)

    def _finish(self, y: np.ndarray) -> list[bytes]:
        # An Ogg stream without audio still gets one silent packet, trimmed away by its granule:
        # FFmpeg refuses to open an Ogg Opus stream that has headers only.
        return self._encode(y) + self._pad_out(final=True)


# -- MP3, AAC, FLAC (HTTP downloads) -------------------------------------------------------------

# format -> (PyAV muxer, codec, content type): whole-response formats of the HTTP routes (the
# OpenAI speech API); they cannot flush mid-stream, so the WebSocket protocol does not offer them
CODECS = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
}


class _Bytes:
    """A write-only, unseekable file for a muxer: what it writes is taken after every packet."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out


class CodecEncoder(AudioEncoder):
    """MP3 (raw frames), AAC (ADTS) or FLAC through FFmpeg's encoder and muxer, streamed: every
    muxed packet is written out at once (``flush_packets``), so bytes leave as soon as the codec
    has a frame (MP3 after about 60 ms of audio, FLAC per 4608-sample block).  The output is not
    seekable, so MP3 has no Xing header and FLAC's STREAMINFO leaves the total length unset, as
    in any live stream; decoders read both."""

    def __init__(self, format: str, sample_rate: int, source_rate: int, bitrate: int | None = None) -> None:
        super().__init__(format, sample_rate, "raw", source_rate)
        muxer, codec, self.content_type = CODECS[format]
        self._out = _Bytes()
        self._container = av.open(
            self._out, "w", format=muxer, options={"flush_packets": "1"}, buffer_size=4096
        )
        self._stream = self._container.add_stream(codec, rate=self.sample_rate, layout="mono")
        if bitrate and format != "flac":
            self._stream.codec_context.bit_rate = bitrate
        self._resample = av.AudioResampler(
            format=self._stream.codec_context.format.name, layout="mono", rate=self.sample_rate
        )

    def _mux(self, y: np.ndarray | None) -> list[bytes]:
        if y is None:
            packets = self._stream.encode(None)
        else:
            if not y.size:
                return []
            frame = av.AudioFrame.from_ndarray(clean(y).reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            packets = [p for f in self._resample.resample(frame) for p in self._stream.encode(f)]
            self.samples_out += y.size
        for packet in packets:
            self._container.mux(packet)
        data = self._out.take()
        return [data] if data else []

    def _encode(self, y: np.ndarray) -> list[bytes]:
        return self._mux(y)

    def _flush(self, y: np.ndarray) -> list[bytes]:  # the codec keeps its frame in progress
        return self._mux(y)

    def _finish(self, y: np.ndarray) -> list[bytes]:
        frames = self._mux(y) + self._mux(None)
        self._container.close()
        data = self._out.take()
        return frames + ([data] if data else [])


def make_encoder(
    format: str,
    sample_rate: int,
    container: str,
    source_rate: int,
    *,
    bitrate: int = DEFAULT_OPUS_BITRATE,
    application: str = DEFAULT_OPUS_APPLICATION,
    frame_ms: int | None = None,
) -> AudioEncoder:
    """Encoder for validated options (see :func:`validate_audio_format`); raises ValueError otherwise.

    ``bitrate`` and ``application`` apply to Opus only; ``frame_ms`` cuts PCM and G.711 output into
    frames of that duration (Opus packets are always 20 ms).
    """
    if isinstance(format, str) and format in CODECS:
        if container != "raw" or not sample_rate:
            raise ValueError(f"{format} is raw and needs a sample_rate")
        return CodecEncoder(format, sample_rate, source_rate)
    error = validate_audio_format(format, sample_rate, container, source_rate)
    if error is not None or sample_rate is None:
        raise ValueError(error or "sample_rate is required (apply default_sample_rate first)")
    if format == "opus":
        return OpusEncoder(sample_rate, container, source_rate, bitrate=bitrate, application=application)
    frame_samples = sample_rate * frame_ms // 1000 if frame_ms else None
    return SampleEncoder(format, sample_rate, container, source_rate, frame_samples)
