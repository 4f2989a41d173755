"""The TINY model-directory generator: official layout, configs readable by our safe reader, strict
loads, seeded and deterministic, and the REAL size's yaml gives the released shapes.

The directory under test has the hyper-parameters of the fixture set's config_tiny.json (whichever
set COSYVOICE_REFERENCE_DIR names), so every shape below is read from that file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.config import ConfigError, LLMConfig, ModelDir, read_model_yaml
from cosyvoice.flow import FlowConfig
from cosyvoice.hift import HiFTConfig
from cosyvoice.llm import LM_HEAD_KEY, Qwen2LM
from cosyvoice.model import CosyVoice2Model, flow_config_from_yaml, hift_config_from_yaml
from cosyvoice.text import CosyVoice2Tokenizer
from cosyvoice.tiny import (
    QWEN_WEIGHTS,
    SFT_SPEAKERS,
    SIZES,
    main,
    model_yaml,
    qwen_checkpoint,
    size_from_tiny_config,
    write_model_dir,
)
from tests.conftest import reference_file, tiny_json


@pytest.fixture(scope="module")
def size() -> dict:
    """The fixture set's TINY hyper-parameters as a model-directory size."""
    return size_from_tiny_config(tiny_json())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, size):
    return write_model_dir(tmp_path_factory.mktemp("tiny") / "CosyVoice2-tiny", size=size, seed=0)


def test_layout_is_complete_and_official(tiny):
    md = ModelDir(tiny)
    assert md.missing() == []
    assert (tiny / "spk2info.pt").is_file()
    assert {p.name for p in md.qwen_dir.iterdir()} >= {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    text = md.yaml_path.read_text()
    for tag in (
        "!new:cosyvoice.llm.llm.Qwen2LM",
        "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
        "!new:cosyvoice.hifigan.generator.HiFTGenerator",
        "!ref <chunk_size> * <token_mel_ratio>",
        "!new:omegaconf.DictConfig",
        "!apply:torch.manual_seed [1986]",
    ):
        assert tag in text


@pytest.mark.parity
def test_weights_use_the_official_key_names_and_load_strictly(tiny):
    cfg = tiny_json()
    width, rows = cfg["llm"]["llm_input_size"], cfg["llm"]["llm_decoder_out"]
    llm = torch.load(tiny / "llm.pt", weights_only=True)
    assert LM_HEAD_KEY in llm and torch.equal(llm[LM_HEAD_KEY], llm["llm.model.model.embed_tokens.weight"])
    assert llm["llm_decoder.weight"].shape == (rows, width) and llm["speech_embedding.weight"].shape == (
        rows,
        width,
    )
    hift = torch.load(tiny / "hift.pt", weights_only=True)
    assert any(k.endswith("parametrizations.weight.original0") for k in hift)
    # the same key set and shapes as the fixture set's official TINY checkpoints
    for name, ours in (
        ("llm", llm),
        ("flow", torch.load(tiny / "flow.pt", weights_only=True)),
        ("hift", hift),
    ):
        theirs = load_file(str(reference_file(f"tiny_{name}.safetensors")))
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in theirs.items()
        }, name
    flow = torch.load(tiny / "flow.pt", weights_only=True)
    assert flow["input_embedding.weight"].shape == (cfg["flow"]["vocab_size"], cfg["flow"]["input_size"])
    model = CosyVoice2Model.from_model_dir(tiny)  # strict: raises on any missing/extra key
    chunk = cfg["flow"]["decoder"]["estimator"]["static_chunk_size"] // cfg["flow"]["token_mel_ratio"]
    assert (
        model.flow.cfg.chunk_tokens == chunk and model.hift.cfg.base_channels == cfg["hift"]["base_channels"]
    )


def test_blanken_holds_the_qwen2_backbone_as_a_huggingface_checkpoint(tiny):
    """The release ships the Qwen2 weights in CosyVoice-BlankEN/model.safetensors (the official
    class loads them with Qwen2ForCausalLM.from_pretrained before llm.pt overwrites them): the same
    tensors as llm.pt's llm.model.*, under a HuggingFace checkpoint's names."""
    from transformers import Qwen2ForCausalLM

    llm = torch.load(tiny / "llm.pt", weights_only=True)
    path = tiny / ModelDir.QWEN_DIR / QWEN_WEIGHTS
    stored = load_file(str(path))
    assert "model.embed_tokens.weight" in stored and "model.norm.weight" in stored
    assert "lm_head.weight" not in stored  # tie_word_embeddings: from_pretrained ties it back
    assert stored.keys() == {k.removeprefix("llm.model.") for k in llm if k.startswith("llm.model.")} - {
        "lm_head.weight"
    }
    assert all(torch.equal(v, llm["llm.model." + k]) for k, v in stored.items())
    hf = Qwen2ForCausalLM.from_pretrained(tiny / ModelDir.QWEN_DIR)  # what the official Qwen2Encoder does
    hf_state = hf.state_dict()
    assert hf_state.keys() == {k.removeprefix("llm.model.") for k in llm if k.startswith("llm.model.")}
    assert all(torch.equal(hf_state[k], llm["llm.model." + k]) for k in hf_state)


def test_qwen_checkpoint_names_and_untied_head():
    state = {
        "llm.model.model.norm.weight": torch.ones(2),
        "llm.model.lm_head.weight": torch.zeros(3, 2),
        "llm_decoder.weight": torch.zeros(1, 2),
    }
    assert set(qwen_checkpoint(state, tie_word_embeddings=True)) == {"model.norm.weight"}
    untied = qwen_checkpoint(state, tie_word_embeddings=False)
    assert set(untied) == {"model.norm.weight", "lm_head.weight"}
    assert untied["lm_head.weight"].data_ptr() != state["llm.model.lm_head.weight"].data_ptr()
    with pytest.raises(ValueError, match="lm_head"):
        qwen_checkpoint({"llm.model.model.norm.weight": torch.ones(2)}, tie_word_embeddings=False)


def test_our_loader_does_not_need_the_blanken_weights(tiny, tmp_path):
    """llm.pt holds every weight: a directory without BlankEN's model.safetensors loads the same."""
    copy = tmp_path / "no-blanken-weights"
    shutil.copytree(tiny, copy)
    (copy / ModelDir.QWEN_DIR / QWEN_WEIGHTS).unlink()
    assert ModelDir(copy).missing() == []
    full, bare = Qwen2LM.from_model_dir(tiny), Qwen2LM.from_model_dir(copy)
    assert all(
        torch.equal(a, b) for a, b in zip(full.state_dict().values(), bare.state_dict().values(), strict=True)
    )
    model = CosyVoice2Model.from_model_dir(copy)
    assert model.llm.config == full.config


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
    ref = tiny_json()
    md = ModelDir(tiny)
    tree = md.read_yaml()
    assert flow_config_from_yaml(tree) == FlowConfig.from_dict(ref["flow"])
    assert hift_config_from_yaml(tree) == HiFTConfig.from_dict(ref["hift"])
    ours = md.llm_config()
    expected = LLMConfig.from_tiny_json(ref)
    assert {k: v for k, v in ours.qwen.items() if k != "model_type"} == expected.qwen
    ours.qwen = expected.qwen
    assert ours == expected


def test_builtin_tiny_size_is_the_official_tiny_shape():
    """The default ``tiny`` size is the public fixtures' TINY (reference README: a 64-wide,
    2-layer, 4-head Qwen2; a 64-wide flow with 2 blocks and [64] estimator channels; HiFT 32)."""
    s = SIZES["tiny"]
    q = s["qwen"]
    assert (
        q["hidden_size"],
        q["num_hidden_layers"],
        q["num_attention_heads"],
        q["num_key_value_heads"],
        q["intermediate_size"],
        q["vocab_size"],
    ) == (64, 2, 4, 2, 128, 1024)
    assert (s["llm_size"], s["flow_input_size"]) == (64, 64)
    assert s["encoder"] == {
        "output_size": 64,
        "attention_heads": 4,
        "linear_units": 128,
        "num_blocks": 2,
        "pre_lookahead_channels": 64,
    }
    assert s["estimator"] == {
        "channels": [64],
        "attention_head_dim": 16,
        "n_blocks": 1,
        "num_mid_blocks": 2,
        "num_heads": 2,
    }
    assert s["hift"] == {"base_channels": 32, "cond_channels": 32}


def test_a_tiny_config_the_template_cannot_write_is_refused(tmp_path):
    data = json.loads(json.dumps(tiny_json()))
    data["flow"]["token_mel_ratio"] = 3  # fixed at 2 in the yaml template
    with pytest.raises(ValueError, match="flow"):
        write_model_dir(tmp_path / "bad", size=size_from_tiny_config(data))


def test_real_size_yaml_gives_the_released_configuration(tmp_path):
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(model_yaml("real"))
    tree = read_model_yaml(path)
    assert flow_config_from_yaml(tree) == FlowConfig()
    assert hift_config_from_yaml(tree) == HiFTConfig()
    assert LLMConfig.from_yaml(tree) == LLMConfig()


def test_seeded_deterministic_and_leaves_the_global_rng_alone(tiny, size, tmp_path):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    again = write_model_dir(tmp_path / "again", size=size, seed=0)
    assert torch.equal(torch.rand(3), expected)
    for name in ("llm.pt", "flow.pt", "hift.pt", "spk2info.pt"):
        a, b = torch.load(tiny / name, weights_only=True), torch.load(again / name, weights_only=True)
        flat_a = a if name != "spk2info.pt" else {k: v["embedding"] for k, v in a.items()}
        flat_b = b if name != "spk2info.pt" else {k: v["embedding"] for k, v in b.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), name
    other = torch.load(write_model_dir(tmp_path / "seed1", size=size, seed=1) / "flow.pt", weights_only=True)
    ref = torch.load(tiny / "flow.pt", weights_only=True)
    assert not torch.equal(other["input_embedding.weight"], ref["input_embedding.weight"])


def test_cli_writes_a_directory_and_rejects_bad_sizes(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert "wrote tiny CosyVoice2 model directory" in capsys.readouterr().out
    assert ModelDir(tmp_path / "cli").missing() == []
    assert (tmp_path / "cli" / ModelDir.QWEN_DIR / QWEN_WEIGHTS).is_file()
    main([str(tmp_path / "from-json"), "--tiny-config", str(reference_file("config_tiny.json"))])
    assert "config_tiny.json CosyVoice2 model directory" in capsys.readouterr().out
    tree = ModelDir(tmp_path / "from-json").read_yaml()
    assert flow_config_from_yaml(tree) == FlowConfig.from_dict(tiny_json()["flow"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--size", "huge"])
    with pytest.raises(ValueError, match="size"):
        write_model_dir(tmp_path / "y", size="huge")


def test_a_yaml_naming_other_classes_is_refused(tiny, tmp_path):
    text = (
        (tiny / "cosyvoice2.yaml")
        .read_text()
        .replace(
            "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "!new:cosyvoice.flow.flow.MaskedDiffWithXvec"
        )
    )
    path = tmp_path / "cosyvoice2.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="CausalMaskedDiffWithXvec"):
        flow_config_from_yaml(read_model_yaml(path))
    with pytest.raises(ConfigError, match="no 'hift' entry"):
        hift_config_from_yaml({})
