"""Write a second golden-fixture set, in the documented format, from OUR implementation.

    python -m tests.fixture_set OUT_DIR [--seed N] [--source DIR]

Why: the parity tests must take every shape, length, split and count from the fixture files, so
that any set in the format of ``shared/reference/README.md`` is a valid input.  The one public set
cannot show that; this writes another one with a different TINY shape (other widths, heads, layers,
estimator and HiFT channels), other lengths (prompts, token counts, rows, stream chunks, cache
lengths) and random weights drawn from ``--seed``.  The values come from the ``cosyvoice`` package
itself, so running the parity suite on the set is circular for the numbers; what it proves is that
the tests are general (``tests/test_fixture_set.py`` does exactly that).

Every file the tests read is written: ``config_tiny.json``, the three ``tiny_*.safetensors``
(official key names; weights drawn with the README's recipe, so the data is as lively as the
public set's), and every ``.npz``.  ``frontend.npz`` is recomputed from a synthetic clip of another
length with ``cosyvoice.features`` (resampled with our soxr path, not torchaudio's: documented
below); only what does not depend on the data or the model is copied from the source set
(``--source``, default the public set): the three filter matrices in ``frontend.npz`` (constants of
the official functions; recomputing them with our code would only test our code against itself)
and ``real_state_dict_shapes.json`` (a fact about the REAL released checkpoints, not about TINY).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from cosyvoice import features as F
from cosyvoice.config import LLMConfig
from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig, cfm_noise
from cosyvoice.hift import HiFTConfig, HiFTGenerator
from cosyvoice.llm import LM_HEAD_KEY, ROW_SOS, ROW_SPEECH, ROW_TASK, ROW_TEXT, Qwen2LM
from cosyvoice.token2wav import HopSchedule, Token2Wav, hamming_window

__all__ = ["SHAPE", "Lengths", "tiny_config_json", "write_fixture_set", "main"]

# The second TINY shape: every width, head count and depth differs from the public set's, and
# the flow's token embedding (40) differs from its encoder width (48) and the pre-lookahead hidden
# width (56), so a test that confuses two of them fails.
SHAPE: dict[str, Any] = {
    "qwen": {
        "hidden_size": 48,
        "intermediate_size": 112,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "num_hidden_layers": 3,
        "vocab_size": 1280,
    },
    "flow_input_size": 40,
    "encoder": {
        "output_size": 48,
        "attention_heads": 3,
        "linear_units": 80,
        "num_blocks": 3,
        "pre_lookahead_channels": 56,
    },
    "estimator": {
        "channels": [48],
        "attention_head_dim": 12,
        "num_heads": 3,
        "n_blocks": 2,
        "num_mid_blocks": 1,
    },
    "hift": {"base_channels": 24, "cond_channels": 40},
}


@dataclass(frozen=True)
class Lengths:
    """Every length of the set; all differ from the public set's (in brackets)."""

    fwd_text: int = 9  # lm_forward text ids (12); rows = 1 + text + 1 + speech
    fwd_speech: int = 25  # (20)
    nucleus_rows: int = 4  # sampling_nucleus rows (3)
    inf_prompt_text: int = 4  # lm_inference (6)
    inf_text: int = 10  # (8)
    inf_prompt_speech: int = 22  # (15)
    inf_tokens: int = 24  # speech tokens before eos (20); >= 2 x inf_text
    bi_prompt_text: int = 3  # lm_bistream (7)
    bi_prompt_speech: int = 37  # (20): the third prompt group is a partial one (7 of 15)
    bi_text: int = 41  # (23)
    bi_fill_call: int = 25  # sampler call that returns the fill token (18)
    bi_tail: int = 9  # speech tokens after the end of text, before eos (12)
    flow_prompt: int = 13  # flow_inference prompt tokens (10); flow_encoder: prompt + token
    flow_tokens: int = 40  # (31)
    est_frames: int = 110  # flow_estimator frames (76)
    est_valid: int = 101  # frames not masked in the padded case (70)
    est_t: float = 0.55  # (0.3)
    hift_frames: int = 42  # hift.npz mel frames (30)
    hift_cache: int = 2880  # cache_source samples (3840)
    t2w_prompt: int = 30  # token2wav prompt tokens (20): prompt pad 20
    t2w_tokens: int = 260  # (160): 4 chunks instead of 3
    clip_samples: int = 52_300  # frontend clip at 22.05 kHz (68500)


def tiny_config_json(shape: dict[str, Any] = SHAPE) -> dict[str, Any]:
    """``config_tiny.json`` for ``shape``: the layout of the public file, every key present."""
    q, enc, est, hift = shape["qwen"], shape["encoder"], shape["estimator"], shape["hift"]
    width = q["hidden_size"]
    return {
        "qwen2_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "hidden_act": "silu",
            "hidden_size": width,
            "initializer_range": 0.02,
            "intermediate_size": q["intermediate_size"],
            "max_position_embeddings": 32768,
            "max_window_layers": q["num_hidden_layers"],
            "num_attention_heads": q["num_attention_heads"],
            "num_hidden_layers": q["num_hidden_layers"],
            "num_key_value_heads": q["num_key_value_heads"],
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": q["vocab_size"],
        },
        "llm": {
            "llm_input_size": width,
            "llm_output_size": width,
            "speech_token_size": 6561,
            "mix_ratio": [5, 15],
            "sos": 0,
            "task_id": 1,
            "eos_token": 6561,
            "fill_token": 6563,
            "stop_token_ids": [6561, 6562, 6563],
            "llm_decoder_out": 6564,
            "speech_embedding_rows": 6564,
            "llm_embedding_rows": 2,
            "sampling": {"fn": "ras_sampling", "top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1},
        },
        "flow": {
            "input_size": shape["flow_input_size"],
            "output_size": 80,
            "spk_embed_dim": 192,
            "vocab_size": 6561,
            "input_frame_rate": 25,
            "token_mel_ratio": 2,
            "pre_lookahead_len": 3,
            "n_timesteps": 10,
            "encoder": {
                "input_size": shape["flow_input_size"],
                "output_size": enc["output_size"],
                "attention_heads": enc["attention_heads"],
                "linear_units": enc["linear_units"],
                "num_blocks": enc["num_blocks"],
                "num_up_blocks": 4,
                "normalize_before": True,
                "input_layer": "linear",
                "pos_enc_layer_type": "rel_pos_espnet",
                "selfattention_layer_type": "rel_selfattn",
                "activation_type": "swish",
                "use_cnn_module": False,
                "macaron_style": False,
                "static_chunk_size": 25,
                "up_stride": 2,
                "pre_lookahead_channels": enc["pre_lookahead_channels"],
                "layer_norm_eps_in_layers": 1e-12,
                "layer_norm_eps_embed_and_after_norm": 1e-05,
            },
            "decoder": {
                "in_channels": 240,
                "n_spks": 1,
                "spk_emb_dim": 80,
                "cfm_params": {
                    "sigma_min": 1e-06,
                    "solver": "euler",
                    "t_scheduler": "cosine",
                    "training_cfg_rate": 0.2,
                    "inference_cfg_rate": 0.7,
                    "reg_loss_type": "l1",
                },
                "estimator": {
                    "in_channels": 320,
                    "out_channels": 80,
                    "channels": list(est["channels"]),
                    "dropout": 0.0,
                    "attention_head_dim": est["attention_head_dim"],
                    "n_blocks": est["n_blocks"],
                    "num_mid_blocks": est["num_mid_blocks"],
                    "num_heads": est["num_heads"],
                    "act_fn": "gelu",
                    "static_chunk_size": 50,
                    "num_decoding_left_chunks": -1,
                },
            },
        },
        "hift": {
            "in_channels": 80,
            "base_channels": hift["base_channels"],
            "nb_harmonics": 8,
            "sampling_rate": 24000,
            "nsf_alpha": 0.1,
            "nsf_sigma": 0.003,
            "nsf_voiced_threshold": 10,
            "upsample_rates": [8, 5, 3],
            "upsample_kernel_sizes": [16, 11, 7],
            "istft_params": {"n_fft": 16, "hop_len": 4},
            "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5]] * 3,
            "source_resblock_kernel_sizes": [7, 7, 11],
            "source_resblock_dilation_sizes": [[1, 3, 5]] * 3,
            "lrelu_slope": 0.1,
            "audio_limit": 0.99,
            "f0_predictor": {"num_class": 1, "in_channels": 80, "cond_channels": hift["cond_channels"]},
        },
        "streaming": {
            "token_hop_len": 25,
            "token_max_hop_len": 100,
            "stream_scale_factor": 2,
            "pre_lookahead_len": 3,
            "mel_cache_len": 8,
            "source_cache_len": 3840,
            "speech_window": "np.hamming(7680)",
        },
        "tiny_patch_note": "Written by tests/fixture_set.py from the cosyvoice package (NOT the official code): "
        "a second shape to prove the parity tests general.",
        "official_source": "none: generated by our implementation",
        "runtime": {"torch": torch.__version__, "dtype": "float32", "device": "cpu", "threads": 1},
    }


# ----------------------------------------------------------------------------------------------
# weights


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "RMSNorm" in type(module).__name__


@torch.no_grad()
def randomise(model: nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter with the README's recipe (the official init is near-trivial:
    zero biases, unit norms): embeddings N(0,1); norm weights 1+0.1N, norm biases 0.1N; other
    biases and 1-D parameters (and pos_bias_u/v) 0.1N; Snake alpha 1+0.2U; weight-norm magnitudes
    0.5+U; every other weight N(0,1)/sqrt(fan_in), fan_in = numel of one slice along dim 0."""
    for name, p in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if name.endswith("parametrizations.weight.original0"):
            value = 0.5 + torch.rand(p.shape, generator=gen)
        elif isinstance(owner, nn.Embedding):
            value = torch.randn(p.shape, generator=gen)
        elif _is_norm(owner):
            value = torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if leaf == "weight" else 0.0)
        elif leaf == "alpha":
            value = 1.0 + 0.2 * torch.rand(p.shape, generator=gen)
        elif p.dim() == 1 or leaf.startswith("pos_bias"):
            value = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p.numel() // p.shape[0]
            value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        p.copy_(value)


def build_models(cfg: dict[str, Any], seed: int) -> tuple[Qwen2LM, CausalMaskedDiffWithXvec, HiFTGenerator]:
    """The three TINY models of ``cfg`` with seeded random weights (the caller's RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2LM(LLMConfig.from_tiny_json(cfg))
        flow = CausalMaskedDiffWithXvec(FlowConfig.from_dict(cfg["flow"]))
        hift = HiFTGenerator(HiFTConfig.from_dict(cfg["hift"]))
    with torch.no_grad():
        for model in (llm, flow, hift):
            randomise(model, gen)
        llm.llm_decoder.weight.mul_(5.0)  # sharper distributions, as the public set
        hift.f0_predictor.classifier.weight.mul_(250.0)  # f0 mostly voiced, 0-250 Hz
        hift.f0_predictor.classifier.bias.fill_(50.0)
        hift.conv_post.bias[:9] -= 4.0  # small magnitudes: little clipping
        hift.conv_post.parametrizations.weight.original0.mul_(0.2)
    llm.reset_rotary("cpu")
    return llm.eval(), flow.eval(), hift.eval()


def _save(state: dict[str, Tensor], path: Path) -> None:
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )


# ----------------------------------------------------------------------------------------------
# LM


class _Trace:
    """What the backbone was fed, call by call (the layout of feed_rows / feed_call / ...)."""

    def __init__(self, text_received: Callable[[], int] | None = None):
        self.rows: list[tuple[int, int]] = []
        self.calls: list[int] = []
        self.cache_len: list[int] = []
        self.num_rows: list[int] = []
        self.logits: list[np.ndarray] = []
        self.text: list[int] = []
        self.text_received = text_received

    def __call__(self, rows: list[tuple[int, int]], cache_len: int, n_rows: int, logits: Tensor) -> None:
        self.rows += [tuple(r) for r in rows]
        self.calls += [len(self.cache_len)] * len(rows)
        self.cache_len.append(cache_len)
        self.num_rows.append(n_rows)
        self.logits.append(logits.float().numpy().copy())
        if self.text_received is not None:
            self.text.append(self.text_received())

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "feed_rows": np.array(self.rows, dtype=np.int64).reshape(-1, 2),
            "feed_call": np.array(self.calls, dtype=np.int64),
            "call_cache_len": np.array(self.cache_len, dtype=np.int64),
            "call_num_rows": np.array(self.num_rows, dtype=np.int64),
            "step_logits": np.stack(self.logits).astype(np.float32),
        }
        if self.text_received is not None:
            out["call_text_received"] = np.array(self.text, dtype=np.int64)
        return out


def _ids(rng: np.random.Generator, n: int, high: int) -> np.ndarray:
    return rng.integers(0, high, size=n).astype(np.int64)


@torch.inference_mode()
def lm_forward(llm: Qwen2LM, rng: np.random.Generator, n: Lengths) -> dict[str, np.ndarray]:
    """Teacher-forced forward of sos, text, task_id, speech (full causal attention, no cache)."""
    cfg = llm.config
    text, speech = (
        _ids(rng, n.fwd_text, cfg.qwen["vocab_size"]),
        _ids(rng, n.fwd_speech, cfg.speech_token_size),
    )
    rows = (
        [(ROW_SOS, cfg.sos)]
        + [(ROW_TEXT, int(t)) for t in text]
        + [(ROW_TASK, cfg.task_id)]
        + [(ROW_SPEECH, int(s)) for s in speech]
    )
    xs = llm.embed_rows(rows)
    hidden = llm.backbone(inputs_embeds=xs, use_cache=False).last_hidden_state
    logits = llm.llm_decoder(hidden)[0]
    return {
        "text_ids": text,
        "speech_ids": speech,
        "lm_input": xs[0].numpy(),
        "hidden": hidden[0].numpy(),
        "logits": logits.numpy(),
        "logp": logits.log_softmax(-1).numpy(),
    }


def sampling_nucleus(logits: np.ndarray, n: Lengths, top_p: float, top_k: int) -> dict[str, np.ndarray]:
    """The README's rule on a full stable descending sort, for rows whose nucleus closes before
    top_k (so that the candidate crossing top_p is part of it)."""
    picked, counts, padded, idx30, prob30 = [], [], [], [], []
    for r in np.linspace(1, len(logits) - 1, 4 * n.nucleus_rows).astype(int):
        probs = torch.from_numpy(logits[r]).float().log_softmax(-1).softmax(-1)
        values, ids = probs.sort(descending=True, stable=True)
        cum, count = torch.zeros((), dtype=torch.float32), 0
        for v in values[:top_k]:
            if not cum < top_p:
                break
            cum, count = cum + v, count + 1
        if not cum >= top_p or int(r) in picked:
            continue
        picked.append(int(r))
        counts.append(count)
        padded.append(np.pad(values[:count].numpy(), (0, top_k - count)))
        idx30.append(ids[:30].numpy())
        prob30.append(values[:30].numpy())
        if len(picked) == n.nucleus_rows:
            break
    if len(picked) < n.nucleus_rows:
        raise RuntimeError("too few logit rows with a nucleus smaller than top_k")
    return {
        "logits_rows": np.array(picked, dtype=np.int64),
        "candidate_count": np.array(counts, dtype=np.int64),
        "candidate_probs_padded": np.stack(padded).astype(np.float32),
        "sorted_top30_idx": np.stack(idx30).astype(np.int64),
        "sorted_top30_prob": np.stack(prob30),
    }


def lm_inference(llm: Qwen2LM, rng: np.random.Generator, n: Lengths) -> dict[str, np.ndarray]:
    """Unistream with forced choices: inf_tokens speech tokens, then eos."""
    cfg = llm.config
    prompt_text = _ids(rng, n.inf_prompt_text, cfg.qwen["vocab_size"])
    text = _ids(rng, n.inf_text, cfg.qwen["vocab_size"])
    prompt_speech = _ids(rng, n.inf_prompt_speech, cfg.speech_token_size)
    choices = np.append(_ids(rng, n.inf_tokens, cfg.speech_token_size), cfg.eos_token)
    it, masked = iter(choices.tolist()), []

    def sampler(logp: Tensor, decoded: list[int]) -> int:
        masked.append(bool(torch.isneginf(logp[cfg.eos_token])))
        return next(it)

    trace = _Trace()
    out = list(
        llm.inference(
            text,
            prompt_text,
            prompt_speech,
            sampler=sampler,
            trace=trace,
            min_token_text_ratio=2,
            max_token_text_ratio=20,
        )
    )
    if out != choices[:-1].tolist():
        raise RuntimeError("unistream did not yield the forced tokens")
    return {
        "prompt_text": prompt_text,
        "text": text,
        "prompt_speech_token": prompt_speech,
        "forced_choices": choices,
        "out_tokens": np.array(out, dtype=np.int64),
        "min_len": np.array(int(n.inf_text * 2), dtype=np.int64),
        "max_len": np.array(int(n.inf_text * 20), dtype=np.int64),
        **trace.arrays(),
        "eos_masked": np.array(masked, dtype=bool),
    }


def lm_bistream(llm: Qwen2LM, rng: np.random.Generator, n: Lengths) -> dict[str, np.ndarray]:
    """Bistream, text one token at a time; one sampled fill; bi_tail tokens after the text, then eos."""
    cfg = llm.config
    prompt_text = _ids(rng, n.bi_prompt_text, cfg.qwen["vocab_size"])
    prompt_speech = _ids(rng, n.bi_prompt_speech, cfg.speech_token_size)
    text = _ids(rng, n.bi_text, cfg.qwen["vocab_size"])
    received = [0]
    choices: list[int] = []
    tail = [0]

    def text_one_at_a_time() -> Iterator[int]:
        for i, t in enumerate(text.tolist()):
            received[0] = i + 1
            yield t
        received[0] = -1

    def sampler(logp: Tensor, decoded: list[int]) -> int:
        if received[0] == -1:
            if tail[0] == n.bi_tail:
                return cfg.eos_token  # not recorded: the tests answer eos once the choices run out
            tail[0] += 1
        token = (
            cfg.fill_token if len(choices) == n.bi_fill_call else int(rng.integers(0, cfg.speech_token_size))
        )
        choices.append(token)
        return token

    trace = _Trace(lambda: received[0])
    yielded = list(
        llm.inference_bistream(text_one_at_a_time(), prompt_text, prompt_speech, sampler=sampler, trace=trace)
    )
    if tail[0] != n.bi_tail or cfg.fill_token not in choices:
        raise RuntimeError("bistream text too short for the sampled fill or the tail")
    p = n.bi_prompt_speech
    return {
        "prompt_text": prompt_text,
        "prompt_speech_token": prompt_speech,
        "text": text,
        "sampler_choices": np.array(choices, dtype=np.int64),
        "sampled_fill_call": np.array(n.bi_fill_call, dtype=np.int64),
        "yielded_tokens": np.array(yielded, dtype=np.int64),
        **trace.arrays(),
        "next_fill_index_initial": np.array((p // 15 + 1) * 15 - p, dtype=np.int64),
    }


# ----------------------------------------------------------------------------------------------
# flow


@torch.no_grad()
def flow_sets(
    flow: CausalMaskedDiffWithXvec, gen: torch.Generator, n: Lengths
) -> dict[str, dict[str, np.ndarray]]:
    """flow_inference.npz, flow_encoder.npz (its tokens = prompt + tokens of flow_inference) and
    flow_estimator.npz."""
    cfg = flow.cfg
    prompt = torch.randint(0, cfg.vocab_size, (1, n.flow_prompt), generator=gen)
    token = torch.randint(0, cfg.vocab_size, (1, n.flow_tokens), generator=gen)
    prompt_feat = torch.randn(1, cfg.token_mel_ratio * n.flow_prompt, cfg.output_size, generator=gen)
    emb = torch.randn(1, cfg.spk_embed_dim, generator=gen)
    n_pf = prompt_feat.shape[1]

    # encoder, three modes, with taps
    tokens = torch.cat([prompt, token], dim=1)
    total = tokens.shape[1]
    xs = flow.embed_tokens(tokens)
    lens = torch.tensor([total])
    la = cfg.pre_lookahead_len
    enc: dict[str, np.ndarray] = {
        "tokens": tokens[0].numpy(),
        "token_len": np.array(total, dtype=np.int64),
        "xs": xs[0].numpy(),
    }
    for mode, kwargs in (
        ("full", {"xs": xs}),
        ("stream", {"xs": xs, "streaming": True}),
        ("stream_ctx", {"xs": xs[:, :-la], "context": xs[:, -la:], "streaming": True}),
    ):
        taps: dict[str, Tensor] = {}
        h, _ = flow.encoder(xs_lens=lens, taps=taps, **kwargs)
        for name, value in taps.items():
            enc[f"{mode}_{name}"] = value[0].numpy()
        enc[f"{mode}_h_proj"] = flow.encoder_proj(h)[0].numpy()

    # inference, three modes; every Euler step of the non-streaming one
    def run(streaming: bool, finalize: bool) -> np.ndarray:
        mel = flow.inference(
            token,
            torch.tensor([token.shape[1]]),
            prompt,
            torch.tensor([prompt.shape[1]]),
            prompt_feat,
            torch.tensor([n_pf]),
            emb,
            streaming=streaming,
            finalize=finalize,
        )
        return mel[0].numpy()

    spks = flow.speaker(emb)
    mu = torch.from_numpy(enc["full_h_proj"]).T[None]
    cond = torch.zeros_like(mu)
    cond[:, :, :n_pf] = prompt_feat.transpose(1, 2)
    trace: list = []
    flow.decoder(mu, torch.ones(1, 1, mu.shape[2]), spks, cond, n_timesteps=cfg.n_timesteps, trace=trace)
    inf = {
        "prompt_token": prompt[0].numpy(),
        "token": token[0].numpy(),
        "prompt_feat": prompt_feat[0].numpy(),
        "embedding": emb[0].numpy(),
        "spk_proj": spks[0].numpy(),
        "rand_noise_head": cfm_noise()[0, :, :1024].numpy(),
        "nonstream_final_mel": run(False, True),
        "nonstream_final_step_x": torch.stack([x[0] for x, _, _ in trace]).numpy(),
        "nonstream_final_step_t": torch.stack([t for _, t, _ in trace]).numpy(),
        "nonstream_final_step_est_out": torch.stack([o for _, _, o in trace]).numpy(),
        "stream_final_mel": run(True, True),
        "stream_chunk_mel": run(True, False),
    }

    # estimator: batch 2, row 1 the unconditional half of CFG
    T, est = n.est_frames, flow.decoder.estimator
    x = torch.randn(2, cfg.output_size, T, generator=gen)
    mu = torch.randn(2, cfg.output_size, T, generator=gen)
    cond = torch.randn(2, cfg.output_size, T, generator=gen)
    spks = torch.randn(2, cfg.output_size, generator=gen)
    mu[1], cond[1], spks[1] = 0, 0, 0
    t = torch.full((2,), n.est_t)
    mask = torch.ones(2, 1, T)
    padded = mask.clone()
    padded[:, :, n.est_valid :] = 0
    est_fx = {
        "x": x,
        "mask": mask,
        "mu": mu,
        "t": t,
        "spks": spks,
        "cond": cond,
        "out_nonstream": est(x, mask, mu, t, spks, cond, streaming=False),
        "out_stream": est(x, mask, mu, t, spks, cond, streaming=True),
        "mask_padded": padded,
        "out_padded_nonstream": est(x, padded, mu, t, spks, cond, streaming=False),
        "time_emb": est.time_embedding(t),
        "sinusoidal_t": est.time_embeddings(t),
    }
    return {
        "flow_inference.npz": inf,
        "flow_encoder.npz": enc,
        "flow_estimator.npz": {k: v.numpy() for k, v in est_fx.items()},
    }


# ----------------------------------------------------------------------------------------------
# HiFT and token2wav


@torch.no_grad()
def hift_set(hift: HiFTGenerator, gen: torch.Generator, n: Lengths) -> dict[str, np.ndarray]:
    """f0, source with its recorded normal draws, its STFT, decode, and inference with a cache."""
    mel = torch.randn(1, hift.cfg.in_channels, n.hift_frames, generator=gen)
    f0 = hift.f0_predictor(mel)
    f0_up = hift.f0_upsamp(f0[:, None])  # [1, 1, L]
    L, dim = f0_up.shape[-1], hift.cfg.nb_harmonics + 1

    def draws() -> tuple[Tensor, Tensor]:
        rand_ini = torch.rand(dim, generator=gen)
        rand_ini[0] = 0
        return rand_ini, torch.randn(1, L, dim, generator=gen)

    rand_ini, noise = draws()
    source, uv = hift.m_source(f0_up.transpose(1, 2), noise=noise)
    real, imag = hift._stft(source[:, :, 0])
    cache = 0.1 * torch.randn(1, 1, n.hift_cache, generator=gen)
    inf_ini, inf_noise = draws()
    audio, inf_source = hift.inference(mel, cache, noise=inf_noise)
    return {
        "mel": mel[0].numpy(),
        "f0": f0[0].numpy(),
        "f0_upsampled": f0_up[0, 0].numpy(),
        "uv": uv[0, :, 0].numpy(),
        "sinegen_rand_ini": rand_ini.numpy(),
        "sinegen_noise_randn": noise[0].numpy(),
        "source_noise_branch_randn": torch.randn(L, 1, generator=gen).numpy(),
        "source": source[0, :, 0].numpy(),
        "source_stft_real": real[0].numpy(),
        "source_stft_imag": imag[0].numpy(),
        "audio": hift.decode(mel, source.transpose(1, 2))[0].numpy(),
        "cache_source": cache[0, 0].numpy(),
        "inference_rand_ini": inf_ini.numpy(),
        "inference_sinegen_noise_randn": inf_noise[0].numpy(),
        "inference_source": inf_source[0, 0].numpy(),
        "inference_audio": audio[0].numpy(),
    }


class _RecordingFlow:
    """Passes flow calls through, recording (tokens, streaming, finalize, full mel)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec):
        self.flow, self.calls = flow, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.flow, name)

    def inference(self, **kw: Any) -> Tensor:
        mel = self.flow.inference(**kw)
        self.calls.append((kw["token"].shape[1], kw["streaming"], kw["finalize"], mel[0].clone()))
        return mel


class _RecordingT2W(Token2Wav):
    """Records what HiFT was fed per call: (mel, cache length, source, raw speech)."""

    def __init__(self, flow: Any, hift: HiFTGenerator):
        super().__init__(flow, hift)
        self.fed: list[tuple[Tensor, int, Tensor, Tensor]] = []

    def _vocode(self, stream: Any, mel: Tensor, cache_source: Tensor | None) -> tuple[Tensor, Tensor]:
        speech, source = super()._vocode(stream, mel, cache_source)
        cache_len = 0 if cache_source is None else cache_source.shape[-1]
        self.fed.append((mel[0].clone(), cache_len, source[0, 0].clone(), speech[0].clone()))
        return speech, source


def token2wav_set(
    flow: CausalMaskedDiffWithXvec,
    hift: HiFTGenerator,
    gen: torch.Generator,
    cfg: dict[str, Any],
    n: Lengths,
    seed: int,
) -> dict[str, np.ndarray]:
    """The official chunk loop ("exact" mode, hop schedule of the config) and the non-stream call."""
    fcfg, st = flow.cfg, cfg["streaming"]
    prompt = torch.randint(0, fcfg.vocab_size, (n.t2w_prompt,), generator=gen).numpy()
    prompt_feat = torch.randn(fcfg.token_mel_ratio * n.t2w_prompt, fcfg.output_size, generator=gen).numpy()
    emb = torch.randn(fcfg.spk_embed_dim, generator=gen).numpy()
    tokens = torch.randint(0, fcfg.vocab_size, (n.t2w_tokens,), generator=gen).numpy()
    schedule = HopSchedule(st["token_hop_len"], st["stream_scale_factor"], st["token_max_hop_len"])
    rec = _RecordingFlow(flow)
    t2w = _RecordingT2W(rec, hift)
    t2w.open("fx", prompt, prompt_feat, emb, schedule=schedule, mode="exact", seed=seed)
    t2w.push("fx", tokens)
    out = t2w.pull("fx") + t2w.pull("fx", finished=True)
    if not len(out) == len(rec.calls) == len(t2w.fed):
        raise RuntimeError("one flow call and one vocoder call per chunk expected")
    fx: dict[str, np.ndarray] = {
        "tokens": tokens,
        "prompt_token": prompt,
        "prompt_feat": prompt_feat,
        "embedding": emb,
        "n_chunks": np.array(len(out), dtype=np.int64),
        "speech_window": hamming_window().numpy(),
    }
    for i, ((n_tok, streaming, finalize, mel), (mel_in, cache_len, source, speech), chunk) in enumerate(
        zip(rec.calls, t2w.fed, out, strict=True)
    ):
        fx.update(
            {
                f"chunk{i}_n_tokens": np.array(n_tok, dtype=np.int64),
                f"chunk{i}_streaming": np.array(int(streaming), dtype=np.int64),
                f"chunk{i}_finalize": np.array(int(finalize), dtype=np.int64),
                f"chunk{i}_flow_mel": mel.numpy(),
                f"chunk{i}_hift_mel_in": mel_in.numpy(),
                f"chunk{i}_hift_cache_source_len": np.array(cache_len, dtype=np.int64),
                f"chunk{i}_hift_source": source.numpy(),
                f"chunk{i}_hift_speech_raw": speech.numpy(),
                f"chunk{i}_out": chunk,
            }
        )
    rec.calls.clear()
    t2w.fed.clear()
    fx["nonstream_out"] = t2w.token2wav(tokens, prompt, prompt_feat, emb, seed=seed + 1)
    fx["nonstream_flow_mel"] = rec.calls[0][3].numpy()
    fx["nonstream_hift_source"] = t2w.fed[0][2].numpy()
    return fx


# ----------------------------------------------------------------------------------------------
# frontend (not model-dependent)


def synthetic_clip(n: Lengths, seed: int) -> np.ndarray:
    """A speech-like int16 clip at 22.05 kHz: voiced harmonic segments with a gliding f0 and a
    formant-ish spectral tilt, exact-zero gaps inside and a silent tail (so the fbank floor and
    whisper's global clamp are exercised, as by the public espeak clip)."""
    rng = np.random.default_rng(seed)
    sr, total = 22050, n.clip_samples
    wav = np.zeros(total)
    pos = int(0.05 * sr)
    end = int(total * 0.85)
    while pos < end:
        length = int(rng.uniform(0.12, 0.35) * sr)
        seg = np.arange(min(length, end - pos)) / sr
        f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * seg))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        tone = sum(np.sin(k * phase) / k**1.2 for k in range(1, 25))
        tone += 0.05 * rng.standard_normal(len(seg))
        wav[pos : pos + len(seg)] = tone * np.hanning(len(seg))
        pos += len(seg) + int(rng.uniform(0.0, 0.08) * sr)  # sometimes no gap, sometimes exact zeros
    wav *= 0.75 / np.abs(wav).max()
    return np.round(wav * 32767).astype(np.int16)


def frontend_set(n: Lengths, seed: int, source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every waveform-dependent array recomputed with cosyvoice.features from another clip; the
    filter matrices (constants of the official functions) copied from ``source``."""
    clip = synthetic_clip(n, seed)
    buf = io.BytesIO()
    sf.write(buf, clip, 22050, subtype="PCM_16", format="WAV")
    wav16 = F.load_wav(buf.getvalue(), 16000)[0].numpy()
    wav24 = F.load_wav(buf.getvalue(), 24000)[0].numpy()
    raw = F.kaldi_fbank(wav16).numpy()
    prompt_feat = F.prompt_mel_24k(wav24).numpy()
    half = prompt_feat.shape[0] // 2
    counts = np.array([half - 1, half, half + 1], dtype=np.int64)
    return {
        "wav_22050_int16": clip,
        "wav_16k": wav16,
        "wav_24k": wav24,
        "campplus_fbank_raw": raw,
        "campplus_fbank": raw - raw.mean(axis=0, keepdims=True),
        "kaldi_mel_banks": source["kaldi_mel_banks"],
        "whisper_log_mel": F.whisper_log_mel(wav16).numpy(),
        "whisper_mel_filters_128": source["whisper_mel_filters_128"],
        "prompt_feat": prompt_feat,
        "matcha_mel_basis": source["matcha_mel_basis"],
        "align_token_counts": counts,
        "align_n": np.minimum(half, counts).astype(np.int64),
    }


# ----------------------------------------------------------------------------------------------


def write_fixture_set(
    out_dir: str | Path, seed: int = 1, source_dir: str | Path | None = None, lengths: Lengths | None = None
) -> Path:
    """Write the whole set into ``out_dir`` (created); ``source_dir`` (default: the reference set
    the tests use) supplies the model-independent constants."""
    from tests.conftest import reference_dir

    n = lengths or Lengths()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source_dir) if source_dir is not None else reference_dir()
    cfg = tiny_config_json()
    (out / "config_tiny.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(src / "real_state_dict_shapes.json", out / "real_state_dict_shapes.json")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the official fixtures were made (and reproducible across machines)
    with torch.random.fork_rng(devices=[]):
        llm, flow, hift = build_models(cfg, seed)
        llm_state = llm.state_dict()
        llm_state[LM_HEAD_KEY] = llm_state["llm.model.model.embed_tokens.weight"]  # tied, as in the release
        _save(llm_state, out / "tiny_llm.safetensors")
        _save(flow.state_dict(), out / "tiny_flow.safetensors")
        _save(hift.state_dict(), out / "tiny_hift.safetensors")

        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        fwd = lm_forward(llm, rng, n)
        sets: dict[str, dict[str, np.ndarray]] = {
            "lm_forward.npz": fwd,
            "sampling_nucleus.npz": sampling_nucleus(fwd["logits"], n, llm.config.top_p, llm.config.top_k),
            "lm_inference.npz": lm_inference(llm, rng, n),
            "lm_bistream.npz": lm_bistream(llm, rng, n),
            **flow_sets(flow, gen, n),
            "hift.npz": hift_set(hift, gen, n),
            "token2wav_stream.npz": token2wav_set(flow, hift, gen, cfg, n, seed),
        }
        with np.load(src / "frontend.npz") as data:
            sets["frontend.npz"] = frontend_set(n, seed, {k: data[k] for k in data.files})
    torch.set_num_threads(threads)
    for name, arrays in sets.items():
        np.savez(out / name, **arrays)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fixture_set", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=1, help="weights and data (default 1)")
    p.add_argument(
        "--source",
        default=None,
        help="fixture set to copy the model-independent constants from (default: the reference set)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = write_fixture_set(args.out_dir, args.seed, args.source)
    print(f"wrote fixture set {out} (seed {args.seed}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
