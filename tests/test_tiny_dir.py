"""The TINY model-directory generator: official layout, configs readable by our safe reader, strict
loads, seeded and deterministic, and the REAL size's yaml gives the released shapes."""

from __future__ import annotations

import json

import pytest
import torch

from cosyvoice.config import ConfigError, LLMConfig, ModelDir, read_model_yaml
from cosyvoice.flow import FlowConfig
from cosyvoice.hift import HiFTConfig
from cosyvoice.llm import LM_HEAD_KEY
from cosyvoice.model import CosyVoice2Model, flow_config_from_yaml, hift_config_from_yaml
from cosyvoice.text import CosyVoice2Tokenizer
from cosyvoice.tiny import SFT_SPEAKERS, main, model_yaml, write_model_dir
from tests.conftest import reference_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "CosyVoice2-tiny", seed=0)


def test_layout_is_complete_and_official(tiny):
    md = ModelDir(tiny)
    assert md.missing() == []
    assert (tiny / "spk2info.pt").is_file()
    assert {p.name for p in md.qwen_dir.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
    text = md.yaml_path.read_text()
    for tag in ("!new:cosyvoice.llm.llm.Qwen2LM", "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
                "!new:cosyvoice.hifigan.generator.HiFTGenerator", "!ref <chunk_size> * <token_mel_ratio>",
                "!new:omegaconf.DictConfig", "!apply:torch.manual_seed [1986]"):
        assert tag in text


def test_weights_use_the_official_key_names_and_load_strictly(tiny):
    llm = torch.load(tiny / "llm.pt", weights_only=True)
    assert LM_HEAD_KEY in llm and torch.equal(llm[LM_HEAD_KEY], llm["llm.model.model.embed_tokens.weight"])
    assert llm["llm_decoder.weight"].shape == (6564, 64) and llm["speech_embedding.weight"].shape == (6564, 64)
    hift = torch.load(tiny / "hift.pt", weights_only=True)
    assert any(k.endswith("parametrizations.weight.original0") for k in hift)
    flow = torch.load(tiny / "flow.pt", weights_only=True)
    assert flow["input_embedding.weight"].shape == (6561, 64)
    model = CosyVoice2Model.from_model_dir(tiny)  # strict: raises on any missing/extra key
    assert model.flow.cfg.chunk_tokens == 25 and model.hift.cfg.base_channels == 32


def test_speakers_and_tokenizer_fit_the_model(tiny):
    spk2info = torch.load(tiny / "spk2info.pt", weights_only=True)
    assert list(spk2info) == list(SFT_SPEAKERS)
    assert all(v["embedding"].shape == (1, 192) for v in spk2info.values())
    qwen = json.loads((tiny / "CosyVoice-BlankEN" / "config.json").read_text())
    tokenizer = CosyVoice2Tokenizer(tiny / "CosyVoice-BlankEN")
    assert len(tokenizer) <= qwen["vocab_size"]
    assert max(tokenizer.encode("Hello <|endofprompt|> [laughter] 你好")) < qwen["vocab_size"]


@pytest.mark.parity
def test_tiny_hyper_parameters_are_the_fixtures_tiny_config(tiny):
    ref = json.loads(reference_file("config_tiny.json").read_text())
    md = ModelDir(tiny)
    tree = md.read_yaml()
    assert flow_config_from_yaml(tree) == FlowConfig.from_dict(ref["flow"])
    assert hift_config_from_yaml(tree) == HiFTConfig.from_dict(ref["hift"])
    ours = md.llm_config()
    expected = LLMConfig.from_tiny_json(ref)
    assert {k: v for k, v in ours.qwen.items() if k != "model_type"} == expected.qwen
    ours.qwen = expected.qwen
    assert ours == expected


def test_real_size_yaml_gives_the_released_configuration(tmp_path):
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(model_yaml("real"))
    tree = read_model_yaml(path)
    assert flow_config_from_yaml(tree) == FlowConfig()
    assert hift_config_from_yaml(tree) == HiFTConfig()
    assert LLMConfig.from_yaml(tree) == LLMConfig()


def test_seeded_deterministic_and_leaves_the_global_rng_alone(tiny, tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    again = write_model_dir(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected)
    for name in ("llm.pt", "flow.pt", "hift.pt", "spk2info.pt"):
        a, b = torch.load(tiny / name, weights_only=True), torch.load(again / name, weights_only=True)
        flat_a = a if name != "spk2info.pt" else {k: v["embedding"] for k, v in a.items()}
        flat_b = b if name != "spk2info.pt" else {k: v["embedding"] for k, v in b.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name
    other = torch.load(write_model_dir(tmp_path / "seed1", seed=1) / "flow.pt", weights_only=True)
    ref = torch.load(tiny / "flow.pt", weights_only=True)
    assert not torch.equal(other["input_embedding.weight"], ref["input_embedding.weight"])


def test_cli_writes_a_directory_and_rejects_bad_sizes(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert "wrote tiny CosyVoice2 model directory" in capsys.readouterr().out
    assert ModelDir(tmp_path / "cli").missing() == []
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--size", "huge"])
    with pytest.raises(ValueError, match="size"):
        write_model_dir(tmp_path / "y", size="huge")


def test_a_yaml_naming_other_classes_is_refused(tiny, tmp_path):
    text = (tiny / "cosyvoice2.yaml").read_text().replace(
        "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "!new:cosyvoice.flow.flow.MaskedDiffWithXvec")
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="CausalMaskedDiffWithXvec"):
        flow_config_from_yaml(read_model_yaml(path))
    with pytest.raises(ConfigError, match="no 'hift' entry"):
        hift_config_from_yaml({})
