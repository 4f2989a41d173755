"""Frontend audio features: parity with the official extractors (frontend.npz) and independent checks."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice import features as F
from tests.conftest import load_npz

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_npz("frontend.npz")


def fbank_frames(ref) -> int:
    """Kaldi frames of the 16 kHz clip (snip_edges: 25 ms windows every 10 ms)."""
    return 1 + (len(ref["wav_16k"]) - 400) // 160


def whisper_frames(ref) -> int:
    """Whisper log-mel frames of the 16 kHz clip (hop 160, the last centred frame dropped)."""
    return len(ref["wav_16k"]) // 160


def prompt_frames(ref) -> int:
    """Flow prompt-mel frames of the 24 kHz clip (hop 480)."""
    return len(ref["wav_24k"]) // 480


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parity
def test_kaldi_fbank_matches_official(ref):
    raw = F.kaldi_fbank(torch.from_numpy(ref["wav_16k"])[None])
    assert (
        raw.shape == ref["campplus_fbank_raw"].shape == (fbank_frames(ref), 80) and raw.dtype == torch.float32
    )
    np.testing.assert_allclose(raw.numpy(), ref["campplus_fbank_raw"], atol=5e-4, rtol=0)


@pytest.mark.parity
def test_campplus_input_is_mean_normalised_fbank(ref):
    feat = F.campplus_input(ref["wav_16k"])
    assert feat.shape == (1, fbank_frames(ref), 80)
    np.testing.assert_allclose(feat[0].numpy(), ref["campplus_fbank"], atol=5e-4, rtol=0)
    assert feat.mean(dim=1).abs().max() < 1e-4


@pytest.mark.parity
def test_whisper_filterbank_matches_bundled_filters(ref):
    ours = F.mel_filterbank(16000, 400, 128, 0.0, 8000.0)
    assert ours.shape == (128, 201) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref["whisper_mel_filters_128"], atol=1e-6, rtol=0)


@pytest.mark.parity
def test_matcha_filterbank_matches(ref):
    ours = F.mel_filterbank(24000, 1920, 80, 0.0, 8000.0)
    assert ours.shape == (80, 961)
    np.testing.assert_allclose(ours, ref["matcha_mel_basis"], atol=1e-6, rtol=0)


@pytest.mark.parity
def test_whisper_log_mel_matches_official(ref):
    mel = F.whisper_log_mel(torch.from_numpy(ref["wav_16k"]))
    assert (
        mel.shape == ref["whisper_log_mel"].shape == (128, whisper_frames(ref)) and mel.dtype == torch.float32
    )
    np.testing.assert_allclose(mel.numpy(), ref["whisper_log_mel"], atol=1e-4, rtol=0)
    # the global (max - 8) floor, i.e. (max of the result) - 2: ours sits on it wherever the
    # official result does (7698 entries on the public clip)
    floor = (mel.max() * 4 - 4 - 8 + 4) / 4
    official = ref["whisper_log_mel"]
    at_floor = int(np.isclose(official, official.max() - 2, rtol=0, atol=1e-6).sum())
    assert abs(int((mel == floor).sum()) - at_floor) <= at_floor // 100 + 2


@pytest.mark.parity
def test_prompt_mel_matches_official(ref):
    feat = F.prompt_mel_24k(torch.from_numpy(ref["wav_24k"])[None])
    assert feat.shape == ref["prompt_feat"].shape == (prompt_frames(ref), 80)
    np.testing.assert_allclose(feat.numpy(), ref["prompt_feat"], atol=1e-4, rtol=0)


@pytest.mark.parity
def test_align_prompt_matches_official_rule(ref):
    feat = torch.from_numpy(ref["prompt_feat"])
    for k, n in zip(ref["align_token_counts"].tolist(), ref["align_n"].tolist(), strict=True):
        tokens = torch.arange(k)[None]  # [1, K]
        f, t = F.align_prompt(feat[None], tokens)
        assert f.shape == (1, 2 * n, 80) and t.shape == (1, n)
        assert torch.equal(f[0], feat[: 2 * n]) and torch.equal(t[0], torch.arange(n))


@pytest.mark.parity
def test_load_wav_resamples_close_to_official(ref):
    buf = io.BytesIO()
    sf.write(buf, ref["wav_22050_int16"], 22050, subtype="PCM_16", format="WAV")
    data = buf.getvalue()
    wav16 = F.load_wav(data, 16000)
    wav24 = F.load_wav(io.BytesIO(data), 24000)
    n = len(ref["wav_22050_int16"])  # torchaudio's output lengths: ceil(n * new / old)
    assert wav16.shape == (1, len(ref["wav_16k"])) == (1, math.ceil(n * 16000 / 22050))
    assert wav24.shape == (1, len(ref["wav_24k"])) == (1, math.ceil(n * 24000 / 22050))
    assert wav16.dtype == torch.float32
    # soxr is not torchaudio's sinc resampler: close (they differ near the band edge), not equal
    for ours, theirs in ((wav16[0].numpy(), ref["wav_16k"]), (wav24[0].numpy(), ref["wav_24k"])):
        err = ours - theirs
        assert np.abs(err).max() < 5e-2
        assert np.sqrt(np.mean(err**2)) < 0.05 * np.sqrt(np.mean(theirs**2))
    # the features downstream barely notice
    mel = F.whisper_log_mel(wav16)
    assert np.abs(mel.numpy() - ref["whisper_log_mel"]).mean() < 1e-2


# ------------------------------------------------------------------------------------- independent


def _sine(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _band_centres(bank: np.ndarray, sr: int, n_fft: int) -> np.ndarray:
    fft_hz = np.linspace(0, sr / 2, n_fft // 2 + 1)
    return fft_hz[bank.argmax(axis=1)]


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0, 6500.0])
def test_whisper_mel_peak_lies_in_the_band_of_a_sine(freq):
    mel = F.whisper_log_mel(_sine(freq, 16000))
    peak_band = int(mel.mean(dim=1).argmax())
    centres = _band_centres(F.mel_filterbank(16000, 400, 128, 0, 8000), 16000, 400)
    assert abs(centres[peak_band] - freq) <= 100  # bands are ~40-110 Hz wide here, fft bins 40 Hz


@pytest.mark.parametrize("freq", [300.0, 2000.0, 5000.0])
def test_prompt_mel_peak_lies_in_the_band_of_a_sine(freq):
    feat = F.prompt_mel_24k(_sine(freq, 24000))
    assert feat.shape == (24000 // 480, 80)
    peak_band = int(feat.mean(dim=0).argmax())
    centres = _band_centres(F.mel_filterbank(24000, 1920, 80, 0, 8000), 24000, 1920)
    assert abs(centres[peak_band] - freq) <= 200


def test_fbank_peak_follows_the_sine_frequency():
    low = F.kaldi_fbank(_sine(500.0, 16000)).mean(dim=0).argmax()
    high = F.kaldi_fbank(_sine(4000.0, 16000)).mean(dim=0).argmax()
    assert 0 < int(low) < int(high) < 79
    assert F.kaldi_fbank(_sine(500.0, 16000)).shape == (1 + (16000 - 400) // 160, 80)


def test_filterbank_triangles_are_area_normalised():
    bank = F.mel_filterbank(16000, 400, 40, 0, 8000).astype(np.float64)
    edges = F.mel_to_hz(np.linspace(F.hz_to_mel(0), F.hz_to_mel(8000), 42))
    # a triangle of base b and height 2/b has area 1 (in Hz), sampled every 40 Hz
    areas = bank.sum(axis=1) * (16000 / 400)
    wide = (edges[2:] - edges[:-2]) > 400  # only triangles wide enough to sample well
    np.testing.assert_allclose(areas[wide], 1.0, rtol=0.05)
    assert np.all(bank >= 0)


def test_mel_scale_round_trips():
    hz = np.array([0.0, 100.0, 999.0, 1000.0, 4000.0, 8000.0])
    np.testing.assert_allclose(F.mel_to_hz(F.hz_to_mel(hz)), hz, atol=1e-9)
    assert F.hz_to_mel(np.array([1000.0]))[0] == pytest.approx(15.0)


def test_load_wav_averages_channels_and_keeps_rate(tmp_path):
    left = _sine(440.0, 16000, 0.1)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "s.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wav = F.load_wav(path, 16000)
    assert wav.shape == (1, len(left))
    np.testing.assert_allclose(wav[0].numpy(), left / 2, atol=1e-7)


def test_features_reject_bad_input():
    with pytest.raises(ValueError):
        F.whisper_log_mel(torch.zeros(2, 16000))
    with pytest.raises(ValueError):
        F.campplus_input(np.zeros(100, np.float32))
    with pytest.raises(ValueError):
        F.prompt_mel_24k(np.zeros(10, np.float32))
    with pytest.raises(sf.LibsndfileError):
        F.load_wav(b"not a wav", 16000)
