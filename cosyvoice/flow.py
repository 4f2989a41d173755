"""Speech tokens -> mel: CosyVoice2's `CausalMaskedDiffWithXvec` and a constant-cost streaming front.

`CausalMaskedDiffWithXvec.inference` is the official algorithm (FACTS 5.1/5.4): embed prompt+new
tokens, run the upsampling conformer encoder, project to 80-d `mu`, and integrate the flow-matching
ODE with 10 Euler steps on a cosine time grid, classifier-free guidance 0.7 (batch of 2, the second
row unconditioned), starting from a fixed noise tensor.

`FlowStream` produces the same mel as the official streaming chunk loop (which re-runs the whole
prefix for every chunk) by evaluating each frame once: in streaming mode the encoder and estimator
are causal at chunk granularity, the Euler update is frame-wise, and the noise is a fixed tensor
sliced by absolute frame index, so a finished chunk never changes; only convolution tails and
attention keys/values of finished frames are kept, per request.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import settle, to_device
from .flow_encoder import EncoderCache, EncoderConfig, UpsampleConformerEncoder
from .flow_estimator import (
    CacheGroup,
    CausalConditionalDecoder,
    EstimatorCache,
    EstimatorConfig,
    EstimatorSlots,
    SlotBatch,
    state_widths,
)

NOISE_FRAMES = 15000  # 300 s of mel at 50 Hz: the longest utterance the official noise covers


@functools.lru_cache(maxsize=1)
def cfm_noise() -> Tensor:
    """The official initial noise: `torch.randn([1, 80, 15000])` right after `torch.manual_seed(0)`.
    A private generator seeded with 0 draws the same values without touching the global RNG.
    Shared read-only by every request (callers slice it, never write to it)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn([1, 80, NOISE_FRAMES], generator=gen, dtype=torch.float32)


@functools.lru_cache(maxsize=4)
def cfm_noise_on(device: torch.device) -> Tensor:
    """:func:`cfm_noise` kept on ``device`` (4.8 MB), so that a stream's chunk slices it there
    instead of copying a slice from the host, which waits for the device's queued work."""
    noise = cfm_noise().to(device)
    settle(device)
    return noise


def euler_schedule(n_timesteps: int, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """(t, dt) per Euler step on the cosine grid t_k = 1 - cos(k/n * pi/2), accumulated exactly as
    the official solver does (t += dt; dt = t_grid[k+1] - t) so that every float matches."""
    if n_timesteps < 1:
        raise ValueError("n_timesteps must be >= 1")
    grid = torch.linspace(0, 1, n_timesteps + 1, dtype=dtype)
    grid = 1 - torch.cos(grid * 0.5 * torch.pi)
    t, dt = grid[0], grid[1] - grid[0]
    steps = []
    for k in range(1, n_timesteps + 1):
        steps.append((t, dt))
        t = t + dt
        if k < n_timesteps:
            dt = grid[k + 1] - t
    return steps


@dataclass
class FlowConfig:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        """Accepts the `flow` section of config_tiny.json (nested encoder / decoder.estimator)."""
        known = {f.name for f in fields(cls)} - {"encoder", "estimator"}
        kwargs = {k: v for k, v in d.items() if k in known}
        decoder = d.get("decoder", {})
        if "inference_cfg_rate" in decoder.get("cfm_params", {}):
            kwargs["inference_cfg_rate"] = decoder["cfm_params"]["inference_cfg_rate"]
        if "encoder" in d:
            kwargs["encoder"] = EncoderConfig.from_dict(d["encoder"])
        if "estimator" in decoder:
            kwargs["estimator"] = EstimatorConfig.from_dict(decoder["estimator"])
        return cls(**kwargs)

    @property
    def chunk_tokens(self) -> int:
        """Tokens per attention chunk (the estimator's chunk is in mel frames)."""
        return self.estimator.static_chunk_size // self.token_mel_ratio


class CausalConditionalCFM(nn.Module):
    """Owns the estimator (checkpoint prefix `decoder.estimator`) and the Euler/CFG solver."""

    def __init__(self, estimator_cfg: EstimatorConfig, inference_cfg_rate: float = 0.7):
        super().__init__()
        self.inference_cfg_rate = inference_cfg_rate
        self.estimator = CausalConditionalDecoder(estimator_cfg)

    def guided(self, out: Tensor) -> Tensor:
        """Row 0 conditioned, row 1 unconditioned -> guided velocity [1, 80, T]."""
        rate = self.inference_cfg_rate
        return (1.0 + rate) * out[:1] - rate * out[1:]

    def forward(
        self,
        mu: Tensor,
        mask: Tensor,
        spks: Tensor,
        cond: Tensor,
        n_timesteps: int = 10,
        streaming: bool = False,
        trace: list | None = None,
        left_chunks: int | None = None,
    ) -> Tensor:
        """mu, cond [1, 80, T]; mask [1, 1, T]; spks [1, 80] -> mel [1, 80, T].
        `trace`, when given, receives (x, t, raw estimator output) of every step (for tests)."""
        T = mu.shape[2]
        if T > NOISE_FRAMES:
            raise ValueError(f"{T} mel frames exceed the {NOISE_FRAMES}-frame noise tensor (300 s)")
        x = cfm_noise_on(mu.device)[:, :, :T].to(dtype=mu.dtype)
        zeros_like = torch.zeros_like
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, zeros_like(mu)])
        spks_in = torch.cat([spks, zeros_like(spks)])
        cond_in = torch.cat([cond, zeros_like(cond)])
        for t, dt in euler_schedule(n_timesteps, mu.dtype):
            t_in = t.to(mu.device).expand(2)
            out = self.estimator(
                torch.cat([x, x]),
                mask_in,
                mu_in,
                t_in,
                spks_in,
                cond_in,
                streaming=streaming,
                left_chunks=left_chunks,
            )
            if trace is not None:
                trace.append((x, t, out))
            x = x + dt * self.guided(out)
        return x.float()


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, cfg: FlowConfig | None = None):
        super().__init__()
        cfg = cfg or FlowConfig()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg.estimator, cfg.inference_cfg_rate)

    def speaker(self, embedding: Tensor) -> Tensor:
        """[1, 192] x-vector -> [1, 80] `spks` (projection of the L2-normalised embedding)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, tokens: Tensor) -> Tensor:  # [1, T] int -> [1, T, input_size]
        return self.input_embedding(torch.clamp(tokens, min=0))

    @torch.no_grad()
    def inference(
        self,
        token: Tensor,
        token_len: Tensor,
        prompt_token: Tensor,
        prompt_token_len: Tensor,
        prompt_feat: Tensor,
        prompt_feat_len: Tensor,
        embedding: Tensor,
        streaming: bool,
        finalize: bool,
        n_timesteps: int | None = None,
        left_chunks: int | None = None,
    ) -> Tensor:
        """token [1, N], prompt_token [1, P], prompt_feat [1, F, 80], embedding [1, 192] ->
        mel [1, 80, T_new] for the new tokens (the prompt's F frames removed). With
        finalize=False the last `pre_lookahead_len` tokens are lookahead only.

        `n_timesteps` (default 10, the official value) trades quality for time: cost is linear in
        it, and anything but 10 no longer matches the official output. `left_chunks` (streaming
        only, not official) limits encoder and estimator attention to that many earlier chunks: the
        full-recompute reference for `FlowStream(left_chunks=...)`."""
        if token.shape[0] != 1:
            raise ValueError("batch size 1 only (as the official inference)")
        n_timesteps = self.cfg.n_timesteps if n_timesteps is None else n_timesteps
        spks = self.speaker(embedding)
        tokens = torch.cat([prompt_token, token], dim=1)
        lens = prompt_token_len + token_len
        xs = self.embed_tokens(tokens)
        if finalize:
            h, _ = self.encoder(xs, lens, streaming=streaming, left_chunks=left_chunks)
        else:
            la = self.cfg.pre_lookahead_len
            if xs.shape[1] <= la:
                raise ValueError("finalize=False needs more tokens than the lookahead")
            h, _ = self.encoder(
                xs[:, :-la], lens, context=xs[:, -la:], streaming=streaming, left_chunks=left_chunks
            )
        n_prompt = prompt_feat.shape[1]
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()  # [1, 80, T]
        T = mu.shape[2]
        cond = torch.zeros(1, self.cfg.output_size, T, dtype=mu.dtype, device=mu.device)
        cond[:, :, :n_prompt] = prompt_feat.transpose(1, 2)
        mask = torch.ones(1, 1, T, dtype=mu.dtype, device=mu.device)
        mel = self.decoder(
            mu, mask, spks, cond, n_timesteps=n_timesteps, streaming=streaming, left_chunks=left_chunks
        )
        return mel[:, :, n_prompt:].float()


@dataclass
class EulerSteps:
    """The solver's constants for one stream's two CFG rows: per Euler step its time [2], time
    embedding [2, D] and step size, the guidance rate, and the precision the estimator computes
    in (None: its weights'; float16/bfloat16: under autocast, the Euler state staying float32)."""

    t_ins: list[Tensor]
    t_embs: list[Tensor]
    dts: list[Tensor]
    rate: float
    compute_dtype: torch.dtype | None = None

    @classmethod
    def of(
        cls, flow: CausalMaskedDiffWithXvec, n_timesteps: int, compute_dtype: torch.dtype | None = None
    ) -> EulerSteps:
        device = flow.input_embedding.weight.device
        if compute_dtype == torch.float32:
            compute_dtype = None
        key = (n_timesteps, compute_dtype, device)
        with _EULER_LOCK:  # once per flow: a stream's first chunk need not compute and copy them
            known = _EULER_STEPS.setdefault(flow, {})
            if key not in known:
                known[key] = cls._make(flow, n_timesteps, compute_dtype, device)
            return known[key]

    @classmethod
    def _make(
        cls, flow: CausalMaskedDiffWithXvec, n_timesteps: int, compute_dtype: torch.dtype | None, device
    ) -> EulerSteps:
        estimator = flow.decoder.estimator
        schedule = euler_schedule(n_timesteps)
        with torch.no_grad():
            t_ins = [t.to(device).expand(2) for t, _ in schedule]
            t_embs = [estimator.time_embedding(t) for t in t_ins]
        settle(device)
        return cls(t_ins, t_embs, [dt for _, dt in schedule], flow.decoder.inference_cfg_rate, compute_dtype)


# every flow's solver constants (read-only, shared by its streams), dropped with the flow
_EULER_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_EULER_LOCK = threading.Lock()


def euler_solve(
    estimator: CausalConditionalDecoder,
    solver: EulerSteps,
    x: Tensor,
    mu_in: Tensor,
    cond_in: Tensor,
    spks_in: Tensor,
    cache_of: Callable[[int], CacheGroup | SlotBatch],
) -> Tensor:
    """The Euler steps of one advance of B streams: ``x`` [B, 80, F] from the noise to the mel,
    each step one estimator call over the streams' CFG rows (``mu_in``, ``cond_in`` [2B, 80, F],
    ``spks_in`` [2B, 80]) against ``cache_of(step)``."""
    batch = x.shape[0]
    half = solver.compute_dtype
    # one autocast region for all steps: leaving one drops its cast weights, which each step
    # would then cast again (the Euler update is not an autocast op: it stays float32)
    with torch.autocast(x.device.type, dtype=half or torch.float32, enabled=half is not None):
        for k, dt in enumerate(solver.dts):
            t_in, t_emb = solver.t_ins[k], solver.t_embs[k]
            if batch > 1:
                t_in, t_emb = t_in.repeat(batch), t_emb.repeat(batch, 1)
            out = estimator.forward_chunk(
                x.repeat_interleave(2, dim=0), mu_in, t_in, spks_in, cond_in, cache_of(k), t_emb=t_emb
            )
            out = out.float().unflatten(0, (batch, 2))
            x = x + dt * ((1.0 + solver.rate) * out[:, 0] - solver.rate * out[:, 1])
    return x


class FlowStream:
    """One request's incremental token -> mel stream with constant cost per chunk.

    Equals the official streaming loop's mel (`inference(prefix, streaming=True, finalize=False)`
    per chunk, keeping the new frames) to float round-off, and for the end `finish()` equals
    `inference(all, streaming=True, finalize=True)`'s tail: chunk-causal to the end, unlike the
    official final call, which re-runs everything with full attention (see the report/tests for the
    measured difference). Every state lives on this object, nothing on the module; `close()` frees it.
    One caller at a time (the module itself may be shared by many streams in many threads).

    `left_chunks` bounds encoder and estimator attention to that many chunks (25 tokens / 50
    frames) before the current one: memory and per-chunk cost then stop growing, and the output
    equals `inference(..., left_chunks=left_chunks)` (like the official `num_decoding_left_chunks`),
    no longer the default unbounded model. `compute_dtype` (torch.float16 / torch.bfloat16) runs
    the estimator under autocast, the Euler state staying float32. `kv_dtype=torch.float16` halves the estimator cache (the
    bulk of the memory) at a small, measured accuracy cost; the default keeps float32 (exact).

    The prompt's complete chunks are computed at construction (`precompute_prompt=True`), or taken
    from `prompts` when another stream of the voice computed them; with `"lazy"` a missing prompt
    state is computed by the first emit's chunks instead (one per advance, so that a batching
    caller interleaves them with other streams' chunks) and kept in `prompts` when they are done.
    """

    def __init__(
        self,
        flow: CausalMaskedDiffWithXvec,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        left_chunks: int | None = None,
        n_timesteps: int | None = None,
        precompute_prompt: bool | str = True,
        kv_dtype: torch.dtype | None = None,
        prompts: PromptStates | None = None,
        slots: EstimatorSlots | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        cfg = flow.cfg
        if prompt_token.dim() != 2 or prompt_token.shape[0] != 1:
            raise ValueError("prompt_token must be [1, P]")
        if prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != cfg.output_size:
            raise ValueError(f"prompt_feat must be [1, F, {cfg.output_size}]")
        if prompt_feat.shape[1] != cfg.token_mel_ratio * prompt_token.shape[1]:
            raise ValueError(
                f"prompt_feat has {prompt_feat.shape[1]} frames; expected "
                f"{cfg.token_mel_ratio} per prompt token ({cfg.token_mel_ratio * prompt_token.shape[1]})"
            )
        if cfg.encoder.static_chunk_size * cfg.token_mel_ratio != cfg.estimator.static_chunk_size:
            raise ValueError(
                "encoder and estimator chunks must cover the same frames for chunk-causal streaming"
            )
        self.flow = flow
        self.cfg = cfg
        self.estimator = flow.decoder.estimator
        self.n_timesteps = cfg.n_timesteps if n_timesteps is None else n_timesteps
        self.left_chunks = left_chunks
        self.prompt_token = prompt_token
        self._prompt_ids = prompt_token.reshape(-1).cpu()  # the encoder's tokens are put together on the host
        weight = flow.input_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.prompt_feat = to_device(prompt_feat.transpose(1, 2).to(self.dtype), self.device)  # [1, 80, F]
        self.generated: list[Tensor] = []  # pushed token tensors [n]
        self._n_generated = 0
        self.emitted = 0  # generated tokens whose mel has been returned
        self.done_tokens = 0  # tokens (prompt + generated) already through the encoder
        self.closed = False
        self.finished = False
        with torch.no_grad():
            spks = flow.speaker(to_device(embedding.to(self.dtype), self.device))
            self.spks_in = torch.cat([spks, torch.zeros_like(spks)])  # CFG rows
            self.solver = EulerSteps.of(flow, self.n_timesteps, compute_dtype)
        self.enc_cache = flow.encoder.new_cache(left_chunks)
        # the estimator's state: a cache per Euler step of its own, or a slot of ``slots``
        self.slots, self.slot, self.est_frames = slots, None, 0
        if slots is None:
            self.est_caches = [EstimatorCache(left_chunks, kv_dtype) for _ in range(self.n_timesteps)]
        else:
            if (
                slots.left_chunks != left_chunks
                or len(slots.keys) != self.n_timesteps
                or kv_dtype is not None
            ):
                raise ValueError("estimator slots are for another window, number of steps or key dtype")
            self.est_caches = []
            self.slot = slots.acquire()
            if self.slot is None:
                raise RuntimeError(f"every one of the {slots.slots} estimator slots is taken")
        self._keep_prompt: tuple[PromptStates, bytes, int] | None = None  # (cache, key, at tokens)
        if precompute_prompt:
            key = None if prompts is None else prompts.key(self, embedding, kv_dtype)
            state = None if key is None else prompts.get(key)
            if state is not None:
                state.restore(self)
            elif precompute_prompt == "lazy":  # the first emit's chunks compute it
                if key is not None:
                    self._keep_prompt = (prompts, key, self._prompt_chunks())
            else:
                self._precompute_prompt()
                if key is not None:
                    prompts.put(key, _PromptState.of(self))

    # --- token bookkeeping -------------------------------------------------------------------
    @property
    def n_prompt(self) -> int:
        return self.prompt_token.shape[1]

    def push(self, tokens: Tensor | list[int]) -> None:
        """Append generated speech tokens ([n], [1, n] tensor or list of ids)."""
        self._check_open()
        t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if t.numel():
            self.generated.append(t)
            self._n_generated += t.numel()

    def _all_tokens(self) -> Tensor:  # [1, P + n]
        if len(self.generated) > 1:
            self.generated = [torch.cat(self.generated)]
        gen = self.generated[0] if self.generated else torch.zeros(0, dtype=torch.long)
        return torch.cat([self._prompt_ids, gen]).unsqueeze(0)

    def ready(self, hop: int) -> bool:
        """Enough tokens for `hop` more plus the lookahead."""
        return self._n_generated - self.emitted >= hop + self.cfg.pre_lookahead_len

    # --- incremental work -------------------------------------------------------------------
    def _prompt_chunks(self) -> int:
        """Tokens of the prompt's complete chunks: those whose lookahead is still inside it."""
        chunk, la = self.cfg.chunk_tokens, self.cfg.pre_lookahead_len
        return (self.n_prompt - la) // chunk * chunk if self.n_prompt >= la else 0

    def _precompute_prompt(self) -> None:
        """Run the prompt's complete chunks now, before any token is generated, so the first emit
        only pays for the rest."""
        q = self._prompt_chunks()
        # one chunk at a time (equal to one advance over all of them): under a window only the
        # window's keys are ever held, however long the prompt
        for context_end, n in self._pieces(q, q + self.cfg.pre_lookahead_len):
            self._advance(context_end, n)

    def _advanced(self) -> None:
        """After an advance: with ``precompute_prompt="lazy"``, keep the state right after the
        prompt's chunks for the voice's next streams, as a precompute would have."""
        if self._keep_prompt is not None and self.done_tokens >= self._keep_prompt[2]:
            prompts, key, at = self._keep_prompt
            self._keep_prompt = None
            if self.done_tokens == at:
                prompts.put(key, _PromptState.of(self))

    def _tokens(self, context_end: int | None, n_tokens: int) -> tuple[Tensor, Tensor | None]:
        """Tokens [done_tokens, done_tokens + n_tokens) (prompt + generated numbering) [1, n] and
        their context, the tokens up to `context_end` (None: end of utterance, zero lookahead)."""
        a, b = self.done_tokens, self.done_tokens + n_tokens
        if self.cfg.token_mel_ratio * b > NOISE_FRAMES:
            raise ValueError(f"utterance exceeds {NOISE_FRAMES} mel frames (300 s)")
        tokens = self._all_tokens()
        return tokens[:, a:b], None if context_end is None else tokens[:, b:context_end]

    def _solver_inputs(self, mu: Tensor) -> tuple[Tensor, Tensor]:
        """The solver's start x and cond [1, 80, F] for the frames of ``mu`` [1, 80, F], which
        start at this stream's next frame."""
        f0 = self.cfg.token_mel_ratio * self.done_tokens
        f1 = f0 + mu.shape[2]
        cond = torch.zeros_like(mu)
        n_pf = self.prompt_feat.shape[2]
        if f0 < n_pf:
            cond[:, :, : min(f1, n_pf) - f0] = self.prompt_feat[:, :, f0 : min(f1, n_pf)]
        x = cfm_noise_on(mu.device)[:, :, f0:f1].to(dtype=mu.dtype)
        return x, cond

    def _advance(self, context_end: int | None, n_tokens: int) -> Tensor:
        return advance_together([(self, context_end, n_tokens)])[0]

    def plan_emit(self, hop: int) -> list[tuple[int | None, int]]:
        """The advances (context end, tokens) :meth:`emit` makes for this hop, one flow chunk
        each (checks it may run).  One chunk at a time computes exactly what one advance over all
        of them computes (the model is chunk-causal), and every stream's advances are then alike,
        so that the token2wav stage batches any streams together whatever their hops."""
        self._check_open()
        if hop <= 0:
            raise ValueError("hop must be positive")
        if not self.ready(hop):
            raise RuntimeError(
                f"not ready: {self._n_generated - self.emitted} tokens pending, need {hop} + lookahead"
            )
        end = self.n_prompt + self.emitted + hop
        if end % self.cfg.chunk_tokens:
            raise ValueError(f"prompt + emitted tokens ({end}) must be a multiple of {self.cfg.chunk_tokens}")
        return self._pieces(end, end + self.cfg.pre_lookahead_len)

    def plan_finish(self) -> list[tuple[int | None, int]]:
        """The advances :meth:`finish` makes: every token not yet through the flow, the last
        chunk without lookahead (none, when nothing is left)."""
        self._check_open()
        return self._pieces(self.n_prompt + self._n_generated, None)

    def _pieces(self, end: int, context_end: int | None) -> list[tuple[int | None, int]]:
        chunk, la = self.cfg.chunk_tokens, self.cfg.pre_lookahead_len
        total = self.n_prompt + self._n_generated
        pieces, at = [], self.done_tokens
        while at < end:
            n = min(chunk, end - at)
            last = at + n == end
            pieces.append((context_end if last else min(at + n + la, total), n))
            at += n
        return pieces

    def complete_emit(self, hop: int, mels: list[Tensor]) -> Tensor:
        """The mel [1, 80, 2*hop] of an emit whose advances gave ``mels``."""
        mel = torch.cat(mels, dim=2)
        self.emitted += hop
        return mel[:, :, mel.shape[2] - self.cfg.token_mel_ratio * hop :]

    def complete_finish(self, mels: list[Tensor]) -> Tensor:
        """The mel of every remaining token; closes the stream's work (caches are freed)."""
        remaining = self._n_generated - self.emitted
        if mels:
            mel = torch.cat(mels, dim=2)
            mel = mel[:, :, mel.shape[2] - self.cfg.token_mel_ratio * remaining :]
        else:
            mel = torch.zeros(1, self.cfg.output_size, 0, device=self.device)
        self.emitted = self._n_generated
        self.finished = True
        self.close()
        return mel

    def emit(self, hop: int) -> Tensor:
        """Mel [1, 80, 2*hop] of the next `hop` generated tokens (needs `ready(hop)`). Prompt plus
        emitted tokens must stay a multiple of the 25-token chunk, as the official schedule keeps
        it (first hop 25 + prompt_token_pad, then 50, 100, ...)."""
        return self.complete_emit(hop, [self._advance(c, n) for c, n in self.plan_emit(hop)])

    def finish(self) -> Tensor:
        """Mel of every remaining token (streaming-causal, zero lookahead at the end); closes the
        stream's work (caches are freed)."""
        return self.complete_finish([self._advance(c, n) for c, n in self.plan_finish()])

    @staticmethod
    def max_nbytes(
        flow: CausalMaskedDiffWithXvec,
        left_chunks: int | None = None,
        n_timesteps: int | None = None,
        kv_dtype: torch.dtype | None = None,
        slots: bool = False,
    ) -> int:
        """An upper bound of :meth:`nbytes` over the whole life of any stream of ``flow``: what
        admission reserves per stream (``slots``: a stream in :class:`EstimatorSlots`, whose
        estimator state is exactly a slot).  The keys of every attention layer of every Euler step
        (two CFG rows each) and of the encoder grow with the frames they attend to: the window's
        ``left_chunks + 1`` chunks, or without one the longest utterance (300 s, prompt
        included).  At REAL size that is about 3.8 MiB per mel frame, 190 MiB per second of
        audio, so an unbounded stream can reach tens of GiB.  Counts the buffers' growth slack
        (``KVBuffer`` and the encoder's buffer) as they allocate it."""
        cfg = flow.cfg
        steps = cfg.n_timesteps if n_timesteps is None else n_timesteps
        ratio, chunk = cfg.token_mel_ratio, cfg.estimator.static_chunk_size
        frames = NOISE_FRAMES if left_chunks is None else min((left_chunks + 1) * chunk, NOISE_FRAMES)
        weight = flow.input_embedding.weight
        elem = weight.element_size()
        kv_elem = elem if kv_dtype is None else torch.empty((), dtype=kv_dtype).element_size()
        rows = 2  # the CFG rows of one stream
        estimator, encoder = flow.decoder.estimator, flow.encoder
        key_width, conv = state_widths(estimator)
        kv_frames = frames + max(frames // 4, 100)  # KVBuffer's capacity at most
        per_step = 2 * rows * key_width * kv_elem * kv_frames + rows * conv * elem
        d = encoder.cfg.output_size
        enc_rows = (  # the encoder's buffers double as they grow
            len(encoder.encoders) * max(2 * -(-frames // ratio), 64)  # token blocks
            + len(encoder.up_encoders) * max(2 * frames, 64)  # frame blocks
            + 1
            + encoder.cfg.up_stride  # pre-lookahead and upsampling tails
        )
        enc = 2 * d * elem * enc_rows
        if slots:
            if left_chunks is None:
                raise ValueError("estimator slots need a flow window")
            return EstimatorSlots.slot_nbytes(estimator, steps, left_chunks, kv_elem) + enc
        return steps * per_step + enc

    def _slot_nbytes(self) -> int:
        return 0 if self.slot is None else self.slots.slot_bytes

    def nbytes(self) -> int:
        """Allocated bytes of cached state (encoder + every Euler step's estimator cache, or
        the estimator slot this stream holds)."""
        enc = self.enc_cache.nbytes() if self.enc_cache is not None else 0
        return enc + sum(c.nbytes() for c in self.est_caches) + self._slot_nbytes()

    def live_nbytes(self) -> int:
        """Bytes of cached state in use (allocations grow ahead of it by up to ~25 %)."""
        enc = self.enc_cache.live_nbytes() if self.enc_cache is not None else 0
        return enc + sum(c.live_nbytes() for c in self.est_caches) + self._slot_nbytes()

    def close(self) -> None:
        """Drop every cache and give the slot back (idempotent); the stream can no longer be used."""
        for c in self.est_caches:
            c.clear()
        self.est_caches = []
        if self.slot is not None:
            self.slots.release(self.slot)
            self.slot = None
        self.enc_cache = None
        self.generated = []
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("FlowStream is closed")


@dataclass
class _PromptState:
    """A stream's caches right after its prompt: the same for every stream of one voice."""

    done_tokens: int
    enc_cache: EncoderCache
    est_caches: list[EstimatorCache]  # a stream with caches of its own
    slot_state: list[list[Tensor]] | None = None  # a stream in estimator slots (EstimatorSlots.snapshot)
    est_frames: int = 0

    @classmethod
    def of(cls, stream: FlowStream) -> _PromptState:
        if stream.slot is not None:
            snapshot = stream.slots.snapshot(stream.slot, stream.est_frames)
            return cls(stream.done_tokens, stream.enc_cache.clone(), [], snapshot, stream.est_frames)
        return cls(stream.done_tokens, stream.enc_cache.clone(), [c.clone() for c in stream.est_caches])

    def restore(self, stream: FlowStream) -> None:
        if (self.slot_state is None) != (stream.slot is None):
            raise ValueError(
                "a prompt state kept in estimator slots restores only into a slot, and the reverse"
            )
        stream.done_tokens = self.done_tokens
        stream.enc_cache = self.enc_cache.clone()
        if stream.slot is not None:
            stream.slots.load(stream.slot, self.slot_state)
            stream.est_frames = self.est_frames
        else:
            stream.est_caches = [c.clone() for c in self.est_caches]

    def nbytes(self) -> int:
        slot = sum(t.numel() * t.element_size() for step in self.slot_state or [] for t in step)
        return self.enc_cache.nbytes() + sum(c.nbytes() for c in self.est_caches) + slot


class PromptStates:
    """The flow's state after each voice's prompt, kept so that a voice's prompt is encoded and
    run through the 10 Euler steps once, not again for every stream that speaks with it.

    A registered zero-shot voice has a prompt of a few seconds: two or more 25-token chunks of flow
    work per stream before its first chunk can start, done one stream at a time.  Sixteen sessions
    that open together with one voice would otherwise wait for sixteen copies of that work.  The
    state is a pure function of the prompt (the solver's noise is fixed per frame), so a copy gives
    exactly what a fresh computation gives.  Entries are keyed by the prompt's content and the
    stream's settings, least recently used first out beyond ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._states: OrderedDict[bytes, _PromptState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(stream: FlowStream, embedding: Tensor, kv_dtype: torch.dtype | None) -> bytes | None:
        """None for a stream with no complete prompt chunk (nothing to keep)."""
        if stream.n_prompt < stream.cfg.chunk_tokens + stream.cfg.pre_lookahead_len:
            return None
        h = hashlib.blake2b(digest_size=20)
        for t in (stream.prompt_token, stream.prompt_feat, embedding):
            t = t.detach().contiguous().cpu()
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr((stream.left_chunks, stream.n_timesteps, kv_dtype, stream.device)).encode())
        return h.digest()

    def get(self, key: bytes) -> _PromptState | None:
        with self._lock:
            state = self._states.get(key)
            if state is None:
                self.misses += 1
                return None
            self._states.move_to_end(key)
            self.hits += 1
            return state

    def put(self, key: bytes, state: _PromptState) -> None:
        size = state.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._states.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._states[key] = state
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._states.popitem(last=False)
                self._bytes -= evicted.nbytes()

    def __len__(self) -> int:
        return len(self._states)

    def nbytes(self) -> int:
        return self._bytes


def encode_together(items: list[tuple[FlowStream, int | None, int]]) -> Tensor:
    """The encoder's ``mu`` [B, 80, 2 n] of each stream's next n tokens (items as
    :func:`advance_together`'s): one encoder call for the streams of one flow window (each
    attending to its own keys), one per window otherwise."""
    first = items[0][0]
    flow, device = first.flow, first.device
    pieces = [stream._tokens(context_end, count) for stream, context_end, count in items]
    mus: list[Tensor | None] = [None] * len(items)
    windows: dict[int | None, list[int]] = {}
    for i, (stream, _, _) in enumerate(items):
        windows.setdefault(stream.enc_cache.left_chunks, []).append(i)
    for rows in windows.values():
        xs = flow.embed_tokens(to_device(torch.cat([pieces[i][0] for i in rows]), device))
        ctxs = [
            None if pieces[i][1] is None else flow.embed_tokens(to_device(pieces[i][1], device)) for i in rows
        ]
        h = flow.encoder.forward_chunks(xs, ctxs, [items[i][0].enc_cache for i in rows])  # [b, 2n, C]
        mu = flow.encoder_proj(h).transpose(1, 2)
        for k, i in enumerate(rows):
            mus[i] = mu[k : k + 1]
    return torch.cat(mus)


def advance_together(items: list[tuple[FlowStream, int | None, int]]) -> list[Tensor]:
    """Advance several streams of one flow by the same number of tokens in one go: each stream's
    encoder runs on its own, then every Euler step is one estimator call over all streams' rows
    (each attending to its own caches).  Items are (stream, context end, tokens); returns each
    stream's mel [1, 80, 2 n] of those tokens."""
    first = items[0][0]
    n = items[0][2]
    if any(it[2] != n for it in items) or any(it[0].flow is not first.flow for it in items):
        raise ValueError("streams advanced together must share the flow and advance by as many tokens")
    streams = [it[0] for it in items]
    batch = len(streams)
    with torch.no_grad():
        mus = encode_together(items)  # [B, 80, F]
        inputs = [stream._solver_inputs(mus[i : i + 1]) for i, stream in enumerate(streams)]
        zeros = torch.zeros_like(mus[:1])
        x = torch.cat([x0 for x0, _ in inputs])  # [B, 80, F]
        mu_in = torch.cat([t for i in range(batch) for t in (mus[i : i + 1], zeros)])  # CFG rows in turn
        cond_in = torch.cat([t for _, cond in inputs for t in (cond, zeros)])
        spks_in = torch.cat([s.spks_in for s in streams])
        slotted = [s.slot is not None for s in streams]
        if any(slotted) and (not all(slotted) or any(s.slots is not first.slots for s in streams)):
            raise ValueError(
                "streams advanced together keep their estimator state in the same slots or all apart"
            )
        frames = x.shape[2]
        graphs = first.slots.graphs if all(slotted) else None
        if graphs is not None and graphs.takes(batch, frames):  # fixed shapes (a CUDA graph on a GPU)
            x = graphs(x, mu_in, cond_in, spks_in, [s.slot for s in streams], [s.est_frames for s in streams])
        elif all(slotted):
            slots = first.slots.batch([s.slot for s in streams], [s.est_frames for s in streams], frames)
            x = euler_solve(first.estimator, first.solver, x, mu_in, cond_in, spks_in, slots.at_step)
        else:
            caches = lambda k: CacheGroup([s.est_caches[k] for s in streams])  # noqa: E731
            x = euler_solve(first.estimator, first.solver, x, mu_in, cond_in, spks_in, caches)
    for stream, _, count in items:
        stream.done_tokens += count
        stream.est_frames += frames
        stream._advanced()
    return [x[i : i + 1].float() for i in range(batch)]
