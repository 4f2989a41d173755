"""Audio features of the CosyVoice2 frontend, without torchaudio.

Three consumers, three feature types (FACTS §9):
  - campplus.onnx (speaker embedding): Kaldi fbank, 80 bins, 16 kHz, mean-normalised over frames
  - speech_tokenizer_v2.onnx (speech tokens): Whisper log-mel, 128 bins, 16 kHz
  - flow prompt mel: Matcha-style log-magnitude mel, 80 bins, 24 kHz

torchaudio cannot be installed beside our CPU torch, so I/O goes through soundfile, resampling
through soxr, fbank through kaldi-native-fbank and the two mels are computed here with torch.stft and
our own slaney filterbank.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf
import soxr
import torch

WavSource = str | Path | bytes | bytearray | io.IOBase


def load_wav(source: WavSource, target_sr: int) -> torch.Tensor:
    """Read a wav (path, bytes or file object) as float32 mono [1, T] at `target_sr`.

    Samples are scaled like torchaudio.load (int16 / 32768), channels are averaged as the official
    load_wav does. Resampling uses soxr (VHQ), which is not bit-equal to torchaudio's sinc_interp_hann
    Resample the official code uses: expect differences around 1e-3 near the band edge. The output
    length is padded/cut to ceil(T * target / source), which is the length torchaudio produces, so
    frame counts downstream match the official ones.
    """
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    data, sr = sf.read(source, dtype="float32", always_2d=True)  # [T, C]
    wav = data.mean(axis=1, dtype=np.float32)
    if sr != target_sr:
        n_out = math.ceil(len(wav) * target_sr / sr)
        wav = soxr.resample(wav, sr, target_sr, quality="VHQ").astype(np.float32)
        if len(wav) < n_out:
            wav = np.pad(wav, (0, n_out - len(wav)))
        wav = wav[:n_out]
    return torch.from_numpy(np.ascontiguousarray(wav)).unsqueeze(0)


def _as_1d(wav: torch.Tensor | np.ndarray) -> np.ndarray:
    wav = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if wav.ndim == 2:
        if wav.shape[0] != 1:
            raise ValueError(f"expected mono audio [T] or [1, T], got shape {wav.shape}")
        wav = wav[0]
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio [T] or [1, T], got shape {wav.shape}")
    return np.ascontiguousarray(wav, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# Kaldi fbank (campplus input)


def kaldi_fbank(wav_16k: torch.Tensor | np.ndarray, num_mel_bins: int = 80) -> torch.Tensor:
    """Kaldi fbank with torchaudio.compliance.kaldi.fbank's defaults and dither 0 -> [frames, bins].

    kaldi-native-fbank agrees with torchaudio's implementation to ~4e-4 (README of the fixtures);
    samples are fed unscaled, as the official code feeds [-1, 1] floats.
    """
    wav = _as_1d(wav_16k)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = num_mel_bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wav)
    fbank.input_finished()
    n = fbank.num_frames_ready
    if n == 0:
        return torch.zeros(0, num_mel_bins)
    return torch.from_numpy(np.stack([np.asarray(fbank.get_frame(i), dtype=np.float32) for i in range(n)]))


def campplus_input(wav_16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The campplus.onnx input: fbank minus its per-utterance mean -> [1, frames, 80]."""
    feat = kaldi_fbank(wav_16k)
    if feat.shape[0] == 0:
        raise ValueError("audio too short for a speaker embedding (needs at least 400 samples at 16 kHz)")
    return (feat - feat.mean(dim=0, keepdim=True)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------
# Slaney mel filterbank (librosa.filters.mel with its defaults)

_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, f / _F_SP)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log_part, _F_SP * m)


def mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular filters on the slaney mel scale with slaney area normalisation -> [n_mels, n_fft//2+1].

    Computed in float64, returned as float32: the same matrix as librosa.filters.mel's defaults
    (whisper's bundled mel_128 and Matcha's cached mel basis are both that).
    """
    fmax = sr / 2 if fmax is None else fmax
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges_hz)  # [n_mels + 1]
    offsets = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, n_freq]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax))


@lru_cache(maxsize=8)
def _hann(n: int) -> torch.Tensor:
    return torch.hann_window(n, periodic=True)


# ---------------------------------------------------------------------------------------------------
# Whisper log-mel (speech tokenizer input)

WHISPER_N_FFT = 400
WHISPER_HOP = 160


def whisper_log_mel(wav_16k: torch.Tensor | np.ndarray, n_mels: int = 128) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram (padding 0) -> [n_mels, T // 160].

    The clamp at (global max - 8) makes the result depend on the whole clip, so it cannot be
    computed chunk by chunk and stay equal.
    """
    wav = torch.from_numpy(_as_1d(wav_16k))
    if wav.numel() < WHISPER_N_FFT // 2 + 1:
        raise ValueError("audio too short for a log-mel spectrogram")
    stft = torch.stft(wav, WHISPER_N_FFT, WHISPER_HOP, window=_hann(WHISPER_N_FFT), return_complex=True)
    power = stft[:, :-1].abs() ** 2  # [201, frames]
    mel = _mel_basis(16000, WHISPER_N_FFT, n_mels, 0.0, 8000.0) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ---------------------------------------------------------------------------------------------------
# Matcha mel (flow prompt feature, 24 kHz)

PROMPT_N_FFT = 1920
PROMPT_HOP = 480


def prompt_mel_24k(wav_24k: torch.Tensor | np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """Matcha's mel_spectrogram as configured by cosyvoice2.yaml -> [frames, 80] (frames = T // 480)."""
    wav = torch.from_numpy(_as_1d(wav_24k))
    pad = (PROMPT_N_FFT - PROMPT_HOP) // 2  # 720
    if wav.numel() <= pad:
        raise ValueError("audio too short for the prompt mel")
    wav = torch.nn.functional.pad(wav[None, None], (pad, pad), mode="reflect")[0, 0]
    stft = torch.stft(
        wav, PROMPT_N_FFT, PROMPT_HOP, window=_hann(PROMPT_N_FFT), center=False, return_complex=True
    )
    mag = torch.sqrt(stft.real**2 + stft.imag**2 + 1e-9)  # [961, frames]
    mel = _mel_basis(24000, PROMPT_N_FFT, n_mels, 0.0, 8000.0) @ mag
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(0, 1)


def align_prompt(feat: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim a prompt so that mel frames = 2 x speech tokens (CosyVoice2's 24 kHz zero-shot rule).

    feat is [F, 80] or [1, F, 80], tokens [K] or [1, K]; the last (time) axis of tokens and the
    frame axis of feat are cut to 2n and n with n = min(F // 2, K).
    """
    frame_axis = feat.dim() - 2
    n = min(feat.shape[frame_axis] // 2, tokens.shape[-1])
    return feat.narrow(frame_axis, 0, 2 * n), tokens[..., :n]
