"""HiFT vocoder against the official implementation's recorded outputs (hift.npz, TINY weights)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.checkpoint import CheckpointMismatch
from cosyvoice.hift import HiFTConfig, HiFTGenerator, convert_hift_state_dict, load_hift, load_hift_state_dict
from tests.conftest import load_npz, reference_file, tiny_json

torch.set_num_threads(1)
ATOL = 1e-4


def tiny_config() -> HiFTConfig:
    return HiFTConfig.from_dict(tiny_json()["hift"])


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(str(reference_file("tiny_hift.safetensors")))


@pytest.fixture(scope="module")
def hift(tiny_state) -> HiFTGenerator:
    model = HiFTGenerator(tiny_config())
    load_hift_state_dict(model, tiny_state)
    return model.eval()


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in load_npz("hift.npz").items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"max abs err {err:.3g} > {atol}"


@pytest.mark.parity
def test_f0_and_upsampling(hift, ref):
    with torch.no_grad():
        f0 = hift.f0_predictor(ref["mel"][None])
        assert_close(f0[0], ref["f0"])
        assert_close(hift.f0_upsamp(f0[:, None])[0, 0], ref["f0_upsampled"])


@pytest.mark.parity
def test_source_with_recorded_draws(hift, ref):
    f0 = ref["f0_upsampled"][None, :, None]
    with torch.no_grad():
        source, uv = hift.m_source(f0, noise=ref["sinegen_noise_randn"][None])
    assert_close(uv[0, :, 0], ref["uv"])
    assert_close(source[0, :, 0], ref["source"])
    # The initial random phase is dead (FACTS 6.1): any generator gives the same sines; only the
    # additive noise changes the source.
    with torch.no_grad():
        other, _ = hift.m_source(
            f0, generator=torch.Generator().manual_seed(1234), noise=ref["sinegen_noise_randn"][None]
        )
    assert torch.equal(other, source)


@pytest.mark.parity
def test_source_stft(hift, ref):
    real, imag = hift._stft(ref["source"][None])
    assert_close(real[0], ref["source_stft_real"])
    assert_close(imag[0], ref["source_stft_imag"])


@pytest.mark.parity
def test_decode(hift, ref):
    with torch.no_grad():
        audio = hift.decode(ref["mel"][None], ref["source"][None, None])
    assert_close(audio[0], ref["audio"])


@pytest.mark.parity
def test_inference_with_cache_source(hift, ref):
    cache = ref["cache_source"][None, None]
    audio, source = hift.inference(ref["mel"][None], cache, noise=ref["inference_sinegen_noise_randn"][None])
    assert torch.equal(source[0, 0, : cache.shape[-1]], ref["cache_source"])  # spliced in as recorded
    assert_close(source[0, 0], ref["inference_source"])
    assert_close(audio[0], ref["inference_audio"])


def test_inference_is_reproducible_per_generator(hift, ref):
    mel = ref["mel"][None]
    a1, s1 = hift.inference(mel, generator=torch.Generator().manual_seed(5))
    a2, s2 = hift.inference(mel, generator=torch.Generator().manual_seed(5))
    a3, _ = hift.inference(mel, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a1, a2) and torch.equal(s1, s2)
    assert not torch.equal(a1, a3)  # the additive noise is live
    assert a1.shape == (1, hift.cfg.upsample_scale * mel.shape[-1])
    assert a1.abs().max() <= hift.cfg.audio_limit


def test_legacy_weight_norm_names_load_the_same(tiny_state, hift, ref):
    legacy = {}
    for key, value in tiny_state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        legacy["generator." + key] = value
    assert any(k.endswith(".weight_g") for k in legacy)
    model = HiFTGenerator(tiny_config())
    load_hift_state_dict(model, legacy)
    ours, theirs = model.state_dict(), hift.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        audio = model.decode(ref["mel"][None], ref["source"][None, None])
    assert_close(audio[0], ref["audio"])


def test_load_hift_from_a_legacy_pt_file(tiny_state, ref, tmp_path):
    legacy = {
        "generator."
        + k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in tiny_state.items()
    }
    torch.save(legacy, tmp_path / "hift.pt")
    model = load_hift(tmp_path / "hift.pt", tiny_config(), fold_weight_norm=True)
    assert not model.training
    with torch.no_grad():
        audio = model.decode(ref["mel"][None], ref["source"][None, None])
    assert_close(audio[0], ref["audio"])
    with pytest.raises(FileNotFoundError):
        load_hift(tmp_path / "missing.pt", tiny_config())


def test_strict_load_rejects_missing_and_misshapen(tiny_state):
    model = HiFTGenerator(tiny_config())
    partial = dict(tiny_state)
    partial.pop("conv_post.bias")
    with pytest.raises(CheckpointMismatch, match="conv_post.bias"):
        load_hift_state_dict(model, partial)
    with pytest.raises(CheckpointMismatch):
        load_hift_state_dict(HiFTGenerator(), tiny_state)  # REAL widths vs TINY weights


def test_convert_keeps_parametrization_names_and_strips_generator():
    t = torch.zeros(1)
    out = convert_hift_state_dict(
        {
            "generator.conv_pre.weight_g": t,
            "conv_pre.parametrizations.weight.original1": t,
            "generator.m_source.l_linear.bias": t,
        }
    )
    assert set(out) == {
        "conv_pre.parametrizations.weight.original0",
        "conv_pre.parametrizations.weight.original1",
        "m_source.l_linear.bias",
    }


def test_remove_weight_norm_keeps_output(hift, tiny_state, ref):
    model = HiFTGenerator(tiny_config())
    load_hift_state_dict(model, tiny_state)
    model.remove_weight_norm()
    assert not any("parametrizations" in k for k in model.state_dict())
    with torch.no_grad():
        fused = model.decode(ref["mel"][None], ref["source"][None, None])
        plain = hift.decode(ref["mel"][None], ref["source"][None, None])
    assert_close(fused, plain, atol=1e-5)


def test_config_from_yaml_style_dict_gives_real_defaults():
    tree = {
        "__new__": "cosyvoice.hifigan.generator.HiFTGenerator",
        "in_channels": 80,
        "base_channels": 512,
        "nb_harmonics": 8,
        "sampling_rate": 24000,
        "upsample_rates": [8, 5, 3],
        "istft_params": {"n_fft": 16, "hop_len": 4},
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        "f0_predictor": {
            "__new__": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
            "num_class": 1,
            "in_channels": 80,
            "cond_channels": 512,
        },
    }
    assert HiFTConfig.from_dict(tree) == HiFTConfig()
    assert HiFTConfig().upsample_scale == 480


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        HiFTConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="22050"):
        HiFTGenerator(HiFTConfig(sampling_rate=22050))
