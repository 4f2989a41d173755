"""CosyVoice2 speech-token LM: a Qwen2 backbone that reads text embeddings and writes speech tokens.

Module names match the official ``llm.pt`` keys (``llm_embedding``, ``llm.model.model.*``,
``llm_decoder``, ``speech_embedding``), so the released checkpoint loads strictly.  The official
backbone is a ``Qwen2ForCausalLM`` whose 151,936-way ``lm_head`` output is computed and thrown away
at every position; we build only the ``Qwen2Model`` and drop the (tied) ``lm_head`` weight on load.

Generation is written as plain generators over *rows*: every input row the backbone consumes is a
``(kind, id)`` pair (sos, task_id, a text token, a speech token), embedded only when it is fed.  All
state of a request (rows, KV cache, generated tokens, fill schedule) is local to the generator, so
one model serves concurrent requests from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RotaryEmbedding

from .checkpoint import load_state_dict, load_strict
from .config import LLMConfig, ModelDir, resolve_device, resolve_dtype
from .sampling import RasSampler, Sampler

__all__ = [
    "ROW_SOS", "ROW_TASK", "ROW_TEXT", "ROW_SPEECH", "LM_HEAD_KEY",
    "Qwen2LM", "Trace", "StopCondition", "quantize_int8",
]

# Kinds of input rows (the numbering of the reference fixtures' feed_rows).
ROW_SOS, ROW_TASK, ROW_TEXT, ROW_SPEECH = 0, 1, 2, 3
Row = tuple[int, int]

# Present in llm.pt (tied to embed_tokens, tie_word_embeddings=true) but never used by CosyVoice.
LM_HEAD_KEY = "llm.model.lm_head.weight"

# trace(rows fed, cache length before the call, number of rows, llm_decoder logits of the last row)
Trace = Callable[[list[Row], int, int, torch.Tensor], None]
StopCondition = Callable[[], bool] | threading.Event


class _Stopped(Exception):
    """Raised inside a generator when its stop condition fires or its token cap is reached."""


class _CausalLMShell(nn.Module):
    """Stands where the official ``Qwen2ForCausalLM`` stood (key prefix ``llm.model.``), minus lm_head."""

    def __init__(self, config):
        super().__init__()
        self.model = Qwen2Model(config)


class Qwen2Encoder(nn.Module):
    """Key prefix ``llm.``: the official wrapper around the causal LM."""

    def __init__(self, config):
        super().__init__()
        self.model = _CausalLMShell(config)


class Qwen2LM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        qwen = config.qwen2_config()
        d = config.llm_input_size
        self.llm_embedding = nn.Embedding(2, d)  # row 0 sos, row 1 task_id
        self.llm = Qwen2Encoder(qwen)
        self.llm_decoder = nn.Linear(config.llm_output_size, config.vocab_out)
        self.speech_embedding = nn.Embedding(config.vocab_out, d)

    # ------------------------------------------------------------------------------------------
    # construction / loading

    @property
    def backbone(self) -> Qwen2Model:
        return self.llm.model.model

    def load_checkpoint(self, state: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Strict load of an ``llm.pt`` state_dict; the tied, unused ``lm_head`` weight is dropped."""
        state = {k: v for k, v in state.items() if k != LM_HEAD_KEY}
        load_strict(self, state, "llm.pt", assign=assign)

    @classmethod
    def from_state_dict(
        cls,
        config: LLMConfig,
        state: dict[str, torch.Tensor],
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device | None = "cpu",
    ) -> Qwen2LM:
        """Build on ``meta`` (no allocation, no random init), adopt the checkpoint tensors, cast."""
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        with torch.device("meta"):
            model = cls(config)
        model.load_checkpoint(state, assign=True)
        model.reset_rotary("cpu")  # the meta buffer cannot be moved; give it data first
        model.to(device=device, dtype=dtype)
        model.reset_rotary(device)
        return model.eval()

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path | ModelDir, dtype: str | torch.dtype = "fp32",
        device: str | torch.device | None = "cpu",
    ) -> Qwen2LM:
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        return cls.from_state_dict(md.llm_config(), load_state_dict(md.llm_pt), dtype, device)

    def reset_rotary(self, device: str | torch.device | None = None) -> None:
        """Recompute the rotary ``inv_freq`` (not in the checkpoint) in float32 on ``device``.

        Needed after building on ``meta`` and after casting to fp16/bf16, which would otherwise
        round the frequencies."""
        device = torch.device(device) if device is not None else self.speech_embedding.weight.device
        self.backbone.rotary_emb = Qwen2RotaryEmbedding(config=self.backbone.config, device=device)

    # ------------------------------------------------------------------------------------------
    # forward

    def embed_rows(self, rows: Sequence[Row]) -> torch.Tensor:
        """[1, n, D] input embeddings for ``(kind, id)`` rows, one table lookup per run of a kind."""
        tables = {
            ROW_SOS: self.llm_embedding,
            ROW_TASK: self.llm_embedding,
            ROW_TEXT: self.backbone.embed_tokens,
            ROW_SPEECH: self.speech_embedding,
        }
        device = self.speech_embedding.weight.device
        parts, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][0] != rows[start][0]:
                kind = rows[start][0]
                ids = torch.tensor([r[1] for r in rows[start:i]], dtype=torch.long, device=device)
                parts.append(tables[kind](ids))
                start = i
        return torch.cat(parts, dim=0).unsqueeze(0)

    def forward_one_step(
        self, xs: torch.Tensor, cache: DynamicCache | None
    ) -> tuple[torch.Tensor, DynamicCache]:
        """xs [1, n, D] -> hidden [1, n, D] after the final RMSNorm; positions continue the cache."""
        if cache is None:
            cache = DynamicCache()
        out = self.backbone(inputs_embeds=xs, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [1, n, V] for a full row sequence (causal, no cache)."""
        hidden = self.backbone(inputs_embeds=xs, use_cache=False).last_hidden_state
        return self.llm_decoder(hidden)

    # ------------------------------------------------------------------------------------------
    # generation

    def _sampler(self, sampler: Sampler | None, generator: torch.Generator | None) -> Sampler:
        if sampler is not None:
            return sampler
        c = self.config
        return RasSampler(generator, c.top_p, c.top_k, c.win_size, c.tau_r)

    def inference(
        self,
        text: Sequence[int] | torch.Tensor,
        prompt_text: Sequence[int] | torch.Tensor = (),
        prompt_speech_token: Sequence[int] | torch.Tensor = (),
        *,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        min_token_text_ratio: float = 2,
        max_token_text_ratio: float = 20,
        should_stop: StopCondition | None = None,
        max_tokens: int | None = None,
        trace: Trace | None = None,
    ) -> Iterator[int]:
        """Unistream: the whole text is known.  Yields speech tokens until a stop token or
        ``int(len(text) * max_token_text_ratio)`` steps; eos is masked for the first
        ``int(len(text) * min_token_text_ratio)`` steps (official HEAD rule)."""
        cfg = self.config
        text, prompt_text = _ids(text), _ids(prompt_text)
        rows: list[Row] = (
            [(ROW_SOS, cfg.sos)]
            + [(ROW_TEXT, t) for t in prompt_text + text]
            + [(ROW_TASK, cfg.task_id)]
            + [(ROW_SPEECH, s) for s in _ids(prompt_speech_token)]
        )
        min_len = int(len(text) * min_token_text_ratio)
        max_len = int(len(text) * max_token_text_ratio)
        sample = self._sampler(sampler, generator)
        run = _Run(self, trace, should_stop, max_tokens)
        out: list[int] = []
        try:
            for i in range(max_len):
                logp = run.step(rows)
                if i < min_len:
                    logp[cfg.eos_token] = float("-inf")
                token = int(sample(logp, out))
                if token in cfg.stop_token_ids:
                    break
                yield token
                out.append(token)
                if run.count_token():
                    return
                rows = [(ROW_SPEECH, token)]
        except _Stopped:
            return
        finally:
            run.close()

    def inference_bistream(
        self,
        text_tokens: Iterable[int | Sequence[int] | torch.Tensor],
        prompt_text: Sequence[int] | torch.Tensor = (),
        prompt_speech_token: Sequence[int] | torch.Tensor = (),
        *,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        should_stop: StopCondition | None = None,
        max_tokens: int | None = None,
        trace: Trace | None = None,
    ) -> Iterator[int]:
        """Bistream: text tokens arrive while speech tokens are generated (FACTS 4.4).

        The prompt text is the start of the text stream and the prompt speech is interleaved with
        it in groups of 5 text : 15 speech rows; after that every group of 5 text rows is followed
        by up to 15 generated tokens and a fill token (forced on schedule, or sampled), after which
        generation waits for the next 5 text tokens.  ``text_tokens`` may block: it is simply
        iterated, never polled.  When it is exhausted, the remaining text and task_id are fed and
        generation runs to eos (capped by ``max_tokens``, which the official code lacks).
        """
        cfg = self.config
        n_text, n_speech = cfg.mix_ratio
        fill, eos = cfg.fill_token, cfg.eos_token
        sample = self._sampler(sampler, generator)
        run = _Run(self, trace, should_stop, max_tokens)

        sos_rows: list[Row] = [(ROW_SOS, cfg.sos)]
        rows: list[Row] = list(sos_rows)  # next input; after a decode call, the rows last fed
        text_cache: list[Row] = [(ROW_TEXT, t) for t in _ids(prompt_text)]
        prompt_speech: list[Row] = [(ROW_SPEECH, s) for s in _ids(prompt_speech_token)]
        p = len(prompt_speech)
        next_fill_index = (p // n_speech + 1) * n_speech - p
        out: list[int] = []  # generated tokens, fills included (the sampler's history, as official)
        try:
            for item in text_tokens:
                run.check_stop()
                text_cache.extend((ROW_TEXT, t) for t in _ids(item))
                # Interleave the prompt speech with the text as it arrives; decode only after.
                while prompt_speech and len(text_cache) >= n_text:
                    rows += text_cache[:n_text] + prompt_speech[:n_speech]
                    del text_cache[:n_text], prompt_speech[:n_speech]
                if prompt_speech:
                    continue
                after_fill = bool(out) and out[-1] == fill
                if after_fill or (not out and rows == sos_rows):
                    if len(text_cache) < n_text:
                        continue
                    group = text_cache[:n_text]
                    del text_cache[:n_text]
                    # The fill token itself is never fed: the next group replaces it.
                    rows = group if after_fill else rows + group
                while True:
                    logp = run.step(rows)
                    if len(out) == next_fill_index:
                        token = fill
                    else:
                        logp[eos] = float("-inf")
                        token = int(sample(logp, out))
                    if token == fill:
                        next_fill_index = len(out) + n_speech + 1
                        out.append(token)
                        break
                    if token in cfg.stop_token_ids:
                        raise ValueError(f"speech LM produced stop token {token} before the end of the text")
                    yield token
                    out.append(token)
                    if run.count_token():
                        return
                    rows = [(ROW_SPEECH, token)]

            # End of text.  Quirks kept for numerical equality with the official code: ``rows``
            # still holds what the last decode call fed, so those rows are fed a second time; and
            # prompt speech not yet interleaved (text shorter than the prompt needs) is dropped.
            rows = rows + text_cache + [(ROW_TASK, cfg.task_id)]
            while True:
                logp = run.step(rows)
                token = int(sample(logp, out))
                if token == eos:
                    break
                if token in cfg.stop_token_ids:
                    raise ValueError(f"speech LM produced token {token} after the end of the text")
                yield token
                out.append(token)
                if run.count_token():
                    return
                rows = [(ROW_SPEECH, token)]
        except _Stopped:
            return
        finally:
            run.close()


def quantize_int8(model: Qwen2LM) -> Qwen2LM:
    """A copy with every Linear as dynamic int8 (per-tensor weights, activations quantized per call).

    CPU only.  Decoding one token is memory-bound (~1.45 GB of fp32 Linear weights read per token),
    so 4x smaller weights roughly halve its CPU cost (benchmarks/lm_decode.py).  It is not
    numerically equal to the official model: sampled tokens differ; measure before relying on it.
    Built on ``torch.ao.quantization.quantize_dynamic`` (deprecated by torch in favour of torchao).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8).eval()


class _Run:
    """Per-request decoding state: the KV cache, the stop condition and the token cap."""

    def __init__(self, lm: Qwen2LM, trace: Trace | None, should_stop: StopCondition | None,
                 max_tokens: int | None):
        self.lm, self.trace = lm, trace
        if isinstance(should_stop, threading.Event):
            should_stop = should_stop.is_set
        self.should_stop = should_stop
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.cache: DynamicCache | None = None

    def step(self, rows: list[Row]) -> torch.Tensor:
        """Feed ``rows``; log-probabilities [V] (float32) of the next token."""
        self.check_stop()
        if self.max_tokens is not None and self.n_tokens >= self.max_tokens:
            raise _Stopped
        lm = self.lm
        # inference_mode is entered per call, never across a yield (it is thread-local state).
        with torch.inference_mode():
            cache_len = self.cache.get_seq_length() if self.cache is not None else 0
            hidden, self.cache = lm.forward_one_step(lm.embed_rows(rows), self.cache)
            logits = lm.llm_decoder(hidden[:, -1])[0].float()  # 2-D input: quantized Linear needs it
            if self.trace is not None:
                self.trace(list(rows), cache_len, len(rows), logits)
            logp = logits.log_softmax(dim=-1)
        return logp.clone()  # a normal tensor: callers mask it in place outside inference_mode

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise _Stopped

    def count_token(self) -> bool:
        """Count a yielded token; True when the cap is reached (the request ends as if at eos)."""
        self.n_tokens += 1
        return self.max_tokens is not None and self.n_tokens >= self.max_tokens

    def close(self) -> None:
        self.cache = None


def _ids(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]
