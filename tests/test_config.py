"""Model-directory reading: the yaml is data (no tag is ever executed), refs resolve, missing files
and mismatched checkpoints fail with messages that name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cosyvoice.checkpoint import CheckpointMismatch, load_state_dict, load_strict
from cosyvoice.config import (
    REAL_QWEN2,
    ConfigError,
    LLMConfig,
    ModelDir,
    read_model_yaml,
    resolve_device,
    resolve_dtype,
)
from tests.conftest import tiny_json

# The structure of the official cosyvoice2.yaml (abridged, written for this test).
MODEL_YAML = """\
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
sample_rate: 24000
llm_input_size: 896
llm_output_size: 896
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    spk_embed_dim: !ref <spk_embed_dim>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            static_chunk_size: !ref <token_frame_rate> * <token_mel_ratio> # a comment
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    sampling_rate: !ref <sample_rate>
hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan
    generator: !ref <hift>
    discriminator: !new:cosyvoice.hifigan.discriminator.MultipleDiscriminator
        mpd: !new:matcha.hifigan.models.MultiPeriodDiscriminator
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
data_pipeline: [!ref <get_tokenizer>]
"""


def write(tmp_path: Path, text: str, name: str = "cosyvoice2.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_model_yaml_reads_as_data_with_refs_resolved(tmp_path):
    tree = read_model_yaml(write(tmp_path, MODEL_YAML), {"qwen_pretrain_path": "/m/CosyVoice-BlankEN"})
    llm = tree["llm"]
    assert llm["__new__"] == "cosyvoice.llm.llm.Qwen2LM"
    assert llm["llm_input_size"] == 896 and llm["llm"]["pretrain_path"] == "/m/CosyVoice-BlankEN"
    assert llm["sampling"] == {
        "__name__": "cosyvoice.utils.common.ras_sampling",
        "top_p": 0.8,
        "top_k": 25,
        "win_size": 10,
        "tau_r": 0.1,
    }
    assert tree["__set_seed1"] == {"__apply__": "random.seed", "args": [1986]}
    estimator = tree["flow"]["decoder"]["estimator"]
    assert estimator["static_chunk_size"] == 50
    assert tree["flow"]["decoder"]["cfm_params"]["content"]["sigma_min"] == 1e-6  # a float, not "1e-06"
    assert tree["hifigan"]["generator"] == tree["hift"] and tree["hift"]["sampling_rate"] == 24000
    assert tree["hifigan"]["discriminator"]["mpd"] == {
        "__new__": "matcha.hifigan.models.MultiPeriodDiscriminator"
    }
    assert tree["data_pipeline"][0]["token_path"] == "/m/CosyVoice-BlankEN"


def test_reading_the_yaml_does_not_touch_the_global_rng(tmp_path):
    """hyperpyyaml would run torch.manual_seed(1986) here."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    read_model_yaml(write(tmp_path, MODEL_YAML))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "payload",
    [
        "x: !!python/object/apply:os.system ['touch {marker}']\n",
        "x: !!python/object/new:os.system ['touch {marker}']\n",
        "x: !!python/name:os.system\n",
        "x: !new:os.system ['touch {marker}']\n",
        "x: !apply:os.system ['touch {marker}']\n",
        "x: !name:os.system\n    command: touch {marker}\n",
        "x: !apply:subprocess.run [['touch', '{marker}']]\n",
    ],
)
def test_tags_are_never_executed(tmp_path, payload):
    marker = tmp_path / "executed"
    tree = read_model_yaml(write(tmp_path, payload.format(marker=marker)))
    assert not marker.exists()
    assert isinstance(tree["x"], dict)  # inert data describing the tag
    assert any("os.system" in str(v) or "subprocess.run" in str(v) for v in tree["x"].values())


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("<a>", 3),
        ("<a> * <b>", 12),
        ("<a> + <b> * 2", 11),
        ("(<a> + <b>) * 2", 14),
        ("<a> / <b>", 0.75),
        ("-<a> + 10", 7),
        ("<f> * 2", 1.0),
        ("<s>/file.txt", "dir/file.txt"),
        ("<nested.inner>", 5),
    ],
)
def test_ref_expressions(tmp_path, expr, value):
    text = f"a: 3\nb: 4\nf: 0.5\ns: dir\nnested:\n    inner: 5\nr: !ref {expr}\n"
    assert read_model_yaml(write(tmp_path, text))["r"] == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r: !ref <missing>\n", "no such key"),
        ("a: 1\nr: !ref <a> * __import__('os')\n", "cannot evaluate"),
        ("a: !ref <b>\nb: !ref <a>\n", "circular"),
        ("r: !ref [1]\n", "scalar"),
        ("- 1\n- 2\n", "mapping"),
        ("a: [1,\n", "not valid yaml"),
    ],
)
def test_bad_yaml_and_refs_fail_clearly(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read_model_yaml(write(tmp_path, text))


def test_llm_config_defaults_are_the_real_model(tmp_path):
    cfg = LLMConfig()
    assert (cfg.llm_input_size, cfg.speech_token_size, cfg.mix_ratio) == (896, 6561, (5, 15))
    assert (cfg.eos_token, cfg.fill_token, cfg.stop_token_ids, cfg.vocab_out) == (
        6561,
        6563,
        (6561, 6562, 6563),
        6564,
    )
    assert (cfg.top_p, cfg.top_k, cfg.win_size, cfg.tau_r) == (0.8, 25, 10, 0.1)
    qwen = cfg.qwen2_config()
    assert (qwen.hidden_size, qwen.num_hidden_layers, qwen.num_key_value_heads, qwen.vocab_size) == (
        896,
        24,
        2,
        151936,
    )
    assert qwen._attn_implementation == "sdpa"
    from_yaml = LLMConfig.from_yaml(read_model_yaml(write(tmp_path, MODEL_YAML)))
    assert from_yaml == cfg


def test_llm_config_from_yaml_rejects_other_models(tmp_path):
    with pytest.raises(ConfigError, match="Qwen2LM"):
        LLMConfig.from_yaml(read_model_yaml(write(tmp_path, "llm: !new:cosyvoice.llm.llm.TransformerLM\n")))
    with pytest.raises(ConfigError, match="no 'llm'"):
        LLMConfig.from_yaml({})
    cfg = LLMConfig(llm_input_size=512, llm_output_size=512)
    with pytest.raises(ConfigError, match="hidden_size 896"):
        cfg.qwen2_config()


@pytest.mark.parity
def test_llm_config_from_tiny_json():
    data = tiny_json()
    llm, q = data["llm"], data["qwen2_config"]
    cfg = LLMConfig.from_tiny_json(data)
    assert (cfg.llm_input_size, cfg.llm_output_size, cfg.speech_token_size) == (
        llm["llm_input_size"],
        llm["llm_output_size"],
        llm["speech_token_size"],
    )
    assert cfg.qwen["num_hidden_layers"] == q["num_hidden_layers"]
    assert list(cfg.mix_ratio) == llm["mix_ratio"] and (cfg.sos, cfg.task_id) == (llm["sos"], llm["task_id"])
    sampling = llm["sampling"]
    assert (cfg.top_p, cfg.top_k, cfg.win_size, cfg.tau_r) == (
        sampling["top_p"],
        sampling["top_k"],
        sampling["win_size"],
        sampling["tau_r"],
    )
    # the ids the json lists are the ones our config derives from speech_token_size
    assert (cfg.eos_token, cfg.fill_token, list(cfg.stop_token_ids), cfg.vocab_out) == (
        llm["eos_token"],
        llm["fill_token"],
        llm["stop_token_ids"],
        llm["llm_decoder_out"],
    )
    assert cfg.vocab_out == llm["speech_embedding_rows"]
    qwen = cfg.qwen2_config()
    assert (qwen.hidden_size, qwen.num_attention_heads, qwen.vocab_size) == (
        q["hidden_size"],
        q["num_attention_heads"],
        q["vocab_size"],
    )
    assert (qwen.num_key_value_heads, qwen.intermediate_size) == (
        q["num_key_value_heads"],
        q["intermediate_size"],
    )


def make_model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "CosyVoice2-0.5B"
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    (root / "cosyvoice2.yaml").write_text(MODEL_YAML)
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(REAL_QWEN2))
    for name in ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx", "spk2info.pt"]:
        (root / name).write_bytes(b"")
    return root


def test_model_dir_locates_files_and_reads_config(tmp_path):
    md = ModelDir(make_model_dir(tmp_path))
    assert md.missing() == []
    assert md.llm_pt.name == "llm.pt" and md.qwen_dir.name == "CosyVoice-BlankEN"
    tree = md.read_yaml()
    assert tree["llm"]["llm"]["pretrain_path"] == str(md.root / "CosyVoice-BlankEN")
    assert md.llm_config() == LLMConfig()


def test_model_dir_missing_files_are_named(tmp_path):
    root = make_model_dir(tmp_path)
    (root / "flow.pt").unlink()
    (root / "CosyVoice-BlankEN" / "config.json").unlink()
    md = ModelDir(root)
    assert md.missing() == ["flow.pt"]
    with pytest.raises(ConfigError, match="missing flow.pt"):
        _ = md.flow_pt
    with pytest.raises(ConfigError, match="config.json"):
        md.llm_config()
    with pytest.raises(ConfigError, match="model directory not found"):
        ModelDir(tmp_path / "nope")


def test_dtype_and_device_options():
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int8")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        resolve_dtype(torch.int8)
    assert resolve_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------------------------
# checkpoint


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Embedding(4, 2)


def test_load_state_dict_pt_and_safetensors(tmp_path):
    state = Small().state_dict()
    torch.save(state, tmp_path / "m.pt")
    save_file(state, str(tmp_path / "m.safetensors"))
    for name in ["m.pt", "m.safetensors"]:
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent.pt")


class Boom:
    def __reduce__(self):
        return (print, ("unpickled arbitrary object",))


def test_load_state_dict_refuses_pickled_objects(tmp_path):
    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_state_dict(tmp_path / "evil.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatch, match="state_dict"):
        load_state_dict(tmp_path / "list.pt")


def test_load_strict_names_missing_unexpected_and_misshaped_keys():
    model, state = Small(), Small().state_dict()
    load_strict(model, state, "small.pt")
    assert torch.equal(model.a.weight, state["a.weight"])

    bad = {k: v for k, v in state.items() if k != "a.bias"}
    bad["b.weight"] = torch.zeros(5, 2)
    for i in range(12):
        bad[f"extra.{i:02d}"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as err:
        load_strict(model, bad, "small.pt")
    msg = str(err.value)
    assert msg.startswith("small.pt:")
    assert "missing keys 1: a.bias" in msg
    assert "unexpected keys 12: extra.00" in msg and "extra.09" in msg and "(+2 more)" in msg
    assert "extra.11" not in msg
    assert "b.weight (checkpoint (5, 2), model (4, 2))" in msg
    assert isinstance(err.value, ValueError)


def test_memory_available_is_the_machines_or_what_the_containers_limit_leaves(monkeypatch, tmp_path):
    import os

    from cosyvoice import config

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = config.memory_available(torch.device("cpu"))
    assert 0 < free <= physical
    cgroup = {"memory.max": tmp_path / "max", "memory.current": tmp_path / "current"}
    real_path = config.Path

    def fake(path):
        name = str(path).removeprefix("/sys/fs/cgroup/")
        return cgroup.get(name, real_path(path))

    monkeypatch.setattr(config, "Path", fake)
    cgroup["memory.max"].write_text("1073741824\n")
    cgroup["memory.current"].write_text(str(256 << 20) + "\n")
    assert config.memory_available(torch.device("cpu")) == min(free, (1 << 30) - (256 << 20))
    cgroup["memory.current"].write_text(str(2 << 30))  # over its limit already: nothing
    assert config.memory_available(torch.device("cpu")) == 0
    cgroup["memory.max"].write_text("max\n")  # cgroup v2: no limit
    assert config.memory_available(torch.device("cpu")) <= physical
