"""HiFT vocoder (CosyVoice2 `HiFTGenerator`): mel [B, 80, T] -> 24 kHz waveform [B, 480 T].

Neural source filter (F0 predictor + harmonic sine source) feeding an upsampling HiFi-GAN stack that
ends in a small iSTFT (n_fft 16, hop 4). Module and parameter names match the official `hift.pt`
so that the checkpoint loads strictly; weight-normed convolutions use torch's parametrization form
(`<name>.parametrizations.weight.original0/1`).

Randomness: the sine generator draws a random initial phase (which has no effect, see `SineGen2`)
and additive Gaussian noise (which does). Both come from an optional `torch.Generator` (per request,
so a seeded request always gives the same audio); tests pass the recorded normal draws explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from cosyvoice.checkpoint import load_state_dict, load_strict


@dataclass
class HiFTConfig:
    """Defaults are the REAL CosyVoice2-0.5B values (examples/libritts/cosyvoice2/conf/cosyvoice2.yaml)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_in_channels: int = 80
    f0_cond_channels: int = 512
    f0_num_class: int = 1

    @property
    def upsample_scale(self) -> int:
        """Waveform samples per mel frame (480 at 24 kHz)."""
        return int(np.prod(self.upsample_rates)) * self.hop_len

    @classmethod
    def from_dict(cls, d: Mapping) -> HiFTConfig:
        """Accepts the official yaml/`config_tiny.json` "hift" layout (nested istft_params, f0_predictor);
        tag markers of an inert yaml reading (`__new__`: class name) are ignored."""
        d = {k: v for k, v in d.items() if not (k.startswith("__") and k.endswith("__"))}
        kw: dict = {}
        istft = d.pop("istft_params", None)
        if istft is not None:
            kw["n_fft"] = int(istft["n_fft"])
            kw["hop_len"] = int(istft["hop_len"])
        f0 = d.pop("f0_predictor", None)
        if f0 is not None:
            kw["f0_in_channels"] = int(f0.get("in_channels", 80))
            kw["f0_cond_channels"] = int(f0.get("cond_channels", 512))
            kw["f0_num_class"] = int(f0.get("num_class", 1))
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key not in names:
                raise ValueError(f"unknown HiFT config key: {key!r}")
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kw[key] = value
        return cls(**kw)


def _wn_conv1d(*args, **kwargs) -> nn.Conv1d:
    return weight_norm(nn.Conv1d(*args, **kwargs))


class Snake(nn.Module):
    """x + sin²(αx)/α with a per-channel α on a linear scale (BigVGAN's Snake, alpha_logscale=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, T]
        # in place on one temporary: the same operations in the same order as the formula, half
        # the memory traffic (it runs at the audio rate, a third of a TINY vocoder call)
        alpha = self.alpha[None, :, None]
        return (x * alpha).sin_().square_().mul_(1.0 / (alpha + 1e-9)).add_(x)


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual units; padding keeps the length."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn_conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _wn_conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """F0 in Hz per mel frame: 5 × (weight-normed conv k3, ELU), then |Linear|."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                _wn_conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: Tensor) -> Tensor:  # [B, 80, T] -> [B, T]
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


Generators = torch.Generator | list[torch.Generator] | None


class SineGen2(nn.Module):
    """Harmonic sine source whose phase is integrated at frame rate and linearly re-upsampled.

    The official code adds a random initial phase at sample 0 before the 1/480 linear downsampling,
    which only reads samples 480 i + 239 and 480 i + 240; the draw is therefore dead. It is still taken
    (first, as in the official order) so that a generator's stream is consumed the same way.
    """

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        noise_std: float,
        voiced_threshold: float,
    ):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.upsample_scale = upsample_scale
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def forward(
        self, f0: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """f0 [B, L, 1] (sample rate) -> (sine_waves [B, L, dim], uv [B, L, 1]).

        `noise`, if given, is the standard-normal draw [B, L, dim] (replaces the generator's).
        """
        harmonics = torch.arange(1, self.dim + 1, dtype=f0.dtype, device=f0.device)
        rad = (f0 * harmonics) / self.sampling_rate % 1  # [B, L, dim]
        rand_ini = torch.rand(f0.shape[0], self.dim, generator=generator, dtype=f0.dtype, device=f0.device)
        rand_ini[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear")
        phase = torch.cumsum(rad, dim=2) * 2 * np.pi  # [B, dim, T]
        phase = F.interpolate(phase * self.upsample_scale, scale_factor=self.upsample_scale, mode="linear")
        sines = torch.sin(phase.transpose(1, 2)) * self.sine_amp  # [B, L, dim]

        uv = (f0 > self.voiced_threshold).to(f0.dtype)
        if noise is None:
            noise = torch.randn(sines.shape, generator=generator, dtype=sines.dtype, device=sines.device)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * noise, uv


class SourceModuleHnNSF(nn.Module):
    """Merges the harmonics into one excitation signal: tanh(Linear(9 -> 1))."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int,
        sine_amp: float,
        add_noise_std: float,
        voiced_threshold: float,
    ):
        super().__init__()
        self.l_sin_gen = SineGen2(
            sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std, voiced_threshold
        )
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(
        self, f0: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """f0 [B, L, 1] -> (source [B, L, 1], uv [B, L, 1]). The official noise branch is unused and skipped."""
        with torch.no_grad():
            sine_waves, uv = self.l_sin_gen(f0, generator=generator, noise=noise)
        return torch.tanh(self.l_linear(sine_waves)), uv


class HiFTGenerator(nn.Module):
    def __init__(self, cfg: HiFTConfig | None = None):
        super().__init__()
        cfg = cfg or HiFTConfig()
        if cfg.sampling_rate == 22050:
            raise ValueError(
                "sampling_rate 22050 selects the official SineGen (v1), which is not implemented"
            )
        self.cfg = cfg
        base = cfg.base_channels
        n_stages = len(cfg.upsample_rates)

        self.m_source = SourceModuleHnNSF(
            cfg.sampling_rate,
            cfg.upsample_scale,
            cfg.nb_harmonics,
            cfg.nsf_alpha,
            cfg.nsf_sigma,
            cfg.nsf_voiced_threshold,
        )
        self.conv_pre = _wn_conv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )

        # The STFT of the source is brought to each stage's frame rate: strides 15, 3, 1 for (8, 5, 3).
        stft_channels = cfg.n_fft + 2
        down_rates = np.cumprod([1] + list(cfg.upsample_rates[::-1][:-1]))[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(down_rates, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True)
        ):
            ch, u = base // 2 ** (i + 1), int(u)
            if u == 1:
                self.source_downs.append(nn.Conv1d(stft_channels, ch, 1, 1))
            else:
                self.source_downs.append(nn.Conv1d(stft_channels, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))

        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, tuple(d))
            for i in range(n_stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = _wn_conv1d(base // 2**n_stages, stft_channels, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_num_class, cfg.f0_in_channels, cfg.f0_cond_channels)
        # periodic Hann (scipy get_window('hann', n, fftbins=True)); not part of the state dict
        n = np.arange(cfg.n_fft)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)  # float64, then float32, as scipy + official
        self.register_buffer("stft_window", torch.from_numpy(window.astype(np.float32)), persistent=False)

    def f0_upsamp(self, f0: Tensor) -> Tensor:
        """[B, 1, T] -> [B, 1, 480 T], nearest."""
        return F.interpolate(f0, scale_factor=float(self.cfg.upsample_scale), mode="nearest")

    def _stft(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, L] -> real, imag [B, n_fft/2 + 1, L/hop + 1] (centred, reflect padding)."""
        spec = torch.stft(
            x, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)
        return spec[..., 0], spec[..., 1]

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.cfg.n_fft, self.cfg.hop_len, self.cfg.n_fft, window=self.stft_window)

    def decode(self, x: Tensor, s: Tensor) -> Tensor:
        """mel x [B, 80, T], source s [B, 1, 480 T] -> audio [B, 480 T] in [-0.99, 0.99]."""
        cfg = self.cfg
        s_real, s_imag = self._stft(s.squeeze(1))
        s_stft = torch.cat([s_real, s_imag], dim=1)  # [B, 18, 120 T + 1]
        x = self.conv_pre(x)
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                xs = xs + self.resblocks[i * n_kernels + j](x)
            x = xs / n_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as the official code
        half = cfg.n_fft // 2 + 1
        audio = self._istft(torch.exp(x[:, :half]), torch.sin(x[:, half:]))
        return torch.clamp(audio, -cfg.audio_limit, cfg.audio_limit)

    def source(
        self, speech_feat: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """mel [B, 80, T] -> excitation [B, 1, 480 T]."""
        f0 = self.f0_predictor(speech_feat)
        s, _ = self.m_source(self.f0_upsamp(f0[:, None]).transpose(1, 2), generator=generator, noise=noise)
        return s.transpose(1, 2)

    @torch.inference_mode()
    def inference(
        self,
        speech_feat: Tensor,
        cache_source: Tensor | None = None,
        generator: Generators = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """mel [B, 80, T] -> (audio [B, 480 T], source [B, 1, 480 T]).  ``generator`` may be one
        per row (streams vocoded together, each drawing its own noise).

        The first S samples of the fresh source are replaced by `cache_source` [B, 1, S] so that a
        streamed chunk continues the previous chunk's excitation.
        """
        if isinstance(generator, list):
            # The excitation is integrated from f0, so it turns float round-off into phase drift
            # (by up to 2e-2 of audio on the TINY model); f0 and source stay per stream, computed
            # exactly as alone.  The decoder, the bulk of the work, runs on the whole batch.
            s = torch.cat([self.source(speech_feat[i : i + 1], generator=g) for i, g in enumerate(generator)])
        else:
            s = self.source(speech_feat, generator=generator, noise=noise)
        if cache_source is not None and cache_source.shape[-1] > 0:
            s[:, :, : cache_source.shape[-1]] = cache_source
        return self.decode(speech_feat, s), s

    def remove_weight_norm(self) -> None:
        """Folds g·v/‖v‖ into plain `.weight` tensors (irreversible; state-dict keys change)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def convert_hift_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official-checkpoint spellings -> ours: drops every `generator.` (as the official loader does)
    and renames legacy `weight_g` / `weight_v` to `parametrizations.weight.original0/1`."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace("generator.", "")
        if key.endswith(".weight_g"):
            key = key[: -len("weight_g")] + "parametrizations.weight.original0"
        elif key.endswith(".weight_v"):
            key = key[: -len("weight_v")] + "parametrizations.weight.original1"
        out[key] = value
    return out


def load_hift_state_dict(module: HiFTGenerator, state: Mapping[str, Tensor]) -> None:
    """Strict load (keys and shapes) of a `hift.pt`-style state dict in either weight-norm spelling."""
    load_strict(module, convert_hift_state_dict(state), "hift.pt")


def load_hift(path, cfg: HiFTConfig | None = None, fold_weight_norm: bool = False) -> HiFTGenerator:
    """Builds the vocoder (REAL config by default) and loads `hift.pt` / a safetensors file into it.
    `fold_weight_norm` bakes g·v/‖v‖ into plain weights once instead of on every call."""
    model = HiFTGenerator(cfg or HiFTConfig())
    load_hift_state_dict(model, load_state_dict(path))
    if fold_weight_norm:
        model.remove_weight_norm()
    return model.eval()
