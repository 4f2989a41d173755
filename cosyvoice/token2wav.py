"""Speech tokens -> 24 kHz audio, streamed per request (CosyVoice2Model.tts/token2wav, FACTS 7).

One `Token2Wav` serves many requests: the flow and HiFT modules are shared and only read; every
mutable thing of a request (its tokens, hop schedule, flow caches, vocoder mel/source/speech caches,
random generator) lives in a per-UUID `_Stream` and is freed by the final `pull` or by `close`.
The official code keeps the hop length on the model object and doubles it per chunk without ever
resetting it, so its second request starts at hop 100; here the schedule belongs to the request.

Modes:
- "exact": the official chunk loop bit for bit: every chunk re-runs the flow on the whole token
  prefix (streaming=True, finalize=False) and the end re-runs everything with full attention
  (streaming=False, finalize=True). Cost per chunk grows with the utterance.
- "cached" (default): `FlowStream`, which evaluates each frame once; constant cost per chunk,
  chunk-causal to the end (its last chunk differs from the official full-attention final pass).
- "recompute": the chunk-causal result by whole-prefix recompute, including the end
  (streaming=True, finalize=True): the reference that "cached" must equal.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cosyvoice.config import resolve_dtype, to_device
from cosyvoice.flow import NOISE_FRAMES, CausalMaskedDiffWithXvec, FlowStream, PromptStates, advance_together
from cosyvoice.flow_estimator import EstimatorSlots
from cosyvoice.flow_graphs import FlowGraphs
from cosyvoice.hift import HiFTGenerator

MODES = ("cached", "exact", "recompute")
MEL_CACHE_LEN = 8  # mel frames of overlap handed to the vocoder from the previous chunk
SOURCE_CACHE_LEN = 8 * 480  # 3840 samples: source continuation and cross-fade length


@dataclass(frozen=True)
class HopSchedule:
    """Tokens per chunk: `first` (+ the prompt pad) for chunk 0, then ×`growth` per chunk up to `max`.

    Small first hops give early audio; larger later hops amortise the per-chunk overhead.
    """

    first: int = 25
    growth: int = 2
    max: int = 100

    def __post_init__(self):
        if self.first < 1 or self.growth < 1 or self.max < self.first:
            raise ValueError(f"invalid hop schedule {self}")

    def prompt_pad(self, n_prompt: int) -> int:
        """Extra tokens on the first hop so that prompt + first hop is a multiple of `first`."""
        return math.ceil(n_prompt / self.first) * self.first - n_prompt

    def next(self, hop: int) -> int:
        return min(self.max, hop * self.growth)


@dataclass(frozen=True, eq=False)
class Job:
    """One chunk of work of one stream: the next hop, or (hop None) the final flush."""

    uuid: Hashable
    stream: _Stream
    hop: int | None


@dataclass
class _Plan:
    """A job in progress: the flow advances it still needs (None: not cached, computed at once),
    and the mel of those done."""

    job: Job
    pieces: deque | None
    mels: list[Tensor] = field(default_factory=list)


class Rounds:
    """The jobs a token2wav caller is computing, advanced a round at a time.

    A round advances the flow of every job by one 25-token chunk, all of them in one batched
    estimator call per Euler step (their hops may differ: a 100-token hop is four rounds), then
    vocodes together the chunks whose flow is complete and hands them out.  Jobs join between
    rounds, so a stream that becomes ready (a first chunk above all) waits at most one round, not
    for another stream's whole hop.  Each job holds its stream's lock until it is done; a final
    flush closes its stream, and a failure closes every stream in the rounds.
    """

    def __init__(self, t2w: Token2Wav) -> None:
        self.t2w = t2w
        self.plans: list[_Plan] = []

    def __len__(self) -> int:
        return len(self.plans)

    def add(self, job: Job) -> None:
        if any(plan.job.stream is job.stream for plan in self.plans):
            raise ValueError("one job per stream at a time")
        job.stream.lock.acquire()
        try:
            pieces = None
            if job.stream.mode == "cached":
                flow = job.stream.flow_stream
                pieces = deque(flow.plan_emit(job.hop) if job.hop is not None else flow.plan_finish())
        except BaseException:
            job.stream.lock.release()
            raise
        self.plans.append(_Plan(job, pieces))

    def step(self, only: Callable[[Job], bool] | None = None) -> list[tuple[Job, np.ndarray | None]]:
        """One round of every job (or of those ``only`` selects: the others wait, unchanged);
        returns the jobs completed in it with their audio (None for a final flush with nothing
        left; cancelled jobs are dropped without audio)."""
        done = self.advance(only)
        return self.t2w.vocode(done) if done else []

    @torch.inference_mode()
    def advance(self, only: Callable[[Job], bool] | None = None) -> list[tuple[Job, Tensor]]:
        """The flow of a round: returns the jobs whose flow is complete, with their mel, to be
        handed to :meth:`Token2Wav.vocode` (here or in another thread); they leave the rounds
        still holding their stream's lock, which the vocoding releases."""
        t2w = self.t2w
        self.drop_cancelled()
        plans = [plan for plan in self.plans if only is None or only(plan.job)]
        try:
            finished = [plan for plan in plans if plan.pieces is not None and not plan.pieces]
            solo = [plan for plan in plans if plan.pieces is None]
            for plan in solo:
                job = plan.job
                plan.mels = [
                    t2w._flow_chunk(job.stream, job.hop)
                    if job.hop is not None
                    else t2w._flow_final(job.stream)
                ]
            pending = [plan for plan in plans if plan.pieces]
            groups: dict[int, list[_Plan]] = {}
            for plan in pending:  # one chunk each; a final partial chunk goes with its like
                groups.setdefault(plan.pieces[0][1], []).append(plan)
            for count, group in groups.items():
                mels = advance_together([(p.job.stream.flow_stream, p.pieces[0][0], count) for p in group])
                for plan, mel in zip(group, mels, strict=True):
                    plan.pieces.popleft()
                    plan.mels.append(mel)
            finished = solo + finished + [plan for plan in pending if not plan.pieces]
            mels = [(plan.job, self._mel(plan)) for plan in finished]
        except BaseException:
            self.abort()  # a failed stream is not resumable
            raise
        for plan in finished:
            job = plan.job
            if job.hop is not None:
                job.stream.token_offset += job.hop
                job.stream.hop = job.stream.schedule.next(job.stream.hop)
            self.plans.remove(plan)  # its lock is held until it is vocoded
        return mels

    def drop_cancelled(self) -> None:
        """Let go of the jobs of cancelled or closed streams (their locks released, not freed)."""
        for plan in [p for p in self.plans if p.job.stream.closed or p.job.stream.cancelled]:
            self._finish(plan, free=False)

    @staticmethod
    def _mel(plan: _Plan) -> Tensor:
        job = plan.job
        if plan.pieces is None:
            return plan.mels[0]
        flow = job.stream.flow_stream
        return (
            flow.complete_emit(job.hop, plan.mels) if job.hop is not None else flow.complete_finish(plan.mels)
        )

    def _finish(self, plan: _Plan, free: bool) -> None:
        self.plans.remove(plan)
        if free:  # its state first, then its place
            plan.job.stream.free()
            self.t2w._forget(plan.job.uuid, plan.job.stream)
        plan.job.stream.lock.release()

    def abort(self) -> None:
        """Close every stream in the rounds."""
        for plan in list(self.plans):
            self._finish(plan, free=True)


# the widest flow window whose streams go in estimator slots by default: a slot's ring is attended
# whole once full, which costs more than buffers of its own would for a window this wide
SLOT_WINDOW_MAX = 16


def stream_bound(flow: CausalMaskedDiffWithXvec, left_chunks: int | None, slots: bool = False) -> int:
    """An upper bound of the bytes one cached stream holds with this flow window: the flow's
    caches (see :meth:`FlowStream.max_nbytes`; ``slots``: its estimator slot), the vocoder's
    caches and the token list."""
    vocoder = 4 * (flow.cfg.output_size * MEL_CACHE_LEN + 2 * SOURCE_CACHE_LEN)
    tokens = 8 * NOISE_FRAMES // flow.cfg.token_mel_ratio
    return FlowStream.max_nbytes(flow, left_chunks, slots=slots) + vocoder + tokens


def fit_window(flow: CausalMaskedDiffWithXvec, streams: int, budget: int, least: int = 2) -> int | None:
    """The widest flow window (chunks of left context; None: unbounded, the official model) with
    which ``streams`` cached streams fit in ``budget`` bytes, but at least ``least`` chunks (a
    narrower window would cost more in quality than fewer streams cost in capacity)."""
    if streams * stream_bound(flow, None) <= budget:
        return None
    lo, hi = least, NOISE_FRAMES // flow.cfg.estimator.static_chunk_size
    if streams * stream_bound(flow, lo) > budget:
        return lo
    while lo < hi:  # the bound grows with the window
        mid = (lo + hi + 1) // 2
        if streams * stream_bound(flow, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class MemoryPlan:
    """How a model spends its token2wav memory: the flow window, the voices' prompt states and the
    streams open at once (None: no limit)."""

    left_chunks: int | None
    prompt_cache_bytes: int
    max_streams: int | None
    flow_slots: bool = False  # the streams' estimator state in EstimatorSlots


def plan_memory(
    flow: CausalMaskedDiffWithXvec,
    slots: int,
    budget: int | None,
    left_chunks: int | str | None = None,
    prompt_cache_bytes: int | None = None,
    flow_slots: bool | None = False,
) -> MemoryPlan:
    """Spend ``budget`` bytes (None: no limit) on the prompt states of the voices
    (``prompt_cache_bytes``; None: an eighth of the budget, or 256 MiB without one: at REAL size
    one voice's 4 s prompt state is about 570 MiB) and on as many streams as fit at the window's
    bound, at most ``slots`` (the LM's KV slots).  ``left_chunks="auto"``: the widest window with
    which every slot's stream fits (see :func:`fit_window`); without a budget, unbounded.
    ``flow_slots`` (None: with a budget and a window of at most ``SLOT_WINDOW_MAX`` chunks): the
    streams' estimator state in slots allocated at start, each exactly a slot (the spare
    included in the budget), so that the budget holds more streams than at the buffers' bound."""
    if not (left_chunks in (None, "auto") or (isinstance(left_chunks, int) and left_chunks >= 0)):
        raise ValueError(f"left_chunks must be None, 'auto' or >= 0, got {left_chunks!r}")
    if prompt_cache_bytes is None:
        prompt_cache_bytes = 256 << 20 if budget is None else budget // 8
    if budget is None:
        window = None if left_chunks == "auto" else left_chunks
        return MemoryPlan(window, prompt_cache_bytes, None, bool(flow_slots))
    streams_budget = budget - prompt_cache_bytes
    if left_chunks == "auto":
        left_chunks = fit_window(flow, slots, max(streams_budget, 0))
    if flow_slots is None:
        flow_slots = left_chunks is not None and left_chunks <= SLOT_WINDOW_MAX
    bound = stream_bound(flow, left_chunks, slots=flow_slots)
    if flow_slots:  # the spare slot (fixed-shape padding) is allocated too
        streams_budget -= EstimatorSlots.slot_nbytes(
            flow.decoder.estimator,
            flow.cfg.n_timesteps,
            left_chunks,
            flow.input_embedding.weight.element_size(),
        )
    if streams_budget < bound:
        window = "unbounded" if left_chunks is None else f"{left_chunks} chunks"
        raise ValueError(
            f"a token2wav budget of {budget / 2**20:.0f} MiB ({prompt_cache_bytes / 2**20:.0f} MiB of it for "
            f"voice prompts) holds no stream: one may hold {bound / 2**20:.0f} MiB with a flow window of {window}"
        )
    return MemoryPlan(left_chunks, prompt_cache_bytes, min(slots, streams_budget // bound), flow_slots)


class Token2WavFull(RuntimeError):
    """Every place for a cached stream is taken (see ``Token2Wav(max_streams=)``)."""


def hamming_window(n: int = 2 * SOURCE_CACHE_LEN) -> Tensor:
    """numpy's symmetric Hamming window (float64) stored as float32, as the fixtures record it."""
    return torch.from_numpy(np.hamming(n).astype(np.float32))


def fade_in_out(new: Tensor, old_tail: Tensor, window: Tensor) -> Tensor:
    """new[..., :n] = new·w[:n] + old_tail·w[n:], n = len(w)/2 (old_tail: the last n samples before)."""
    n = window.shape[0] // 2
    out = new.clone()
    out[..., :n] = new[..., :n] * window[:n] + old_tail[..., -n:] * window[n:]
    return out


@dataclass
class _Stream:
    prompt_token: Tensor  # [1, P] int64
    prompt_feat: Tensor  # [1, F, 80]
    embedding: Tensor  # [1, 192]
    schedule: HopSchedule
    mode: str
    generator: torch.Generator
    prompt_pad: int
    hop: int  # current base hop (before the first chunk's pad)
    tokens: list[int] = field(default_factory=list)
    token_offset: int = 0
    flow_stream: FlowStream | None = None
    mel_cache: Tensor | None = None  # [1, 80, 8]
    source_cache: Tensor | None = None  # [1, 1, 3840]
    speech_cache: Tensor | None = None  # [1, 3840]
    flow_pushed: int = 0  # tokens handed to flow_stream so far
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while computing a pull
    token_lock: threading.Lock = field(default_factory=threading.Lock)  # guards `tokens` only
    closed: bool = False
    cancelled: bool = False  # set without the lock so that a running pull stops after its chunk

    def free(self) -> None:
        with self.token_lock:
            self.closed = True
            self.tokens = []
        if self.flow_stream is not None:
            self.flow_stream.close()
        self.flow_stream = None
        self.mel_cache = self.source_cache = self.speech_cache = None

    def this_hop(self) -> int:
        return self.hop + self.prompt_pad if self.token_offset == 0 else self.hop

    def nbytes(self) -> int:
        n = 8 * len(self.tokens)
        for t in (self.mel_cache, self.source_cache, self.speech_cache):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.flow_stream is not None and not self.flow_stream.closed:
            n += self.flow_stream.nbytes()
        return n


def _as_batch(x, dims: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Adds the batch dim of 1 if missing ([P] -> [1, P], [F, 80] -> [1, F, 80])."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(dtype=dtype)
    if device is not None:
        t = to_device(t, device)  # (a tensor already there stays as it is)
    if t.dim() == dims - 1:
        t = t.unsqueeze(0)
    if t.dim() != dims or t.shape[0] != 1:
        raise ValueError(
            f"expected a tensor of {dims - 1} or {dims} dims (batch 1), got shape {tuple(t.shape)}"
        )
    return t


def _len(n: int, device: torch.device) -> Tensor:
    return torch.tensor([n], dtype=torch.int32, device=device)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class Token2Wav:
    """Shared flow + HiFT and the per-UUID stream states. Thread-safe across different UUIDs;
    calls for one UUID are serialised by that stream's lock."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithXvec,
        hift: HiFTGenerator,
        left_chunks: int | None = None,
        prompt_cache_bytes: int = 256 << 20,
        max_streams: int | None = None,
        flow_slots: bool = False,
        cuda_graphs: bool = False,
        flow_dtype: str | torch.dtype = "fp32",
    ):
        """``left_chunks``: the flow's attention window (None: unbounded, the official model);
        ``max_streams``: cached streams open at once (None: no limit), each of which may hold
        :meth:`max_stream_nbytes`; :meth:`open` refuses more with :class:`Token2WavFull`.
        ``flow_slots``: the streams' estimator state in one :class:`EstimatorSlots` of
        ``max_streams`` slots, allocated now (needs a window and ``max_streams``): a round's
        state moves in one operation per layer, not per stream.  ``cuda_graphs`` (with
        ``flow_slots``, the flow on CUDA): rounds of whole chunks replay a CUDA graph of the Euler
        steps per batch size (:class:`~cosyvoice.flow_graphs.FlowGraphs`, recorded by
        :meth:`capture_graphs`).  ``flow_dtype``: the precision of the flow's estimator (fp16 /
        bf16: under autocast, the Euler state, the encoder and the vocoder staying float32)."""
        self.flow_dtype = resolve_dtype(flow_dtype)
        if cuda_graphs and not flow_slots:
            raise ValueError("the flow's CUDA graphs need estimator slots")
        if flow_slots and (left_chunks is None or max_streams is None):
            raise ValueError("estimator slots need a flow window and a number of streams")
        self.flow = flow
        self.hift = hift
        self.left_chunks = left_chunks
        self.max_streams = max_streams
        self.lookahead = flow.cfg.pre_lookahead_len
        self.token_mel_ratio = flow.cfg.token_mel_ratio
        self.flow_device = _device(flow)
        self.hift_device = _device(hift)
        self.window = hamming_window().to(self.hift_device)
        # each voice's flow prompt state, computed once (0 bytes: every stream computes its own)
        self.prompts = PromptStates(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.slots = (
            EstimatorSlots(flow.decoder.estimator, flow.cfg.n_timesteps, max_streams, left_chunks)
            if flow_slots
            else None
        )
        if cuda_graphs:
            self.slots.graphs = FlowGraphs(flow, self.slots, capture=True, compute_dtype=self.flow_dtype)
        self._streams: dict[Hashable, _Stream] = {}
        self._lock = threading.Lock()

    @property
    def graphs(self) -> FlowGraphs | None:
        """The flow's fixed-shape rounds (see ``cuda_graphs``), if any."""
        return None if self.slots is None else self.slots.graphs

    def graph_rounds(self) -> int:
        """Flow rounds replayed as CUDA graphs so far."""
        return 0 if self.graphs is None else self.graphs.replays

    def capture_graphs(self) -> int:
        """Record the flow's CUDA graphs now (see ``cuda_graphs``); how many there are."""
        return 0 if self.graphs is None else self.graphs.capture_all()

    # --- per-request lifecycle -----------------------------------------------------------------
    def open(
        self,
        uuid: Hashable,
        prompt_token,
        prompt_feat,
        embedding,
        schedule: HopSchedule | None = None,
        mode: str = "cached",
        seed: int | None = None,
    ) -> None:
        """Starts a stream. prompt_token [P] or [1, P]; prompt_feat [F, 80] or [1, F, 80];
        embedding [192] or [1, 192]. `seed` fixes the vocoder's noise (random if None)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        schedule = schedule or HopSchedule()
        # the flow stream takes them from the host (its encoder's input and its prompt's key are
        # made there, and the copies it makes do not wait for the device's queued rounds)
        on_host = self._prompt(prompt_token, prompt_feat, embedding, None)
        prompt_token, prompt_feat, embedding = (to_device(t, self.flow_device) for t in on_host)
        pad = schedule.prompt_pad(prompt_token.shape[1])
        if mode == "cached":
            chunk = self.flow.cfg.chunk_tokens
            if schedule.first % chunk or schedule.max % chunk:
                raise ValueError(
                    f"cached mode needs hops that are multiples of the {chunk}-token chunk: {schedule}"
                )
        generator = self._generator(seed)
        limited = self.max_streams is not None and mode == "cached"
        stream = _Stream(prompt_token, prompt_feat, embedding, schedule, mode, generator, pad, schedule.first)
        with self._lock:
            if uuid in self._streams:
                raise ValueError(f"stream {uuid!r} is already open")
            if limited and self.cached_streams() >= self.max_streams:
                raise self.full()
            self._streams[uuid] = stream
        if mode == "cached":
            try:
                stream.flow_stream = FlowStream(
                    self.flow,
                    *on_host,
                    left_chunks=self.left_chunks,
                    prompts=self.prompts,
                    slots=self.slots,
                    compute_dtype=self.flow_dtype,
                    # a new voice's prompt chunks go through the rounds with everyone's chunks,
                    # instead of holding the caller (the token2wav stage: every stream) meanwhile
                    precompute_prompt="lazy",
                )
            except BaseException:
                self.close(uuid)
                raise

    def push(self, uuid: Hashable, tokens: Sequence[int] | Tensor | np.ndarray) -> None:
        """Appends generated speech tokens (cheap, no model work; safe while another thread pulls)."""
        stream = self._get(uuid)
        ids = [
            int(t)
            for t in torch.as_tensor(
                np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens
            ).reshape(-1)
        ]
        with stream.token_lock:  # never waits for a chunk being computed
            if stream.closed:
                raise KeyError(f"stream {uuid!r} was closed")
            stream.tokens.extend(ids)

    @torch.inference_mode()
    def pull(self, uuid: Hashable, finished: bool = False) -> list[np.ndarray]:
        """Audio chunks (1-D float32, 24 kHz) that are ready: one per hop while
        tokens − offset ≥ hop + lookahead; with `finished`, also the final flush, after which the
        stream is closed and its state freed."""
        out: list[np.ndarray] = []
        stream = self._get(uuid)  # held: a close from another thread only stops the loop
        while (job := self._next_job(uuid, stream, finished)) is not None:
            chunk = self.run([job])[0]
            if chunk is not None:
                out.append(chunk)
            if job.hop is None:
                break
        return out

    def next_job(self, uuid: Hashable, finished: bool = False) -> Job | None:
        """The stream's next chunk of work if it can run now: a hop once enough tokens are in, or,
        with `finished`, the final flush; None when neither (or the stream was cancelled)."""
        return self._next_job(uuid, self._get(uuid), finished)

    def _next_job(self, uuid: Hashable, stream: _Stream, finished: bool) -> Job | None:
        with stream.lock:
            if stream.cancelled:
                return None
            if stream.closed:
                raise KeyError(f"stream {uuid!r} was closed")
            hop = stream.this_hop()
            if self._sync_tokens(stream) - stream.token_offset >= hop + self.lookahead:
                return Job(uuid, stream, hop)
            return Job(uuid, stream, None) if finished else None

    @torch.inference_mode()
    def run(
        self,
        jobs: Sequence[Job],
        on_chunk: Callable[[Job, np.ndarray | None], None] | None = None,
    ) -> list[np.ndarray | None]:
        """Compute the jobs of different streams together (:class:`Rounds` until all are done):
        each is handed to ``on_chunk`` as soon as it is vocoded (its audio, or None for a final
        flush with nothing left).  Returns each job's audio."""
        rounds = Rounds(self)
        results: dict[int, np.ndarray | None] = {}
        try:
            for job in jobs:
                rounds.add(job)
        except BaseException:
            rounds.abort()
            raise
        while rounds:
            for job, chunk in rounds.step():
                results[id(job)] = chunk
                if on_chunk is not None:
                    on_chunk(job, chunk)
        return [results.get(id(job)) for job in jobs]

    @torch.inference_mode()
    def vocode(
        self,
        done: list[tuple[Job, Tensor]],
        on_group: Callable[[list[tuple[Job, np.ndarray]]], None] | None = None,
    ) -> list[tuple[Job, np.ndarray | None]]:
        """The audio of jobs whose flow is complete (from :meth:`Rounds.advance`, with their
        stream's lock held): chunks of as many frames in one vocoder call, the calls in the order
        of the jobs' first appearance in ``done``, each call's audio handed to ``on_group`` as soon
        as it is made (so that the most urgent chunks need not wait for the others).  Releases the
        locks; a final flush closes its stream, a failure closes them all."""
        jobs = [job for job, _ in done]
        failed = True
        try:
            chunks = self._vocode_jobs(jobs, {id(job): mel for job, mel in done}, on_group)
            failed = False
        finally:
            for job in jobs:
                if failed or job.hop is None:  # its state first, then its place
                    job.stream.free()
                    self._forget(job.uuid, job.stream)
                job.stream.lock.release()
        return [(job, chunks.get(id(job))) for job in jobs]

    def _vocode_jobs(
        self,
        jobs: list[Job],
        mels: dict[int, Tensor],
        on_group: Callable[[list[tuple[Job, np.ndarray]]], None] | None = None,
    ) -> dict[int, np.ndarray]:
        """Official overlap rule, per stream: prepend the previous 8 mel frames, continue the previous
        source, cross-fade the first 3840 samples with the previous chunk's held-back tail; a
        non-final chunk holds back its own last 3840 samples.  Chunks of as many frames (and alike
        in having a previous chunk or not) are vocoded in one call."""
        dtype = next(self.hift.parameters()).dtype
        groups: dict[tuple[int, bool], list[tuple[Job, Tensor]]] = {}
        for job in jobs:
            stream, mel = job.stream, mels[id(job)].to(device=self.hift_device, dtype=dtype)
            final = job.hop is None
            if final and mel.shape[2] == 0 and stream.mel_cache is None:
                continue  # nothing left to say
            if stream.mel_cache is not None:
                mel = torch.cat([stream.mel_cache, mel], dim=2)
            groups.setdefault((mel.shape[2], stream.source_cache is not None), []).append((job, mel))
        out: dict[int, np.ndarray] = {}
        for group in groups.values():
            results = self._vocode_group([j.stream for j, _ in group], [m for _, m in group])
            speeches = []
            for (job, mel), (speech, source) in zip(group, results, strict=True):
                stream = job.stream
                if stream.speech_cache is not None:
                    speech = fade_in_out(speech, stream.speech_cache, self.window)
                if job.hop is not None:
                    stream.mel_cache = mel[:, :, -MEL_CACHE_LEN:].clone()
                    stream.source_cache = source[:, :, -SOURCE_CACHE_LEN:].clone()
                    stream.speech_cache = speech[:, -SOURCE_CACHE_LEN:].clone()
                    speech = speech[:, :-SOURCE_CACHE_LEN]
                speeches.append(speech[0])
            # the group's audio to the host in one copy (each is a wait for the device)
            audio = torch.cat(speeches).float().cpu().numpy()
            ends = np.cumsum([len(s) for s in speeches])
            for (job, _), chunk in zip(group, np.split(audio, ends[:-1]), strict=True):
                out[id(job)] = chunk.copy()
            if on_group is not None:
                on_group([(job, out[id(job)]) for job, _ in group])
        return out

    def _vocode_group(self, streams: list[_Stream], mels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """HiFT on chunks of as many frames, each stream with its own noise and source cache."""
        if len(streams) == 1:
            return [self._vocode(streams[0], mels[0], streams[0].source_cache)]
        caches = [s.source_cache for s in streams]
        speech, source = self.hift.inference(
            torch.cat(mels),
            None if caches[0] is None else torch.cat(caches),
            generator=[s.generator for s in streams],
        )
        return [(speech[i : i + 1], source[i : i + 1]) for i in range(len(streams))]

    def cancel(self, uuid: Hashable) -> None:
        """Stop the stream's work after the chunk being computed, without waiting for it (the
        caches stay until :meth:`close`)."""
        with self._lock:
            stream = self._streams.get(uuid)
        if stream is not None:
            stream.cancelled = True

    def close(self, uuid: Hashable) -> None:
        """Frees everything of the stream (idempotent; the cancel path). A `pull` running in another
        thread stops after the chunk it is computing; this call waits for that chunk, and the
        stream keeps its place (``max_streams``, its estimator slot) until its state is freed."""
        with self._lock:
            stream = self._streams.get(uuid)
        if stream is not None:
            stream.cancelled = True
            with stream.lock:
                stream.free()
            self._forget(uuid, stream)  # its place once its state (and estimator slot) is free

    def _forget(self, uuid: Hashable, stream: _Stream) -> None:
        with self._lock:
            if self._streams.get(uuid) is stream:
                del self._streams[uuid]

    def active_streams(self) -> list[Hashable]:
        with self._lock:
            return list(self._streams)

    def cached_streams(self) -> int:
        """Open streams that hold flow caches (``mode="cached"``)."""
        return sum(1 for stream in list(self._streams.values()) if stream.mode == "cached")

    def full(self) -> Token2WavFull:
        """The error for one stream more than ``max_streams``."""
        return Token2WavFull(
            f"{self.max_streams} streams of up to {self.max_stream_nbytes() >> 20} MiB each are open"
        )

    def max_stream_nbytes(self) -> int:
        """An upper bound of :meth:`stream_nbytes` for a cached stream (see :func:`stream_bound`)."""
        return stream_bound(self.flow, self.left_chunks, slots=self.slots is not None)

    def stream_nbytes(self, uuid: Hashable) -> int:
        """Bytes held for this stream (tokens, vocoder caches, flow caches)."""
        return self._get(uuid).nbytes()

    @staticmethod
    def _sync_tokens(stream: _Stream) -> int:
        """Snapshot of the pushed tokens for this pull (handed on to the FlowStream); returns the count."""
        with stream.token_lock:
            tokens = stream.tokens[stream.flow_pushed :]
            stream.flow_pushed = len(stream.tokens)
        if stream.flow_stream is not None and tokens:
            stream.flow_stream.push(tokens)
        return stream.flow_pushed

    def _get(self, uuid: Hashable) -> _Stream:
        with self._lock:
            try:
                return self._streams[uuid]
            except KeyError:
                raise KeyError(f"no open stream {uuid!r}") from None

    # --- flow ----------------------------------------------------------------------------------
    def _flow(self, stream: _Stream, tokens: list[int], streaming: bool, finalize: bool) -> Tensor:
        dev = self.flow_device
        token = torch.tensor(tokens, dtype=torch.long, device=dev).unsqueeze(0)
        return self.flow.inference(
            token=token,
            token_len=_len(token.shape[1], dev),
            prompt_token=stream.prompt_token,
            prompt_token_len=_len(stream.prompt_token.shape[1], dev),
            prompt_feat=stream.prompt_feat,
            prompt_feat_len=_len(stream.prompt_feat.shape[1], dev),
            embedding=stream.embedding,
            streaming=streaming,
            finalize=finalize,
        )

    def _flow_chunk(self, stream: _Stream, hop: int) -> Tensor:
        """Mel [1, 80, 2·hop] of tokens [offset, offset + hop)."""
        if stream.mode == "cached":
            return stream.flow_stream.emit(hop)
        end = stream.token_offset + hop + self.lookahead
        with stream.token_lock:
            tokens = stream.tokens[:end]
        mel = self._flow(stream, tokens, streaming=True, finalize=False)
        return mel[:, :, self.token_mel_ratio * stream.token_offset :]

    def _flow_final(self, stream: _Stream) -> Tensor:
        """Mel of every token from the offset on (no lookahead left)."""
        if stream.mode == "cached":
            return stream.flow_stream.finish()
        with stream.token_lock:
            tokens = stream.tokens[: stream.flow_pushed]
        if not tokens:
            return torch.zeros(1, self.flow.cfg.output_size, 0, device=self.flow_device)
        mel = self._flow(stream, tokens, streaming=stream.mode == "recompute", finalize=True)
        return mel[:, :, self.token_mel_ratio * stream.token_offset :]

    # --- vocoder -------------------------------------------------------------------------------
    def _vocode(self, stream: _Stream, mel: Tensor, cache_source: Tensor | None) -> tuple[Tensor, Tensor]:
        """HiFT on one chunk; a seam for tests that replay recorded sources."""
        return self.hift.inference(mel, cache_source, generator=stream.generator)

    @staticmethod
    def _prompt(
        prompt_token, prompt_feat, embedding, device: torch.device | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return (
            _as_batch(prompt_token, 2, torch.long, device),
            _as_batch(prompt_feat, 3, torch.float32, device),
            _as_batch(embedding, 2, torch.float32, device),
        )

    def _generator(self, seed: int | None) -> torch.Generator:
        return torch.Generator(device=self.hift_device).manual_seed(
            secrets.randbits(63) if seed is None else seed
        )

    # --- non-streaming -------------------------------------------------------------------------
    @torch.inference_mode()
    def token2wav(
        self, tokens, prompt_token, prompt_feat, embedding, speed: float = 1.0, seed: int | None = None
    ) -> np.ndarray:
        """Whole utterance at once (official non-streaming: one full-attention flow call).
        `speed` ≠ 1 stretches the mel linearly to int(T / speed) frames before the vocoder."""
        if speed <= 0:
            raise ValueError("speed must be positive")
        tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
        stream = _Stream(
            *self._prompt(prompt_token, prompt_feat, embedding, self.flow_device),
            HopSchedule(),
            "exact",
            self._generator(seed),
            0,
            0,
        )
        if not tokens:
            return np.zeros(0, dtype=np.float32)
        mel = self._flow(stream, tokens, streaming=False, finalize=True)
        if speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        job = Job(None, stream, None)
        return self._vocode_jobs([job], {id(job): mel})[id(job)]
