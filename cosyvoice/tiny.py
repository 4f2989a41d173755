"""Write a complete CosyVoice2 model directory with random weights: ``python -m cosyvoice.tiny DIR``.

The layout is the official one (``cosyvoice2.yaml`` with hyperpyyaml tags, ``llm.pt``, ``flow.pt``,
``hift.pt``, ``spk2info.pt``, ``campplus.onnx``, ``speech_tokenizer_v2.onnx``, ``CosyVoice-BlankEN/``),
so every code path that loads and runs the real model runs on it; the audio is noise.
``CosyVoice-BlankEN/`` holds, as in the release, the Qwen2 config, the tokenizer and
``model.safetensors``: the Qwen2 backbone weights as a HuggingFace ``Qwen2ForCausalLM`` checkpoint
(``model.*`` keys, ``lm_head.weight`` left out when tied).  The official ``CosyVoice2`` class loads
that file with ``from_pretrained`` before ``llm.pt`` overwrites the same weights, and refuses a
directory without it; our loader reads only ``config.json`` there, since ``llm.pt`` holds every
weight under ``llm.model.*`` (the file is written from exactly those tensors).

Sizes: ``tiny`` (the golden fixtures' TINY hyper-parameters: a 2-layer, 64-wide Qwen2, a 64-wide flow,
a 32-channel HiFT; written in about a second, the test suite's model) and ``real`` (the released
CosyVoice2-0.5B shapes, ~2.5 GB plus the 2 GB backbone copy, for load and latency measurements).
``--tiny-config config_tiny.json`` takes the hyper-parameters of a fixture set instead (any set in
the fixtures' format), so that a directory matches the set the tests run against.  All use the small
locally trained BPE tokenizer, since the real BlankEN files cannot be fetched.  ``spk2info.pt`` holds
two SFT speakers named like the official ones, ``中文女`` and ``英文男``, with random [1, 192] embeddings.

One deliberate difference from plain random weights: the LM's ``llm_decoder`` row for eos is set so
that eos is about the 4th most likely token at every step (and the unused id 6562 and the fill token
are never sampled), so utterances end after a realistic number of tokens instead of always running
to the length cap.  Everything is seeded; the caller's global RNG is left untouched.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from .config import REAL_QWEN2, LLMConfig, ModelDir
from .llm import LM_HEAD_KEY, ROW_SOS, ROW_SPEECH, ROW_TASK, ROW_TEXT, Qwen2LM
from .text import CosyVoice2Tokenizer, build_tiny_blank_en
from .tiny_onnx import export_tiny_campplus, export_tiny_speech_tokenizer

__all__ = [
    "SIZES",
    "SFT_SPEAKERS",
    "QWEN_WEIGHTS",
    "model_yaml",
    "qwen_checkpoint",
    "size_from_tiny_config",
    "write_model_dir",
    "main",
]

# The Qwen2 backbone checkpoint inside CosyVoice-BlankEN/ (what Qwen2ForCausalLM.from_pretrained reads).
QWEN_WEIGHTS = "model.safetensors"
# llm.pt's prefix of the official Qwen2Encoder's Qwen2ForCausalLM (``llm.model.model.*``, ``llm.model.lm_head``).
_QWEN_PREFIX = "llm.model."

SFT_SPEAKERS = ("中文女", "英文男")

TINY_QWEN2: dict[str, Any] = {
    **REAL_QWEN2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "qwen": TINY_QWEN2,
        "llm_size": 64,
        "flow_input_size": 64,
        "encoder": {
            "output_size": 64,
            "attention_heads": 4,
            "linear_units": 128,
            "num_blocks": 2,
            "pre_lookahead_channels": 64,
        },
        "estimator": {
            "channels": [64],
            "attention_head_dim": 16,
            "n_blocks": 1,
            "num_mid_blocks": 2,
            "num_heads": 2,
        },
        "hift": {"base_channels": 32, "cond_channels": 32},
    },
    "real": {
        "qwen": REAL_QWEN2,
        "llm_size": 896,
        "flow_input_size": 512,
        "encoder": {"output_size": 512, "attention_heads": 8, "linear_units": 2048, "num_blocks": 6},
        "estimator": {
            "channels": [256],
            "attention_head_dim": 64,
            "n_blocks": 4,
            "num_mid_blocks": 12,
            "num_heads": 8,
        },
        "hift": {"base_channels": 512, "cond_channels": 512},
    },
}


Size = str | dict[str, Any]


def _spec(size: Size) -> dict[str, Any]:
    """A size's hyper-parameters: a name of SIZES, or a dict of the same layout."""
    if isinstance(size, dict):
        return size
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)} or a dict like them")
    return SIZES[size]


def size_from_tiny_config(data: dict[str, Any]) -> dict[str, Any]:
    """A size (the layout of a SIZES entry) with the hyper-parameters of a fixture set's
    ``config_tiny.json``, so that a model directory has the shapes of whichever set the tests run
    against.  Everything the yaml template fixes (rates, kernels, vocabularies, streaming constants)
    is checked against ``data`` by :func:`write_model_dir`, which refuses a mismatch."""
    flow, hift = data["flow"], data["hift"]
    enc, est = flow["encoder"], flow["decoder"]["estimator"]
    return {
        "qwen": dict(data["qwen2_config"]),
        "llm_size": int(data["llm"]["llm_input_size"]),
        "flow_input_size": int(flow["input_size"]),
        "encoder": {
            k: enc[k]
            for k in (
                "output_size",
                "attention_heads",
                "linear_units",
                "num_blocks",
                "pre_lookahead_channels",
            )
            if k in enc
        },
        "estimator": {
            k: est[k] for k in ("channels", "attention_head_dim", "n_blocks", "num_mid_blocks", "num_heads")
        },
        "hift": {
            "base_channels": hift["base_channels"],
            "cond_channels": hift["f0_predictor"]["cond_channels"],
        },
        "tiny_config": data,
    }


def model_yaml(size: Size = "tiny", seed: int = 0) -> str:
    """``cosyvoice2.yaml`` text in the official layout and tags, with the hyper-parameters of ``size``."""
    s = _spec(size)
    enc, est, hift = s["encoder"], s["estimator"], s["hift"]
    extra_enc = ""
    if "pre_lookahead_channels" in enc:  # fixed at 512 in the official class; ours reads it
        extra_enc = f"        pre_lookahead_channels: {enc['pre_lookahead_channels']}\n"
    name = size if isinstance(size, str) else "from a config_tiny.json" if "tiny_config" in size else "custom"
    return f"""\
# CosyVoice2 model directory written by `python -m cosyvoice.tiny` (size {name}, seed {seed}).
# RANDOM WEIGHTS: every code path of the real model runs, the audio is noise.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 24000
llm_input_size: {s["llm_size"]}
llm_output_size: {s["llm_size"]}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

# model params
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
    input_size: {s["flow_input_size"]}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {enc["output_size"]}
        attention_heads: {enc["attention_heads"]}
        linear_units: {enc["linear_units"]}
        num_blocks: {enc["num_blocks"]}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {s["flow_input_size"]}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
{extra_enc}    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: {est["channels"]}
            dropout: 0.0
            attention_head_dim: {est["attention_head_dim"]}
            n_blocks: {est["n_blocks"]}
            num_mid_blocks: {est["num_mid_blocks"]}
            num_heads: {est["num_heads"]}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift["base_channels"]}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift["cond_channels"]}

# processor functions
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


@torch.no_grad()
def _shape_eos(llm: Qwen2LM, seed: int) -> None:
    """Make eos about the 4th most likely token (see the module docstring)."""
    cfg = llm.config
    gen = torch.Generator().manual_seed(seed)
    speech = torch.randint(0, cfg.speech_token_size, (40,), generator=gen).tolist()
    rows = (
        [(ROW_SOS, cfg.sos)]
        + [(ROW_TEXT, t) for t in range(3, 23)]
        + [(ROW_TASK, cfg.task_id)]
        + [(ROW_SPEECH, t) for t in speech]
    )
    logits = llm(llm.embed_rows(rows))[0, :, : cfg.speech_token_size]  # [n, 6561]
    fourth = logits.topk(4, dim=-1).values[:, -1].median()
    dec = llm.llm_decoder
    dec.weight[cfg.eos_token] = 0.0
    dec.bias[cfg.eos_token] = fourth
    for never in (cfg.speech_token_size + 1, cfg.fill_token):
        dec.weight[never] = 0.0
        dec.bias[never] = -1e4


def qwen_checkpoint(llm_state: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """The ``Qwen2ForCausalLM`` checkpoint held in an ``llm.pt`` state dict, with the key names of a
    HuggingFace checkpoint (``model.embed_tokens.weight``, ``model.layers.N.…``, ``model.norm.weight``,
    ``lm_head.weight``): llm.pt's ``llm.model.`` prefix dropped.  With tied embeddings ``lm_head`` is
    left out, as ``save_pretrained`` writes it and as Qwen2.5-0.5B ships (``from_pretrained`` ties it
    back); untied, it must be there."""
    out = {k[len(_QWEN_PREFIX) :]: v for k, v in llm_state.items() if k.startswith(_QWEN_PREFIX)}
    if tie_word_embeddings:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" not in out:
        raise ValueError(f"untied word embeddings but no {LM_HEAD_KEY} in the llm state dict")
    else:
        out["lm_head.weight"] = out["lm_head.weight"].clone()  # never storage shared with embed_tokens
    return {k: v.contiguous() for k, v in out.items()}


def _check_tiny_config(tree: dict[str, Any], qwen: dict[str, Any], data: dict[str, Any]) -> None:
    """The written yaml must give exactly the configuration of ``config_tiny.json``."""
    from .flow import FlowConfig
    from .hift import HiFTConfig
    from .model import flow_config_from_yaml, hift_config_from_yaml

    wrong = []
    if flow_config_from_yaml(tree) != FlowConfig.from_dict(data["flow"]):
        wrong.append("flow")
    if hift_config_from_yaml(tree) != HiFTConfig.from_dict(data["hift"]):
        wrong.append("hift")
    ours, theirs = LLMConfig.from_yaml(tree, qwen=qwen), LLMConfig.from_tiny_json(data)
    ours.qwen = {k: v for k, v in ours.qwen.items() if k != "model_type"}
    if ours != theirs:
        wrong.append("llm")
    if wrong:
        raise ValueError(
            f"config_tiny.json has {', '.join(wrong)} settings the model-directory template cannot write"
        )


def prompt_wav(seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> bytes:
    """A WAV file's bytes to clone a voice from on a generated directory: a gliding tone and a
    little noise (random weights make speech tokens of any audio; tests and benchmarks need no
    recording)."""
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    x = 0.3 * np.sin(2 * np.pi * (150 + 60 * t) * t) + noise
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_model_dir(out_dir: str | Path, size: Size = "tiny", seed: int = 0) -> Path:
    """Write the directory (created if needed; existing model files are overwritten).  ``size``:
    a name of SIZES or a dict like them (e.g. from :func:`size_from_tiny_config`)."""
    spec = _spec(size)
    from .flow import CausalMaskedDiffWithXvec
    from .hift import HiFTGenerator
    from .model import flow_config_from_yaml, hift_config_from_yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ModelDir.YAML).write_text(model_yaml(size, seed), encoding="utf-8")
    qwen_dir = build_tiny_blank_en(out / ModelDir.QWEN_DIR)
    qwen = dict(spec["qwen"])
    n_text = len(CosyVoice2Tokenizer(qwen_dir))
    if n_text > qwen["vocab_size"]:
        raise ValueError(f"tokenizer has {n_text} ids but the Qwen2 vocab is {qwen['vocab_size']}")
    (qwen_dir / "config.json").write_text(json.dumps({**qwen, "model_type": "qwen2"}, indent=2))

    md = ModelDir(out)
    tree = md.read_yaml()
    if "tiny_config" in spec:
        _check_tiny_config(tree, qwen, spec["tiny_config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2LM(LLMConfig.from_yaml(tree, qwen=qwen)).eval()
        _shape_eos(llm, seed)
        state = llm.state_dict()
        tied = bool(qwen.get("tie_word_embeddings", True))
        embed = state["llm.model.model.embed_tokens.weight"]
        # the release's llm.pt holds the (unused) lm_head: tied, a copy of the embeddings
        state[LM_HEAD_KEY] = (
            embed if tied else torch.randn(embed.shape, generator=torch.Generator().manual_seed(seed))
        )
        torch.save(state, out / "llm.pt")
        save_file(qwen_checkpoint(state, tied), str(qwen_dir / QWEN_WEIGHTS), metadata={"format": "pt"})
        del llm, state, embed
        torch.save(CausalMaskedDiffWithXvec(flow_config_from_yaml(tree)).state_dict(), out / "flow.pt")
        torch.save(HiFTGenerator(hift_config_from_yaml(tree)).state_dict(), out / "hift.pt")
        gen = torch.Generator().manual_seed(seed + 1)
        spk2info = {name: {"embedding": torch.randn(1, 192, generator=gen)} for name in SFT_SPEAKERS}
        torch.save(spk2info, out / "spk2info.pt")
        export_tiny_campplus(out / "campplus.onnx", seed=seed)
        export_tiny_speech_tokenizer(out / "speech_tokenizer_v2.onnx", seed=seed)
    missing = md.missing()
    if missing:
        raise RuntimeError(f"incomplete model directory, missing {missing}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cosyvoice.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument(
        "--tiny-config",
        metavar="JSON",
        default=None,
        help="take the hyper-parameters of a fixture set's config_tiny.json (instead of --size)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    size: Size = args.size
    if args.tiny_config is not None:
        size = size_from_tiny_config(json.loads(Path(args.tiny_config).read_text(encoding="utf-8")))
    out = write_model_dir(args.dir, size, args.seed)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    name = args.size if args.tiny_config is None else args.tiny_config
    print(
        f"wrote {name} CosyVoice2 model directory {out} ({total / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
