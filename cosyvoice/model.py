"""One CosyVoice2 model shared by every request: LM -> token2wav, per request under its own UUID.

The official `CosyVoice2Model.tts` runs the LM in a second thread per request and polls its token
list every 0.1 s, and keeps the hop length on the model object (so a second streaming request
starts at hop 100).  Here the model owns two stage threads that serve every request at once: the
LM stage steps all requests that have rows in one batched backbone call, and the token2wav stage
advances all streams that have a chunk ready in one batched flow round and vocoder call.  A request
is a :class:`SpeechStream` (text ids in, audio chunks out, nothing blocks) that the service drives
from its event loop; the Python API reads one from the calling thread, which also pulls the text
iterator when the LM wants more.  Everything mutable (KV slot, sampler generator, hop schedule,
flow/vocoder caches) belongs to the request and is freed by the stages when it ends or is cancelled.
``lm="per-request"`` keeps the previous path (each request's LM and token2wav in its caller's
thread) for comparison.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid as uuid_lib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_state_dict, load_strict
from .config import ConfigError, ModelDir, memory_available, resolve_device
from .flow import CausalMaskedDiffWithXvec, FlowConfig
from .hift import HiFTConfig, HiFTGenerator, load_hift_state_dict
from .kv_cache import KVPool
from .llm import Qwen2LM, StopCondition, stop_fn
from .lm_graphs import DecodeGraphs
from .lm_request import LMRequest, feed_text
from .lm_stage import LMHandle, LMStage
from .sampling import Sampler
from .t2w_stage import DONE, StaticTokens, T2WStage, T2WStream, TokenSource
from .token2wav import MEL_CACHE_LEN, HopSchedule, Token2Wav, Token2WavFull, plan_memory

__all__ = [
    "CosyVoice2Model",
    "DONE",
    "SpeechStream",
    "TokenCap",
    "flow_prompt",
    "flow_config_from_yaml",
    "hift_config_from_yaml",
    "StopCondition",
]

LM_MODES = ("batched", "per-request")
SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 2 mel frames x 480 samples


# ----------------------------------------------------------------------------------------------
# yaml -> module configs


def _plain(node: Any) -> Any:
    """A yaml subtree as plain kwargs: tag markers dropped, ``omegaconf.DictConfig`` unwrapped."""
    if isinstance(node, dict):
        if str(node.get("__new__", "")).endswith("DictConfig") and isinstance(node.get("content"), dict):
            return _plain(node["content"])
        return {k: _plain(v) for k, v in node.items() if not (k.startswith("__") and k.endswith("__"))}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _entry(tree: dict[str, Any], key: str, cls_name: str) -> dict[str, Any]:
    node = tree.get(key)
    if not isinstance(node, dict):
        raise ConfigError(f"cosyvoice2.yaml: no {key!r} entry")
    built = str(node.get("__new__", "")).rsplit(".", 1)[-1]
    if built != cls_name:
        raise ConfigError(f"cosyvoice2.yaml: {key} is {node.get('__new__')!r}, expected a {cls_name}")
    return _plain(node)


def flow_config_from_yaml(tree: dict[str, Any]) -> FlowConfig:
    """The ``flow:`` entry of ``read_model_yaml`` output as a :class:`FlowConfig`."""
    try:
        return FlowConfig.from_dict(_entry(tree, "flow", "CausalMaskedDiffWithXvec"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cosyvoice2.yaml: flow: {e}") from e


def hift_config_from_yaml(tree: dict[str, Any]) -> HiFTConfig:
    try:
        return HiFTConfig.from_dict(_entry(tree, "hift", "HiFTGenerator"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cosyvoice2.yaml: hift: {e}") from e


# ----------------------------------------------------------------------------------------------
# per-request limits


@dataclass(frozen=True)
class TokenCap:
    """Most speech tokens one request may generate: ``max(floor, ratio x text tokens)``, and never
    more than ``hard``.  The official bistream end phase has no limit at all, so an LM that never
    samples eos would run forever; unistream has the same ``ratio`` (max_token_text_ratio 20)."""

    ratio: float = 20.0
    floor: int = 50
    hard: int = 6000  # 4 minutes of audio

    def limit(self, n_text: int) -> int:
        return min(self.hard, max(self.floor, int(n_text * self.ratio)))


def _rows(x: torch.Tensor | None, width: int | None = None) -> torch.Tensor:
    """Model-input tensors are [1, L] (tokens) or [1, F, 80] (mel); missing ones are empty."""
    if x is None:
        return torch.zeros((1, 0) if width is None else (1, 0, width))
    return x.detach().cpu()


# ----------------------------------------------------------------------------------------------
# the model


class CosyVoice2Model:
    """LM + flow + HiFT, shared read-only by all requests (thread-safe across requests)."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        llm: Qwen2LM,
        flow: CausalMaskedDiffWithXvec,
        hift: HiFTGenerator,
        left_chunks: int | str | None = None,
        cap: TokenCap | None = None,
        kv_budget_mb: float = 1024,
        kv_max_len: int = 2048,
        kv_max_slots: int = 32,
        lm: str = "batched",
        prompt_cache_mb: float | str = 256,
        t2w_budget_mb: float | str | None = None,
        cuda_graphs: bool | None = None,
        flow_slots: bool | None = None,
        flow_dtype: str | torch.dtype = "fp32",
        lm_overlap: bool | None = None,
    ):
        """``kv_*``: the LM stage's KV pool, ``kv_max_len`` rows (prompt, text and speech tokens)
        per request, as many slots as ``kv_budget_mb`` holds, at most ``kv_max_slots``: how many
        requests the LM stage serves at once.  ``lm="per-request"`` runs each request's LM alone
        in its caller's thread instead (the pre-batching path, kept for comparison).

        ``t2w_budget_mb``: memory for token2wav state (None: no limit; "auto": half of what the
        flow device has free once the weights and the KV pool are loaded, within the
        container's limit).  A stream's flow caches grow with the
        frames its attention reaches (190 MiB per second of audio at REAL size), so the budget
        bounds how many streams are open at once (:attr:`capacity`).  ``prompt_cache_mb``: the
        part of it for the flow state of the voices' prompts, each computed once for all streams
        of a voice (0: not kept; "auto": an eighth of the budget, 256 without one).
        ``left_chunks`` is the flow's window in 25-token chunks of left context (None: unbounded,
        the official model; "auto": the widest window with which every KV slot's stream fits in
        the budget, at least 2, unbounded when that fits).  See :func:`plan_memory`.

        ``cuda_graphs``: the LM stage's decode steps as CUDA graphs (:mod:`~cosyvoice.lm_graphs`;
        default: when the LM is on a CUDA device; the pool then keeps a spare slot), and with
        ``flow_slots`` on CUDA the flow's Euler steps too (:mod:`~cosyvoice.flow_graphs`); both
        are recorded by :meth:`warm_up`.
        ``lm_overlap``: the LM stage draws the model's sampler on the LM's device and enqueues
        each step before the previous step's tokens reach the host (see
        :class:`~cosyvoice.lm_stage.LMStage`; default: when the LM is on a CUDA device, where the
        host's work per step would otherwise leave the device idle; a seeded request's tokens
        then come from a generator on the device, seeded by its own).
        ``flow_dtype``: the flow estimator's precision (fp16/bf16 under autocast; the Euler
        state, the flow's encoder and the vocoder stay float32).
        ``flow_slots``: the streams' flow estimator state in slots allocated at start
        (:class:`~cosyvoice.flow_estimator.EstimatorSlots`; needs a window; default: with a budget
        and a window of at most ``SLOT_WINDOW_MAX`` chunks, see :func:`plan_memory`; at REAL size
        on a CPU a round of 4 streams took 3.56 s instead of 3.87 s, ``benchmarks/flow_rounds.py``,
        and a stream reserves its slot's exact size instead of its buffers' bound)."""
        if lm not in LM_MODES:
            raise ValueError(f"lm must be one of {LM_MODES}")
        self.lm_mode = lm
        self.llm = llm
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.cap = cap or TokenCap()
        lm_device = llm.speech_embedding.weight.device
        batched_on_gpu = lm_device.type == "cuda" and lm == "batched"  # the default of both
        cuda_graphs = batched_on_gpu if cuda_graphs is None else cuda_graphs
        lm_overlap = batched_on_gpu if lm_overlap is None else lm_overlap
        on_gpu = flow.input_embedding.weight.device.type == "cuda"
        pool = KVPool.for_budget(
            llm.kv_shape(), int(kv_budget_mb * 2**20), kv_max_len, max_slots=kv_max_slots, spare=cuda_graphs
        )
        if t2w_budget_mb == "auto":  # the weights and the KV pool are in memory by now
            budget = memory_available(flow.input_embedding.weight.device) // 2
        else:
            budget = None if t2w_budget_mb is None else int(float(t2w_budget_mb) * 2**20)
        plan = plan_memory(
            self.flow,
            pool.slots,
            budget,
            left_chunks,
            None if prompt_cache_mb == "auto" else int(float(prompt_cache_mb) * 2**20),
            flow_slots,
        )
        flow_slots = plan.flow_slots
        self.token2wav = Token2Wav(
            self.flow,
            self.hift,
            left_chunks=plan.left_chunks,
            prompt_cache_bytes=plan.prompt_cache_bytes,
            max_streams=plan.max_streams,
            flow_slots=flow_slots,
            cuda_graphs=cuda_graphs and flow_slots and on_gpu and lm == "batched",
            flow_dtype=flow_dtype,
        )
        lm_threads, t2w_threads = stage_threads(lm_device)
        graphs = DecodeGraphs(llm, pool, capture=True) if cuda_graphs else None
        self.lm_stage = LMStage(
            llm, pool, threads=lm_threads, graphs=graphs, draw_on_device=lm_overlap, overlap=lm_overlap
        )
        self.t2w_stage = T2WStage(self.token2wav, threads=t2w_threads)

    @property
    def capacity(self) -> int:
        """Streams the model serves at once: its KV slots, or fewer where the token2wav budget
        holds fewer streams."""
        streams = self.token2wav.max_streams
        return self.lm_stage.pool.slots if streams is None else min(self.lm_stage.pool.slots, streams)

    def warm_up(self, timeout: float = 300.0) -> float:
        """Speak one short throwaway request through both stages (a zero speaker, arbitrary text
        ids, one chunk of speech) and return its seconds.  The first request of a process pays
        for first-call costs (kernels, allocator growth, page faults of the weights: 0.65 s more
        flow time for the first chunk at REAL size on a CPU) that a server should pay before it
        says it is ready, not its first user."""
        t0 = time.perf_counter()
        self.capture_graphs()
        prompt = {"flow_embedding": torch.zeros(1, self.flow.cfg.spk_embed_dim)}
        chunk = self.flow.cfg.chunk_tokens + self.flow.cfg.pre_lookahead_len
        speech = self.open_stream(prompt, seed=0, max_tokens=chunk + 2)
        if speech is None:
            raise RuntimeError("no KV slot for the warm-up request")
        deadline = t0 + timeout
        for _ in _read(speech, range(100, 110), lambda: time.perf_counter() > deadline):
            pass
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the warm-up request took over {timeout:g} s")
        return time.perf_counter() - t0

    def capture_graphs(self) -> int:
        """Record the CUDA graphs of the LM's decode steps and the flow's rounds (see
        ``cuda_graphs``; nothing without CUDA); how many there are.  Recording synchronises the
        device, so it belongs before requests arrive; until then the same steps run eagerly."""
        lm = 0 if self.lm_stage.graphs is None else self.lm_stage.graphs.capture_all()
        return lm + self.token2wav.capture_graphs()

    def close(self) -> None:
        """Stop the stages' threads (requests in them end)."""
        self.lm_stage.close()
        self.t2w_stage.close()

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path | ModelDir,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device | None = "cpu",
        **kwargs: Any,
    ) -> CosyVoice2Model:
        """Strict, weights-only loads of llm.pt / flow.pt / hift.pt, every module on ``device``.
        The LM runs in ``dtype``; flow and HiFT weights stay float32 (pass ``flow_dtype`` for a
        half-precision estimator under autocast; the vocoder's f0 and source are not fit for
        half precision)."""
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        device = resolve_device(device)
        tree = md.read_yaml()
        llm = Qwen2LM.from_model_dir(md, dtype=dtype, device=device)
        flow = CausalMaskedDiffWithXvec(flow_config_from_yaml(tree))
        load_strict(flow, load_state_dict(md.flow_pt), "flow.pt")
        hift = HiFTGenerator(hift_config_from_yaml(tree))
        load_hift_state_dict(hift, load_state_dict(md.hift_pt))
        hift.remove_weight_norm()  # fold g*v/|v| once instead of on every forward
        return cls(llm, flow.to(device), hift.to(device), **kwargs)

    # ------------------------------------------------------------------------------------------
    def tts(
        self,
        model_input: dict[str, Any],
        *,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        should_stop: StopCondition | None = None,
        token_hop_len: int | None = None,
        mel_cache_len: int | None = None,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
        uuid: Hashable | None = None,
    ) -> Iterator[torch.Tensor]:
        """Audio [1, samples] float32 at 24 kHz for one model-input dict of the frontend.

        ``model_input['text']`` is a [1, L] id tensor (unistream) or an iterator of ids (bistream;
        it may block, it is iterated, never polled).  ``stream=True`` yields chunks as soon as
        token2wav has them (960 samples per token in total); ``stream=False`` yields one tensor.
        Streamed with a hop of whole flow chunks, the LM and token2wav run in the model's stages,
        batched with every other request; otherwise the LM runs in the LM stage and token2wav in
        the calling thread.  ``should_stop`` is checked
        while waiting for tokens and before every flow chunk; once it fires the generator returns
        without further audio and every cache of the request is freed.  ``max_tokens`` overrides
        the :class:`TokenCap` for this request.
        """
        if speed <= 0:
            raise ValueError("speed must be positive")
        if stream and speed != 1.0:
            raise ValueError("speed != 1 works only with stream=False (the mel is stretched as a whole)")
        if mel_cache_len is not None and mel_cache_len != MEL_CACHE_LEN:
            raise ValueError(f"mel_cache_len must be {MEL_CACHE_LEN} (the vocoder overlap is fixed)")
        stopped = stop_fn(should_stop)
        seed = secrets.randbits(63) if seed is None else int(seed)
        uuid = uuid if uuid is not None else uuid_lib.uuid4().hex
        text = model_input["text"]
        unistream = isinstance(text, torch.Tensor)
        request = self._lm_request(model_input, text if unistream else None, seed, max_tokens, sampler)
        text_items = () if unistream else text
        prompt = flow_prompt(model_input)
        schedule, mode = self._schedule(token_hop_len)
        if stream and self.lm_mode == "batched" and mode == "cached":
            handle = self.lm_stage.submit(request, should_stop=stopped)
            yield from _read(
                SpeechStream(
                    handle, self.t2w_stage.open(uuid, handle, *prompt, schedule=schedule, seed=seed)
                ),
                text_items,
                stopped,
            )
            return
        if self.lm_mode == "batched":
            tokens = self.lm_stage.submit(request, should_stop=stopped).tokens_from(text_items)
        else:
            tokens = self.llm.run_alone(request, text_items, should_stop=stopped)
        if stream:
            yield from self._stream(uuid, tokens, prompt, seed, stopped, token_hop_len)
        else:
            ids = list(tokens)  # closes the LM generator when exhausted
            if stopped():
                return
            audio = self.token2wav.token2wav(ids, *prompt, speed=speed, seed=seed)
            yield torch.from_numpy(audio).unsqueeze(0)

    def vc(
        self,
        model_input: dict[str, Any],
        *,
        stream: bool = False,
        speed: float = 1.0,
        seed: int | None = None,
        should_stop: StopCondition | None = None,
        token_hop_len: int | None = None,
        uuid: Hashable | None = None,
    ) -> Iterator[torch.Tensor]:
        """Voice conversion: the source's speech tokens through the flow with the prompt voice."""
        if stream and speed != 1.0:
            raise ValueError("speed != 1 works only with stream=False")
        stopped = stop_fn(should_stop)
        seed = secrets.randbits(63) if seed is None else int(seed)
        source = [int(t) for t in model_input["source_speech_token"].reshape(-1).tolist()]
        prompt_token = _rows(model_input["flow_prompt_speech_token"]).long()
        prompt_feat = _rows(model_input["prompt_speech_feat"], 80).float()
        # The vc frontend does not trim the prompt; FlowStream needs exactly 2 frames per token.
        n = min(prompt_token.shape[1], prompt_feat.shape[1] // 2)
        prompt = (prompt_token[:, :n], prompt_feat[:, : 2 * n], model_input["flow_embedding"].cpu().float())
        schedule, mode = self._schedule(token_hop_len)
        if stream and self.lm_mode == "batched" and mode == "cached":
            tokens = StaticTokens(source)
            t2w = self.t2w_stage.open(
                uuid or uuid_lib.uuid4().hex, tokens, *prompt, schedule=schedule, seed=seed
            )
            yield from _read(SpeechStream(tokens, t2w), (), stopped)
        elif stream:
            yield from self._stream(
                uuid or uuid_lib.uuid4().hex, iter(source), prompt, seed, stopped, token_hop_len
            )
        elif not stopped():
            yield torch.from_numpy(
                self.token2wav.token2wav(source, *prompt, speed=speed, seed=seed)
            ).unsqueeze(0)

    # ------------------------------------------------------------------------------------------
    def open_stream(
        self,
        prompt: dict[str, Any],
        *,
        seed: int | None = None,
        token_hop_len: int | None = None,
        uuid: Hashable | None = None,
        listener: Callable[[], None] | None = None,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
    ) -> SpeechStream | None:
        """A bistream request driven from outside, without a thread of its own (the service's
        engine streams): ``prompt`` is a frontend model input without its text; text ids are
        pushed as they arrive and audio polled, ``listener`` says when to look.  None when the
        LM stage has no free KV slot or the token2wav budget no room for another stream
        (admission should have prevented that).  Needs the batched
        stages and a hop of whole flow chunks.  Every chunk is ``token_hop_len`` tokens (25 by
        default): unlike the official schedule the hops do not grow, because under load a
        doubled hop waits for twice the tokens while its listener has one hop of audio to play
        (16 sessions on TINY: 21-29 underruns with hops growing to 100, 13 to 50, none at 25,
        at the same audio throughput)."""
        schedule, mode = self._schedule(token_hop_len, grow=False)
        if self.lm_mode != "batched" or mode != "cached":
            raise ValueError(
                "open_stream needs lm='batched' and a token_hop_len that is a multiple of the flow chunk"
            )
        seed = secrets.randbits(63) if seed is None else int(seed)
        if not self.t2w_stage.has_room():
            return None
        handle = self.open_tokens(prompt, seed=seed, max_tokens=max_tokens, sampler=sampler)
        if handle is None:
            return None
        try:
            t2w = self.t2w_stage.open(
                uuid if uuid is not None else uuid_lib.uuid4().hex,
                handle,
                *flow_prompt(prompt),
                schedule=schedule,
                seed=seed,
                listener=listener,
            )
        except Token2WavFull:  # taken meanwhile
            handle.cancel()
            return None
        return SpeechStream(handle, t2w)

    def open_tokens(
        self,
        prompt: dict[str, Any],
        *,
        seed: int,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
    ) -> LMHandle | None:
        """The speech tokens of a bistream request in the LM stage, without token2wav (the caller
        pushes text into the handle and takes its tokens); None when no KV slot is free."""
        return self.lm_stage.submit(self._lm_request(prompt, None, seed, max_tokens, sampler), wait=False)

    def _lm_request(
        self,
        model_input: dict[str, Any],
        text: torch.Tensor | None,
        seed: int,
        max_tokens: int | None,
        sampler: Sampler | None,
    ) -> LMRequest:
        """The LM side of a request: unistream over ``text``, or bistream (``text`` None)."""
        limit = max_tokens if max_tokens is not None else self.cap.limit  # a function of the text taken
        return LMRequest(
            self.llm.config,
            sampler or self.llm.sampler_for(torch.Generator().manual_seed(seed)),
            _rows(model_input.get("prompt_text")),
            _rows(model_input.get("llm_prompt_speech_token")),
            text=text,
            max_tokens=limit,
        )

    def _stream(
        self,
        uuid: Hashable,
        tokens: Iterator[int],
        prompt: tuple,
        seed: int,
        stopped: Callable[[], bool],
        token_hop_len: int | None,
    ) -> Iterator[torch.Tensor]:
        """Streamed audio with token2wav in this thread (the per-request path, and hops that are
        not whole flow chunks, which need the official recomputing loop)."""
        schedule, mode = self._schedule(token_hop_len)
        t2w = self.token2wav
        t2w.open(uuid, *prompt, schedule=schedule, mode=mode, seed=seed)
        try:
            for token in tokens:
                t2w.push(uuid, [token])
                for chunk in t2w.pull(uuid):
                    yield torch.from_numpy(chunk).unsqueeze(0)
                    if stopped():
                        return
            if stopped():
                return
            for chunk in t2w.pull(uuid, finished=True):
                yield torch.from_numpy(chunk).unsqueeze(0)
        finally:
            if isinstance(tokens, Iterator) and hasattr(tokens, "close"):
                tokens.close()
            t2w.close(uuid)

    def _schedule(self, token_hop_len: int | None, grow: bool = True) -> tuple[HopSchedule, str]:
        """The request's own hop schedule (growing to 100 tokens as the official one, or not);
        hops that are not whole flow chunks need the recomputing (official) flow loop instead of
        the cached one."""
        first = 25 if token_hop_len is None else int(token_hop_len)
        if first < 1:
            raise ValueError("token_hop_len must be >= 1")
        schedule = HopSchedule(first=first, max=max(100, first) if grow else first)
        chunk = self.flow.cfg.chunk_tokens
        return schedule, ("cached" if first % chunk == 0 and schedule.max % chunk == 0 else "exact")


def stage_threads(device: torch.device) -> tuple[int | None, int | None]:
    """Torch intra-op threads for the LM stage and the token2wav stage: on a CPU the cores are
    shared between the two (they run at once), so that neither oversubscribes them; on CUDA the
    stages' host threads need one each."""
    if device.type != "cpu":
        return 1, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    lm = max(1, cores // 2)
    return lm, max(1, cores - lm)


def flow_prompt(model_input: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt speech tokens [1, P], prompt mel [1, 2P, 80], speaker embedding [1, 192]) for the flow."""
    return (
        _rows(model_input.get("flow_prompt_speech_token")).long(),
        _rows(model_input.get("prompt_speech_feat"), 80).float(),
        model_input["flow_embedding"].detach().cpu().float(),
    )


class SpeechStream:
    """One streamed request in the model's stages, seen from whoever drives it: text ids in as
    they arrive (:meth:`push_text`, :meth:`end_text`), audio chunks out (:meth:`poll`).  Every
    call returns at once; the stages do the work and call the stream's listener when there is
    something to poll.  Tokens come from the LM stage, or are fixed (voice conversion)."""

    def __init__(self, tokens: TokenSource, t2w: T2WStream) -> None:
        self.tokens = tokens
        self.t2w = t2w

    def push_text(self, ids: Iterable[int]) -> None:
        """Text token ids, each one item of the request's text (as the official iterator yields them)."""
        for token in ids:
            self.tokens.push_text(token)

    def end_text(self) -> None:
        self.tokens.end_text()

    def wants_text(self) -> bool:
        return isinstance(self.tokens, LMHandle) and self.tokens.wants_text()

    @property
    def compute_seconds(self) -> float:
        """Its share of the stages' batched calls so far (LM steps, flow rounds, vocoder calls)."""
        return getattr(self.tokens, "compute_seconds", 0.0) + self.t2w.compute_seconds

    def poll(self) -> np.ndarray | str | None:
        """The next audio chunk (float32 at 24 kHz), :data:`DONE`, or None for now; raises the
        request's error."""
        return self.t2w.poll()

    def cancel(self) -> None:
        """Stop now (idempotent): the KV slot is given back at once or after the step in flight,
        the token2wav caches before the stage's next chunk."""
        self.t2w.cancel()
        if isinstance(self.tokens, LMHandle):
            self.tokens.cancel()


def _read(stream: SpeechStream, text: Iterable[Any], stopped: Callable[[], bool]) -> Iterator[torch.Tensor]:
    """A speech stream's audio read in the calling thread (the Python API), which also pulls
    ``text`` (it may block) whenever the LM wants more."""
    items, event = iter(text), stream.t2w.event
    try:
        while not stopped():
            event.clear()  # before looking: a change after this wakes the wait below
            if stream.wants_text():
                feed_text(items, stream.tokens)
                continue
            chunk = stream.poll()
            if chunk is DONE:
                return
            if chunk is None:
                event.wait(0.1)  # a bound, so that the stop condition is seen
                continue
            yield torch.from_numpy(chunk).unsqueeze(0)
    finally:
        stream.cancel()
