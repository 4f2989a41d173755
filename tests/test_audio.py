"""Audio encoders and the streaming resampler, checked with decoders we did not write.

Every format/container/rate is encoded from a 440 Hz sine fed in irregular chunks and decoded with
FFmpeg (PyAV), libsndfile (soundfile) or plain numpy; G.711 is compared bit for bit with a table
built from the G.711 decision levels.
"""

from __future__ import annotations

import io
import math
import struct
import wave

import av
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.audio.encoders import (
    CODECS,
    CONTAINERS,
    FORMATS,
    AudioEncoder,
    default_sample_rate,
    make_encoder,
    ogg_crc,
    validate_audio_format,
)
from realtime.audio.g711 import linear_to_alaw, linear_to_ulaw
from realtime.audio.resample import StreamResampler

SOURCE_RATE = 22050  # the default Piper voice
TONE_HZ = 440.0
AMPLITUDE = 0.5
CHUNKS = (37, 1000, 333, 2048, 5, 4410, 1, 777)


def sine(rate: int = SOURCE_RATE, seconds: float = 1.0, hz: float = TONE_HZ) -> np.ndarray:
    return (AMPLITUDE * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def chunks(x: np.ndarray):
    i = k = 0
    while i < x.size:
        n = CHUNKS[k % len(CHUNKS)]
        yield x[i : i + n]
        i += n
        k += 1


def feed(enc: AudioEncoder, x: np.ndarray) -> list[list[bytes]]:
    """Frames returned by each encode() call, then by finish() as the last entry."""
    calls = [enc.encode(c) for c in chunks(x)]
    calls.append(enc.finish())
    return calls


def flat(calls: list[list[bytes]]) -> list[bytes]:
    return [f for frames in calls for f in frames]


def dominant_hz(y: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size), n=8 * y.size))
    return float(np.argmax(spectrum) * rate / (8 * y.size))


def assert_tone(y: np.ndarray, rate: int, rms_tol: float = 0.03) -> None:
    """RMS and pitch of the middle of a decoded sine (edges skip filter and codec warm-up)."""
    core = np.asarray(y, dtype=np.float64)[rate // 20 : -rate // 20]
    rms = math.sqrt(float(np.mean(core**2)))
    assert rms == pytest.approx(AMPLITUDE / math.sqrt(2), rel=rms_tol)
    assert dominant_hz(core, rate) == pytest.approx(TONE_HZ, abs=3.0)


def av_decode_container(blob: bytes) -> tuple[np.ndarray, int, str]:
    with av.open(io.BytesIO(blob)) as c:
        stream = c.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in c.decode(stream)]
        name, rate = stream.codec_context.name, stream.codec_context.sample_rate
    y = np.concatenate(frames) if frames else np.zeros(0)
    if y.dtype == np.int16:
        y = y / 32768.0
    return y.astype(np.float64), rate, name


def av_decode_raw(codec: str, data: bytes, rate: int) -> np.ndarray:
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate = rate
    ctx.layout = "mono"
    frames = [f.to_ndarray().reshape(-1) for f in ctx.decode(av.Packet(data))]
    return np.concatenate(frames).astype(np.float64) / 32768.0


PCM_LIKE = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
PCM_RATES = (8000, 16000, 24000, 48000, SOURCE_RATE)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


# -- every format x container x rate, decoded independently -------------------------------------


@pytest.mark.parametrize("rate", PCM_RATES)
@pytest.mark.parametrize("container", ("raw", "wav"))
@pytest.mark.parametrize("fmt", PCM_LIKE)
def test_pcm_and_g711_roundtrip(fmt: str, container: str, rate: int) -> None:
    x = sine()
    enc = make_encoder(fmt, rate, container, SOURCE_RATE)
    calls = feed(enc, x)
    frames = flat(calls)
    expected = round(x.size * rate / SOURCE_RATE)
    assert abs(enc.samples_out - expected) <= 2
    assert enc.sample_rate == rate
    assert all(frames), "no empty frames are sent"

    if container == "wav":
        header = frames[0]
        assert len(header) == (44 if fmt == "pcm_s16le" else 58)
        assert enc.content_type == "audio/wav"
        blob = b"".join(frames)
        y, sf_rate = sf.read(io.BytesIO(blob), dtype="float64")
        info = sf.info(io.BytesIO(blob))
        assert sf_rate == rate
        assert (
            info.subtype
            == {"pcm_s16le": "PCM_16", "pcm_f32le": "FLOAT", "mulaw": "ULAW", "alaw": "ALAW"}[fmt]
        )
        y_av, av_rate, codec = av_decode_container(blob)
        assert (codec, av_rate) == (fmt.replace("mulaw", "pcm_mulaw").replace("alaw", "pcm_alaw"), rate)
        np.testing.assert_allclose(y_av, y, atol=1e-4)
    else:
        data = b"".join(frames)
        if fmt == "pcm_s16le":
            y = np.frombuffer(data, "<i2") / 32767.0
        elif fmt == "pcm_f32le":
            y = np.frombuffer(data, "<f4").astype(np.float64)
        else:
            y = av_decode_raw("pcm_" + fmt, data, rate)
        assert len(data) == enc.samples_out * {"pcm_s16le": 2, "pcm_f32le": 4}.get(fmt, 1)
    assert y.size == enc.samples_out
    assert_tone(y, rate, rms_tol=0.02)


@pytest.mark.parametrize("fmt", PCM_LIKE)
def test_native_rate_holds_nothing(fmt: str) -> None:
    """At the engine's rate (CosyVoice2: 24 kHz) every encode() returns all it was given."""
    enc = make_encoder(fmt, 24000, "raw", 24000)
    width = {"pcm_s16le": 2, "pcm_f32le": 4}.get(fmt, 1)
    fed = 0
    for c in chunks(sine(24000)):
        fed += c.size
        assert sum(len(f) for f in enc.encode(c)) == c.size * width
        assert enc.samples_out == fed
    assert enc.finish() == []


@pytest.mark.parametrize("container", ("raw", "wav"))
@pytest.mark.parametrize("fmt", PCM_LIKE)
def test_frame_ms_cuts_each_chunk_into_frames(fmt: str, container: str) -> None:
    """With frame_ms a whole engine chunk is encoded at once and leaves as frames of that duration
    (the last one of a chunk shorter), carrying exactly the bytes of the unframed encoder."""
    width = {"pcm_s16le": 2, "pcm_f32le": 4}.get(fmt, 1)
    framed = make_encoder(fmt, 8000, container, 24000, frame_ms=20)
    whole = make_encoder(fmt, 8000, container, 24000)
    x = sine(24000)
    out_framed, out_whole = [], []
    for c in (x[:7000], x[7000:7001], x[7001:]):
        out_framed += framed.encode(c)
        out_whole += whole.encode(c)
    out_framed += framed.finish()
    out_whole += whole.finish()
    assert b"".join(out_framed) == b"".join(out_whole)
    audio = out_framed[1:] if container == "wav" else out_framed
    assert max(len(f) for f in audio) == 160 * width  # 20 ms at 8 kHz
    assert len(audio) > len(out_whole)
    assert all(audio)


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_opus_raw_packets(rate: int) -> None:
    x = sine()
    enc = make_encoder("opus", rate, "raw", SOURCE_RATE)
    assert enc.content_type == "audio/opus"
    packets = flat(feed(enc, x))
    real = round(x.size * rate / SOURCE_RATE)
    assert abs(enc.samples_out - real) <= 2
    frame = rate // 50
    # The padded stream must also cover the encoder's lookahead, hence pre-skip in the count.
    pre_skip = math.ceil(enc.pre_skip * rate / 48000)
    assert len(packets) == math.ceil((enc.samples_out + pre_skip) / frame)
    for p in packets:  # RFC 6716 TOC: frame count code 0 (one frame) and a 20 ms configuration
        config, code = p[0] >> 3, p[0] & 3
        assert code == 0
        assert (
            (config < 12 and config % 4 == 1)
            or (12 <= config < 16 and config % 2 == 1)
            or (config >= 16 and config % 4 == 3)
        )
    # FFmpeg's own Opus decoder (not libopus), one packet at a time.
    dec = av.CodecContext.create("opus", "r")
    dec.sample_rate, dec.layout, dec.extradata = 48000, "mono", enc.opus_head
    pieces = []
    for p in packets:
        out = [f.to_ndarray().reshape(-1) for f in dec.decode(av.Packet(p))]
        assert sum(o.size for o in out) == (960 - enc.pre_skip if not pieces else 960)
        pieces.extend(out)
    y = np.concatenate(pieces)
    assert y.size - real * 48000 // rate == pytest.approx(0, abs=960 + enc.pre_skip)
    assert_tone(y[: real * 48000 // rate], 48000, rms_tol=0.06)


def test_opus_holds_at_most_one_frame() -> None:
    enc = make_encoder("opus", 48000, "raw", 48000)
    fed = 0
    for c in chunks(sine(48000)):
        fed += c.size
        enc.encode(c)
        assert 0 <= fed - enc.samples_out < 960
    enc.finish()
    assert enc.samples_out == fed


def parse_ogg(blob: bytes) -> list[dict]:
    """Pages of an Ogg stream, checking capture patterns and CRCs on the way (bitwise CRC)."""
    pages, pos = [], 0
    while pos < len(blob):
        assert blob[pos : pos + 4] == b"OggS"
        _, _, flags, granule, serial, seq, crc, n = struct.unpack_from("<4sBBqIIIB", blob, pos)
        lacing = blob[pos + 27 : pos + 27 + n]
        size = 27 + n + sum(lacing)
        page = bytearray(blob[pos : pos + size])
        page[22:26] = b"\0\0\0\0"
        assert crc == bitwise_ogg_crc(bytes(page))
        pages.append(
            {
                "flags": flags,
                "granule": granule,
                "serial": serial,
                "seq": seq,
                "lacing": lacing,
                "body": bytes(page[27 + n :]),
            }
        )
        pos += size
    return pages


def bitwise_ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def test_ogg_crc_matches_bitwise_definition() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 27, 300):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == bitwise_ogg_crc(data)


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_ogg_opus_stream(rate: int) -> None:
    x = sine()
    enc = make_encoder("opus", rate, "ogg", SOURCE_RATE)
    assert enc.content_type == "audio/ogg; codecs=opus"
    calls = feed(enc, x)
    assert calls[0], "headers come out with the first encode()"
    blob = b"".join(flat(calls))
    pages = parse_ogg(blob)
    assert pages[0]["body"].startswith(b"OpusHead") and pages[0]["flags"] == 0x02
    assert pages[1]["body"].startswith(b"OpusTags")
    audio = pages[2:]
    assert all(len(p["lacing"]) == 1 for p in audio), "one packet per page"
    assert [p["flags"] for p in audio] == [0] * (len(audio) - 1) + [0x04]
    assert [p["seq"] for p in pages] == list(range(len(pages)))
    assert len({p["serial"] for p in pages}) == 1
    granules = [p["granule"] for p in audio]
    assert granules[:-1] == [960 * (k + 1) for k in range(len(audio) - 1)]
    real = enc.samples_out
    assert granules[-1] == enc.pre_skip + real * 48000 // rate  # end trimming

    y, out_rate, codec = av_decode_container(blob)  # FFmpeg demuxer + its own Opus decoder
    assert (out_rate, codec) == (48000, "opus")
    assert y.size == real * 48000 // rate  # pre-skip and padding trimmed exactly
    assert_tone(y, 48000, rms_tol=0.06)
    y_sf, sf_rate = sf.read(io.BytesIO(blob))  # libsndfile + libopus, decodes at OpusHead's input rate
    assert (sf_rate, y_sf.size) == (rate, real)
    assert_tone(y_sf, rate, rms_tol=0.06)


@pytest.mark.parametrize("source_rate", (48000, SOURCE_RATE))
def test_ogg_prefix_is_playable_after_every_encode(source_rate: int) -> None:
    x = sine(source_rate)
    enc = make_encoder("opus", 48000, "ogg", source_rate)
    blob, fed = b"", 0
    held_ms = 20 + 6.5 + (0 if source_rate == 48000 else 45)  # frame + pre-skip + soxr HQ tail
    for c in chunks(x):
        fed += c.size
        blob += b"".join(enc.encode(c))
        if enc.samples_out == 0:
            continue  # headers only: nothing to play yet, and FFmpeg will not open it
        y, _, _ = av_decode_container(blob)
        assert y.size >= fed * 48000 / source_rate - held_ms * 48
        assert sf.read(io.BytesIO(blob))[0].size == y.size


def test_ogg_without_audio_is_a_valid_empty_stream() -> None:
    enc = make_encoder("opus", 48000, "ogg", SOURCE_RATE)
    blob = b"".join(enc.finish())
    assert parse_ogg(blob)[-1]["flags"] == 0x04
    y, _, _ = av_decode_container(blob)
    assert y.size == 0 and enc.samples_out == 0
    raw = make_encoder("opus", 48000, "raw", SOURCE_RATE)
    assert raw.finish() == [] and raw.samples_out == 0


# -- flush(): everything so far out, stream stays open -------------------------------------------


@pytest.mark.parametrize("fmt,rate", [("pcm_s16le", 16000), ("mulaw", 8000), ("pcm_f32le", SOURCE_RATE)])
def test_sample_formats_flush_everything(fmt: str, rate: int) -> None:
    enc = make_encoder(fmt, rate, "raw", SOURCE_RATE)
    x = sine()
    first, second = x[:7000], x[7000:]
    for c in chunks(first):
        enc.encode(c)
    enc.flush()
    assert abs(enc.samples_out - round(first.size * rate / SOURCE_RATE)) <= 1
    assert enc.flush() == []
    for c in chunks(second):
        enc.encode(c)
    enc.finish()
    assert abs(enc.samples_out - round(x.size * rate / SOURCE_RATE)) <= 2
    with pytest.raises(RuntimeError):
        enc.flush()


def test_opus_raw_flush_makes_all_audio_decodable() -> None:
    enc = make_encoder("opus", 48000, "raw", 48000)
    x = sine(48000)
    dec = av.CodecContext.create("opus", "r")
    dec.sample_rate, dec.layout, dec.extradata = 48000, "mono", enc.opus_head

    def decode(packets: list[bytes]) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for p in packets for f in dec.decode(av.Packet(p))]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    assert enc.flush() == []  # nothing fed, nothing to say
    y1 = decode([p for c in chunks(x[:10_000]) for p in enc.encode(c)] + enc.flush())
    assert enc.samples_out == 10_000 and y1.size >= 10_000
    assert enc.flush() == []
    gap = y1.size - 10_000  # inserted silence: the padding and the lookahead, at most a frame more
    assert gap < 960 + enc.pre_skip
    y2 = decode([p for c in chunks(x[10_000:]) for p in enc.encode(c)] + enc.finish())
    assert enc.samples_out == x.size
    y = np.concatenate([y1[:10_000], y2])
    assert y.size >= x.size
    assert_tone(y[: x.size], 48000, rms_tol=0.06)


def test_ogg_flush_then_finish() -> None:
    enc = make_encoder("opus", 48000, "ogg", 48000)
    x = sine(48000)
    blob = b"".join(flat([enc.encode(c) for c in chunks(x[:10_000])]) + enc.flush())
    y, _, _ = av_decode_container(blob)
    assert y.size >= 10_000
    blob += b"".join(flat([enc.encode(c) for c in chunks(x[10_000:])]) + enc.flush() + enc.finish())
    pages = parse_ogg(blob)
    assert [p["flags"] for p in pages].count(0x04) == 1 and pages[-1]["flags"] == 0x04
    y, _, _ = av_decode_container(blob)
    silence = y.size - x.size
    assert 0 <= silence < 960 + enc.pre_skip  # the first flush's padding; the last one is trimmed
    y_sf, _ = sf.read(io.BytesIO(blob))
    assert y_sf.size == y.size
    assert enc.samples_out == x.size


# -- WAV streaming header ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", PCM_LIKE)
def test_wav_header_streams(fmt: str) -> None:
    enc = make_encoder(fmt, 16000, "wav", SOURCE_RATE)
    calls = feed(enc, sine())
    header = calls[0][0]
    width = {"pcm_s16le": 2, "pcm_f32le": 4}.get(fmt, 1)
    assert header[:4] == b"RIFF" and header[8:12] == b"WAVE"
    assert struct.unpack_from("<I", header, 4)[0] == 0xFFFFFFFF
    assert header[-8:-4] == b"data" and struct.unpack_from("<I", header, len(header) - 4)[0] == 0xFFFFFFFF
    tag = struct.unpack_from("<H", header, 20)[0]
    assert tag == {"pcm_s16le": 1, "pcm_f32le": 3, "mulaw": 7, "alaw": 6}[fmt]
    if fmt != "pcm_s16le":
        assert b"fact" in header
    # A client that has only part of the stream can already read it.
    blob = b""
    for frames in calls:
        blob += b"".join(frames)
        y, rate = sf.read(io.BytesIO(blob))
        assert rate == 16000 and y.size == (len(blob) - len(header)) // width


def test_wav_s16_readable_by_stdlib_wave() -> None:
    enc = make_encoder("pcm_s16le", 24000, "wav", SOURCE_RATE)
    blob = b"".join(flat(feed(enc, sine())))
    with wave.open(io.BytesIO(blob)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (24000, 2, 1)
        assert len(w.readframes(10**9)) == enc.samples_out * 2


# -- sample conversion ---------------------------------------------------------------------------


def test_s16_clips_and_rounds() -> None:
    enc = make_encoder("pcm_s16le", 24000, "raw", 24000)
    x = np.array(
        [0.0, 1.0, -1.0, 1.7, -3.0, 0.6 / 32767, -0.6 / 32767, 0.4 / 32767, np.nan], dtype=np.float32
    )
    (data,) = enc.encode(x)
    assert np.frombuffer(data, "<i2").tolist() == [0, 32767, -32767, 32767, -32767, 1, -1, 0, 0]


def test_f32_clips() -> None:
    enc = make_encoder("pcm_f32le", 24000, "raw", 24000)
    (data,) = enc.encode(np.array([0.25, 2.0, -2.0], dtype=np.float32))
    assert np.frombuffer(data, "<f4").tolist() == [0.25, 1.0, -1.0]


def test_encoder_rejects_stereo_and_use_after_finish() -> None:
    enc = make_encoder("pcm_s16le", 24000, "raw", 24000)
    with pytest.raises(ValueError):
        enc.encode(np.zeros((10, 2), dtype=np.float32))
    assert enc.encode(np.zeros((10, 1), dtype=np.float32))  # a column is still mono
    enc.finish()
    assert enc.finish() == []
    with pytest.raises(RuntimeError):
        enc.encode(np.zeros(10, dtype=np.float32))


# -- G.711 ---------------------------------------------------------------------------------------

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def g711_by_table(x: np.ndarray, law: str) -> np.ndarray:
    """Encoder built from the G.711 decision-level tables (segment step sizes), not from bit tricks.

    Negative samples are folded with the one's complement, as the ITU-T G.191 reference coder does.
    """
    x = x.astype(np.int32)
    positive = x >= 0
    folded = np.where(positive, x, -x - 1)
    if law == "ulaw":  # 14-bit magnitudes: one step of 1, 15 of 2, then 16 each of 4 .. 256
        steps = [1] + [2] * 15 + [s for e in range(2, 9) for s in [1 << e] * 16]
        k = np.searchsorted(np.cumsum(steps)[:-1], folded >> 2, side="right")
        return np.where(positive, 0xFF - k, 0x7F - k).astype(np.uint8)
    steps = [2] * 32 + [s for e in range(2, 8) for s in [1 << e] * 16]  # 13-bit magnitudes
    k = np.searchsorted(np.cumsum(steps)[:-1], folded >> 3, side="right")
    return (np.where(positive, 0x80 | k, k) ^ 0x55).astype(np.uint8)


@pytest.mark.parametrize("law,fn", [("ulaw", linear_to_ulaw), ("alaw", linear_to_alaw)])
def test_g711_bit_exact_over_full_int16_range(law: str, fn) -> None:
    np.testing.assert_array_equal(fn(ALL_INT16), g711_by_table(ALL_INT16, law))


def test_g711_known_codes() -> None:
    # ITU reference values: silence, the smallest negative sample, both full scales.
    assert linear_to_ulaw(np.array([0, -1, 32767, -32768], np.int16)).tolist() == [0xFF, 0x7F, 0x80, 0x00]
    assert linear_to_alaw(np.array([0, -1, 32767, -32768], np.int16)).tolist() == [0xD5, 0x55, 0xAA, 0x2A]


@pytest.mark.parametrize("law", ("mulaw", "alaw"))
def test_g711_agrees_with_ffmpeg(law: str) -> None:
    ours = (linear_to_ulaw if law == "mulaw" else linear_to_alaw)(ALL_INT16)
    # FFmpeg's decoder maps every code back to a level whose quantisation interval holds the input
    # (up to one least significant bit of the law's domain); beyond the top level it clips.
    decoded = np.round(av_decode_raw("pcm_" + law, ours.tobytes(), 8000) * 32768).astype(np.int64)
    levels = np.unique(decoded)
    assert levels.size == (255 if law == "mulaw" else 256)  # μ-law has +0 and -0
    x = ALL_INT16.astype(np.int64)
    i = np.searchsorted(levels, decoded)
    gap = np.maximum(
        levels[np.minimum(i + 1, levels.size - 1)] - decoded, decoded - levels[np.maximum(i - 1, 0)]
    )
    inside = np.abs(x) <= levels[-1]
    lsb = 4 if law == "mulaw" else 8
    assert np.all(np.abs(decoded - x)[inside] <= gap[inside] // 2 + lsb)
    assert np.all(np.abs(decoded[~inside]) == levels[-1])
    # FFmpeg's encoder puts its decision levels halfway between reconstruction levels (G.711 does
    # not at segment edges) and folds negatives with -x: it disagrees with the ITU coder by one step
    # on a few samples next to decision levels, never more.
    ctx = av.CodecContext.create("pcm_" + law, "w")
    ctx.sample_rate, ctx.layout, ctx.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(ALL_INT16[None, :], format="s16", layout="mono")
    frame.sample_rate = 8000
    theirs = np.frombuffer(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)), np.uint8)
    differ = ours != theirs
    assert differ.mean() < 0.02
    ours_level = np.round(av_decode_raw("pcm_" + law, ours[differ].tobytes(), 8000) * 32768)
    theirs_level = np.round(av_decode_raw("pcm_" + law, theirs[differ].tobytes(), 8000) * 32768)
    assert np.all(np.abs(np.searchsorted(levels, ours_level) - np.searchsorted(levels, theirs_level)) == 1)


# -- validation ----------------------------------------------------------------------------------


def test_validate_accepts_documented_combinations() -> None:
    for fmt in FORMATS:
        for container in CONTAINERS[fmt]:
            assert validate_audio_format(fmt, None, container, 22050) is None
            for rate in (8000, 16000, 24000, 48000):
                assert validate_audio_format(fmt, rate, container, 22050) is None
    assert validate_audio_format("pcm_s16le", 22050, "raw", 22050) is None
    assert validate_audio_format("mulaw", 22050, "wav", 22050) is None
    assert validate_audio_format("opus", 12000, "ogg", 22050) is None
    assert default_sample_rate("opus", 22050) == 48000
    assert default_sample_rate("mulaw", 22050) == default_sample_rate("alaw", 24000) == 8000
    assert default_sample_rate("pcm_f32le", 22050) == 22050


@pytest.mark.parametrize(
    "fmt,rate,container,needle",
    [
        ("wma", 24000, "raw", "unknown format"),
        ("mp3", 24000, "raw", "unknown format"),  # the WebSocket protocol has no mp3 (it cannot flush)
        ("opus", 48000, "wav", "container"),
        ("pcm_s16le", 24000, "ogg", "container"),
        ("mulaw", 8000, "ogg", "container"),
        ("pcm_s16le", 44100, "raw", "44100"),
        ("opus", 22050, "raw", "22050"),  # native, but not an Opus rate
        ("alaw", 11025, "wav", "11025"),
        ("pcm_s16le", 16000.0, "raw", "integer"),
        ("pcm_s16le", True, "raw", "integer"),
        (["opus"], 48000, "raw", "unknown format"),
        ("opus", 48000, None, "container"),
    ],
)
def test_validate_rejects(fmt: str, rate, container: str, needle: str) -> None:
    error = validate_audio_format(fmt, rate, container, 22050)
    assert error is not None and needle in error
    if (
        isinstance(fmt, str) and fmt in CODECS
    ):  # an HTTP-only format: make_encoder has it (tests/test_compat.py decodes it)
        return
    with pytest.raises(ValueError):
        make_encoder(fmt, rate, container, 22050)


@pytest.mark.parametrize("fmt", sorted(CODECS))
def test_codec_encoders_stream_and_refuse_what_they_cannot(fmt: str) -> None:
    encoder = make_encoder(fmt, 24000, "raw", 22050)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)).astype(np.float32)
    pieces = [b for i in range(0, len(tone), 2205) for b in encoder.encode(tone[i : i + 2205])]
    assert len(pieces) >= 2  # bytes leave while the audio is still coming
    data = b"".join(pieces + encoder.finish())
    with av.open(io.BytesIO(data), format={"aac": "aac"}.get(fmt, fmt)) as container:
        n = sum(frame.samples for frame in container.decode(audio=0))
    assert 24000 <= n <= 24000 + 2400  # a second of audio, plus the codec's delay and padding
    with pytest.raises(ValueError):
        make_encoder(fmt, 24000, "wav", 22050)


def test_content_types() -> None:
    def ct(fmt: str, rate: int, container: str = "raw") -> str:
        return make_encoder(fmt, rate, container, 24000).content_type

    assert ct("mulaw", 8000) == "audio/basic"
    assert ct("mulaw", 16000) == "audio/PCMU;rate=16000"
    assert ct("alaw", 8000) == "audio/PCMA;rate=8000"
    assert ct("pcm_s16le", 24000) == "audio/pcm;rate=24000;channels=1;format=s16le"
    assert ct("pcm_f32le", 16000, "wav") == "audio/wav"


# -- resampler -----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    rates=st.sampled_from(
        [(22050, 48000), (22050, 8000), (24000, 16000), (24000, 48000), (16000, 22050), (48000, 8000)]
    ),
    n=st.integers(0, 6000),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
)
def test_resampler_length_accounting(rates: tuple[int, int], n: int, sizes: list[int]) -> None:
    in_rate, out_rate = rates
    r = StreamResampler(in_rate, out_rate)
    x = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    total, i, k = 0, 0, 0
    while i < n:
        total += r.process(x[i : i + sizes[k % len(sizes)]]).size
        i += sizes[k % len(sizes)]
        k += 1
    total += r.flush().size
    assert abs(total - round(n * out_rate / in_rate)) <= 2


def test_resampler_keeps_the_tone() -> None:
    r = StreamResampler(SOURCE_RATE, 8000)
    y = np.concatenate([r.process(c) for c in chunks(sine())] + [r.flush()])
    assert y.dtype == np.float32
    assert_tone(y, 8000, rms_tol=0.01)


def test_resampler_drain_keeps_going() -> None:
    r = StreamResampler(SOURCE_RATE, 16000)
    x = sine()
    first = np.concatenate([r.process(c) for c in chunks(x[:5000])] + [r.drain()])
    assert first.size == round(5000 * 16000 / SOURCE_RATE)
    assert r.drain().size == 0
    rest = np.concatenate([r.process(c) for c in chunks(x[5000:])] + [r.flush()])
    assert rest.size == round((x.size - 5000) * 16000 / SOURCE_RATE)
    assert_tone(np.concatenate([first, rest]), 16000, rms_tol=0.01)
    with pytest.raises(RuntimeError):
        r.drain()


def test_resampler_passthrough_and_lifecycle() -> None:
    r = StreamResampler(24000, 24000)
    x = sine(24000)[:500]
    y = r.process(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x
    assert r.flush().size == 0
    assert r.flush().size == 0
    with pytest.raises(RuntimeError):
        r.process(x)
    with pytest.raises(ValueError):
        StreamResampler(0, 16000)
