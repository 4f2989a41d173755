"""CosyVoice2 speech-token LM: a Qwen2 backbone that reads text embeddings and writes speech tokens.

Module names match the official ``llm.pt`` keys (``llm_embedding``, ``llm.model.model.*``,
``llm_decoder``, ``speech_embedding``), so the released checkpoint loads strictly.  The official
backbone is a ``Qwen2ForCausalLM`` whose 151,936-way ``lm_head`` output is computed and thrown away
at every position; we build only the ``Qwen2Model`` and drop the (tied) ``lm_head`` weight on load.

The backbone runs over *packed rows* (:meth:`Qwen2LM.step`): the new input rows of several
requests, each with its own positions and its own KV cache, in one call, so that every linear
layer reads its weights once for all of them; only attention is per request.  What a request
feeds and when is :class:`~cosyvoice.lm_request.LMRequest`'s business; the generators here run
one request alone, and the LM stage (:mod:`cosyvoice.lm_stage`) runs many together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from .checkpoint import load_state_dict, load_strict
from .config import LLMConfig, ModelDir, resolve_device, resolve_dtype, to_device
from .kv_cache import KVCache, KVPool, KVShape
from .lm_request import ROW_SOS, ROW_SPEECH, ROW_TASK, ROW_TEXT, LMRequest, Row, TokenLimit, feed_text
from .sampling import RasSampler, Sampler

if TYPE_CHECKING:
    from .lm_graphs import DecodeGraphs

__all__ = [
    "ROW_SOS",
    "ROW_TASK",
    "ROW_TEXT",
    "ROW_SPEECH",
    "LM_HEAD_KEY",
    "Qwen2LM",
    "Trace",
    "StopCondition",
    "stop_fn",
    "quantize_int8",
]

# Present in llm.pt (tied to embed_tokens, tie_word_embeddings=true) but never used by CosyVoice.
LM_HEAD_KEY = "llm.model.lm_head.weight"

# trace(rows fed, cache length before the call, number of rows, llm_decoder logits of the last row)
Trace = Callable[[list[Row], int, int, torch.Tensor], None]
StopCondition = Callable[[], bool] | threading.Event
# attend(layer, q, k, v, out): a layer's attention over packed rows (see Qwen2LM.layer)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class _Decoding:
    """The requests of a backbone call that feed one row each from slots of one KV pool (decode
    steps): their attention is one call over the slots' keys, gathered up to the longest and
    masked per request, instead of one call per request: what makes a batch of many decoding
    requests cost little more than one on a GPU, and a step towards a decode step with fixed
    shapes per batch size that a CUDA graph could capture (the key length still varies)."""

    def __init__(
        self,
        pool: KVPool,
        members: list[int],
        rows: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        mask: torch.Tensor,
    ) -> None:
        self.pool = pool
        self.members = set(members)
        self.rows, self.slots, self.positions = rows, slots, positions  # [B] each
        self.length = length  # keys read per request: the longest's, new row included
        self.mask = mask  # [B, 1, 1, length]: each request's own keys

    @classmethod
    def of(
        cls,
        caches: Sequence[KVCache],
        counts: Sequence[int],
        starts: Sequence[int],
        bounds: Sequence[int],
        device: torch.device,
    ) -> _Decoding | None:
        """The decoding requests of a call (None unless at least two share a pool)."""
        pools: dict[int, list[int]] = {}
        for r, (cache, n) in enumerate(zip(caches, counts, strict=True)):
            if n == 1 and cache.pool is not None:
                pools.setdefault(id(cache.pool), []).append(r)
        members = max(pools.values(), key=len, default=[])
        if len(members) < 2:
            return None
        ends = torch.tensor([starts[r] + 1 for r in members])
        length = int(ends.max())
        mask = to_device(torch.arange(length)[None, :] < ends[:, None], device)[:, None, None, :]
        return cls(
            caches[members[0]].pool,
            members,
            to_device([bounds[r] for r in members], device),
            to_device([caches[r].slot for r in members], device),
            to_device([starts[r] for r in members], device),
            length,
            mask,
        )

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Write the members' new keys/values into their slots and their attention into ``out``
        (q/k/v/out: [1, heads, N, d] over all rows of the call)."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]  # [slots, max_len, kv, d]
        keys[self.slots, self.positions] = k[0, :, self.rows].transpose(0, 1)
        values[self.slots, self.positions] = v[0, :, self.rows].transpose(0, 1)
        ks = keys[:, : self.length].index_select(0, self.slots).transpose(1, 2)  # [B, kv, L, d]
        vs = values[:, : self.length].index_select(0, self.slots).transpose(1, 2)
        qs = q[0, :, self.rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, d]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=self.mask, enable_gqa=ks.shape[1] != qs.shape[1]
        )
        out[0, :, self.rows] = o[:, :, 0].transpose(0, 1)


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
        self.stats = StepStats()

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
        cls,
        model_dir: str | Path | ModelDir,
        dtype: str | torch.dtype = "fp32",
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
                ids = to_device([r[1] for r in rows[start:i]], device)
                parts.append(tables[kind](ids))
                start = i
        return torch.cat(parts, dim=0).unsqueeze(0)

    def kv_shape(self) -> KVShape:
        cfg = self.backbone.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        weight = self.speech_embedding.weight
        return KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, weight.dtype, weight.device)

    def new_cache(self) -> KVCache:
        """A KV cache of its own for one request run alone (it grows as needed)."""
        return KVCache.own(self.kv_shape())

    def forward_rows(
        self, xs: torch.Tensor, caches: Sequence[KVCache], counts: Sequence[int]
    ) -> torch.Tensor:
        """The backbone over packed rows: ``xs`` [N, D] holds ``counts[r]`` new rows of request ``r``
        in turn, each request attending causally to its own cache (whose keys and values it
        extends).  Returns the hidden states [N, D] after the final RMSNorm.  Linear layers see all
        N rows at once; attention runs per request over a view of its cache."""
        bb = self.backbone
        starts = [c.length for c in caches]
        for cache, n in zip(caches, counts, strict=True):
            cache.reserve(n)
        bounds = [0]
        for n in counts:
            bounds.append(bounds[-1] + n)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts, strict=True)])
        h = xs.unsqueeze(0)
        cos, sin = bb.rotary_emb(h, to_device(positions, xs.device).unsqueeze(0))
        decoding = _Decoding.of(caches, counts, starts, bounds, xs.device)
        alone = [r for r in range(len(caches)) if decoding is None or r not in decoding.members]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
            if decoding is not None:
                decoding.attend(i, q, k, v, out)
            for r in alone:
                cache = caches[r]
                a, b, start = bounds[r], bounds[r + 1], starts[r]
                end = start + b - a
                cache.keys[i][start:end] = k[0, :, a:b].transpose(0, 1)
                cache.values[i][start:end] = v[0, :, a:b].transpose(0, 1)
                keys = cache.keys[i][:end].permute(1, 0, 2).unsqueeze(0)  # [1, kv_heads, end, d]
                values = cache.values[i][:end].permute(1, 0, 2).unsqueeze(0)
                mask = (
                    None
                    if b - a == 1
                    else torch.ones(b - a, end, dtype=torch.bool, device=xs.device).tril(start)
                )
                out[:, :, a:b] = F.scaled_dot_product_attention(
                    q[:, :, a:b], keys, values, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
                )

        for i in range(len(bb.layers)):
            h = self.layer(i, h, cos, sin, attend)
        for cache, n in zip(caches, counts, strict=True):
            cache.length += n
        return bb.norm(h)[0]

    def layer(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """Decoder layer ``i`` over packed rows ``h`` [1, N, D] (rotary ``cos``/``sin`` of their
        positions); ``attend(i, q, k, v, out)`` stores the rows' keys and values where their
        requests keep them and writes their attention into ``out`` (all [1, heads, N, d])."""
        layer = self.backbone.layers[i]
        attn = layer.self_attn
        n_heads, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
        n = h.shape[1]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, n, n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, n_kv, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, n_kv, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = torch.empty_like(q)
        attend(i, q, k, v, out)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(1, n, n_heads * attn.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def step(
        self,
        batch: Sequence[tuple[Sequence[Row] | torch.Tensor, KVCache]],
        graphs: DecodeGraphs | None = None,
    ) -> torch.Tensor:
        """Feed each request's rows through its cache in one backbone call; float32 logits [B, V]
        of each request's last row.  Rows given as a tensor [1] on the LM's device are one speech
        token not yet known on the host (the LM stage's speculation).  A decode step that
        ``graphs`` takes runs there (fixed shapes, CUDA graphs on a GPU)."""
        self.stats.count(len(batch), sum(len(rows) for rows, _ in batch))
        with torch.inference_mode():  # entered per call, never across a yield (it is thread-local)
            xs = torch.cat(
                [
                    self.speech_embedding(rows)
                    if isinstance(rows, torch.Tensor)
                    else self.embed_rows(rows)[0]
                    for rows, _ in batch
                ]
            )
            counts = [len(rows) for rows, _ in batch]
            caches = [cache for _, cache in batch]
            if graphs is not None and graphs.takes(caches, counts):
                return graphs(xs, caches)
            hidden = self.forward_rows(xs, caches, counts)
            last = torch.tensor(counts).cumsum(0) - 1
            return self.llm_decoder(hidden[to_device(last, hidden.device)]).float()

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [1, n, V] for a full row sequence (causal, no cache)."""
        hidden = self.backbone(inputs_embeds=xs, use_cache=False).last_hidden_state
        return self.llm_decoder(hidden)

    # ------------------------------------------------------------------------------------------
    # generation, one request at a time

    def sampler_for(self, generator: torch.Generator | None) -> Sampler:
        """The model's own sampler (RAS with its parameters) drawing from ``generator``."""
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
        max_tokens: TokenLimit | None = None,
        trace: Trace | None = None,
    ) -> Iterator[int]:
        """Unistream: the whole text is known.  Yields speech tokens until a stop token or
        ``int(len(text) * max_token_text_ratio)`` steps; eos is masked for the first
        ``int(len(text) * min_token_text_ratio)`` steps (official HEAD rule)."""
        request = LMRequest(
            self.config,
            sampler or self.sampler_for(generator),
            prompt_text,
            prompt_speech_token,
            text=text,
            min_ratio=min_token_text_ratio,
            max_ratio=max_token_text_ratio,
            max_tokens=max_tokens,
        )
        return self.run_alone(request, (), should_stop, trace)

    def inference_bistream(
        self,
        text_tokens: Iterable[int | Sequence[int] | torch.Tensor],
        prompt_text: Sequence[int] | torch.Tensor = (),
        prompt_speech_token: Sequence[int] | torch.Tensor = (),
        *,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        should_stop: StopCondition | None = None,
        max_tokens: TokenLimit | None = None,
        trace: Trace | None = None,
    ) -> Iterator[int]:
        """Bistream: text tokens arrive while speech tokens are generated (see
        :class:`~cosyvoice.lm_request.LMRequest`).  ``text_tokens`` may block: it is simply
        iterated when the request needs text, never polled.  ``max_tokens`` caps the final phase,
        which the official code leaves unbounded."""
        request = LMRequest(
            self.config,
            sampler or self.sampler_for(generator),
            prompt_text,
            prompt_speech_token,
            max_tokens=max_tokens,
        )
        return self.run_alone(request, text_tokens, should_stop, trace)

    def run_alone(
        self,
        request: LMRequest,
        text_tokens: Iterable = (),
        should_stop: StopCondition | None = None,
        trace: Trace | None = None,
    ) -> Iterator[int]:
        """Step one request in the calling thread, pulling text from ``text_tokens`` whenever it
        waits for some; yields its speech tokens.  ``should_stop`` is checked before every step
        and every pull; the KV cache is dropped however the generator ends."""
        stopped = stop_fn(should_stop)
        cache = self.new_cache()
        items = iter(text_tokens)
        try:
            while not request.finished:
                if stopped():
                    return
                rows = request.rows()
                if rows is None:  # it waits for text: pull the next item (this may block)
                    feed_text(items, request)
                    continue
                cache_len = cache.length
                logits = self.step([(rows, cache)])[0]
                if trace is not None:
                    trace(list(rows), cache_len, len(rows), logits)
                token = request.accept(logits.log_softmax(dim=-1))
                if request.error is not None:
                    raise request.error
                if token is not None:
                    yield token
        finally:
            del cache


class Timings:
    """Durations bucketed as they are observed (for a histogram: bucket bound -> count, and the
    sum), so that a scrape reads them without a lock on the hot path."""

    BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, float("inf"))

    def __init__(self) -> None:
        self.counts: dict[float, int] = dict.fromkeys(self.BUCKETS, 0)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next(b for b in self.BUCKETS if seconds <= b)] += 1
        self.total += seconds


class StepStats:
    """Backbone calls, the requests and rows they carried (thread-safe counters, for /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = self.requests = self.rows = 0

    def __deepcopy__(self, memo: dict) -> StepStats:  # a copied model (int8) counts on its own
        return StepStats()

    def count(self, requests: int, rows: int) -> None:
        with self._lock:
            self.calls += 1
            self.requests += requests
            self.rows += rows


def stop_fn(should_stop: StopCondition | None) -> Callable[[], bool]:
    """A stop condition (an Event, a callable or None) as a callable."""
    if should_stop is None:
        return lambda: False
    if isinstance(should_stop, threading.Event):
        return should_stop.is_set
    return should_stop


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
