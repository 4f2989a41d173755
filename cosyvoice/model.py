"""One CosyVoice2 model shared by every request: LM -> token2wav, per request under its own UUID.

The official `CosyVoice2Model.tts` runs the LM in a second thread and polls its token list every
0.1 s; both threads then compete for the same cores on a CPU box, and the hop length lives on the
model object (so a second streaming request starts at hop 100).  Here one request is one generator
running in the caller's thread: after every LM token it hands the token to `Token2Wav` and yields
whatever chunk became ready.  Everything mutable (LM KV cache, sampler generator, hop schedule,
flow/vocoder caches) belongs to that generator and is freed in its ``finally``, whether it ends,
is stopped, or is closed by the caller.
"""

from __future__ import annotations

import secrets
import uuid as uuid_lib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_state_dict, load_strict
from .config import ConfigError, ModelDir, resolve_device
from .flow import CausalMaskedDiffWithXvec, FlowConfig
from .hift import HiFTConfig, HiFTGenerator, load_hift_state_dict
from .kv_cache import KVPool
from .llm import Qwen2LM, StopCondition, stop_fn
from .lm_request import LMRequest, feed_text
from .lm_stage import LMHandle, LMStage
from .sampling import Sampler
from .t2w_stage import DONE, StaticTokens, T2WStage, TokenSource
from .token2wav import MEL_CACHE_LEN, HopSchedule, Token2Wav

__all__ = [
    "CosyVoice2Model", "TokenCap", "flow_config_from_yaml", "hift_config_from_yaml", "StopCondition",
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

    def __init__(self, llm: Qwen2LM, flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator,
                 left_chunks: int | None = None, cap: TokenCap | None = None,
                 kv_budget_mb: float = 1024, kv_max_len: int = 2048, kv_max_slots: int = 32,
                 lm: str = "batched"):
        """``kv_*``: the LM stage's KV pool, ``kv_max_len`` rows (prompt, text and speech tokens)
        per request, as many slots as ``kv_budget_mb`` holds, at most ``kv_max_slots``: how many
        requests the LM stage serves at once.  ``lm="per-request"`` runs each request's LM alone
        in its caller's thread instead (the pre-batching path, kept for comparison)."""
        if lm not in LM_MODES:
            raise ValueError(f"lm must be one of {LM_MODES}")
        self.lm_mode = lm
        self.llm = llm
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.token2wav = Token2Wav(self.flow, self.hift, left_chunks=left_chunks)
        self.cap = cap or TokenCap()
        pool = KVPool.for_budget(llm.kv_shape(), int(kv_budget_mb * 2**20), kv_max_len, max_slots=kv_max_slots)
        self.lm_stage = LMStage(llm, pool)
        self.t2w_stage = T2WStage(self.token2wav)

    def close(self) -> None:
        """Stop the stages' threads (requests in them end)."""
        self.lm_stage.close()
        self.t2w_stage.close()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | ModelDir, dtype: str | torch.dtype = "fp32",
                       device: str | torch.device | None = "cpu", **kwargs: Any) -> CosyVoice2Model:
        """Strict, weights-only loads of llm.pt / flow.pt / hift.pt.  The LM runs in ``dtype`` on
        ``device``; flow and HiFT stay float32 on the CPU (Token2Wav keeps its caches there)."""
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        resolve_device(device)
        tree = md.read_yaml()
        llm = Qwen2LM.from_model_dir(md, dtype=dtype, device=device)
        flow = CausalMaskedDiffWithXvec(flow_config_from_yaml(tree))
        load_strict(flow, load_state_dict(md.flow_pt), "flow.pt")
        hift = HiFTGenerator(hift_config_from_yaml(tree))
        load_hift_state_dict(hift, load_state_dict(md.hift_pt))
        hift.remove_weight_norm()  # fold g*v/|v| once instead of on every forward
        return cls(llm, flow, hift, **kwargs)

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
        The LM runs in the model's LM stage, batched with every other request and overlapping with
        this request's token2wav, which runs in the calling thread.  ``should_stop`` is checked
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
        generator = torch.Generator().manual_seed(seed)
        uuid = uuid if uuid is not None else uuid_lib.uuid4().hex

        text = model_input["text"]
        prompt_text = _rows(model_input.get("prompt_text"))
        llm_prompt_speech = _rows(model_input.get("llm_prompt_speech_token"))
        limit = max_tokens if max_tokens is not None else self.cap.limit  # a function of the text taken
        unistream = isinstance(text, torch.Tensor)
        request = LMRequest(self.llm.config, sampler or self.llm.sampler_for(generator), prompt_text,
                            llm_prompt_speech, text=text if unistream else None, max_tokens=limit)
        text_items = () if unistream else text
        prompt = (_rows(model_input.get("flow_prompt_speech_token")).long(),
                  _rows(model_input.get("prompt_speech_feat"), 80).float(),
                  model_input["flow_embedding"].detach().cpu().float())
        schedule, mode = self._schedule(token_hop_len)
        if stream and self.lm_mode == "batched" and mode == "cached":
            handle = self.lm_stage.submit(request, should_stop=stopped)
            yield from self._stream_stages(uuid, handle, text_items, prompt, seed, stopped, schedule)
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

    def vc(self, model_input: dict[str, Any], *, stream: bool = False, speed: float = 1.0,
           seed: int | None = None, should_stop: StopCondition | None = None,
           token_hop_len: int | None = None, uuid: Hashable | None = None) -> Iterator[torch.Tensor]:
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
            yield from self._stream_stages(uuid or uuid_lib.uuid4().hex, StaticTokens(source), (), prompt, seed,
                                           stopped, schedule)
        elif stream:
            yield from self._stream(uuid or uuid_lib.uuid4().hex, iter(source), prompt, seed, stopped, token_hop_len)
        elif not stopped():
            yield torch.from_numpy(self.token2wav.token2wav(source, *prompt, speed=speed, seed=seed)).unsqueeze(0)

    # ------------------------------------------------------------------------------------------
    def _stream_stages(self, uuid: Hashable, source: TokenSource, text: Iterable[Any], prompt: tuple, seed: int,
                       stopped: Callable[[], bool], schedule: HopSchedule) -> Iterator[torch.Tensor]:
        """Streamed audio through the model's stages: tokens from ``source`` (the LM stage's
        handle, or fixed tokens) into the token2wav stage; this thread only hands text to the LM
        when it wants some (``text`` may block) and reads the audio."""
        stream = self.t2w_stage.open(uuid, source, *prompt, schedule=schedule, seed=seed)
        items = iter(text)
        try:
            while not stopped():
                stream.event.clear()  # before looking: a change after this wakes the wait below
                if isinstance(source, LMHandle) and source.wants_text():
                    feed_text(items, source)
                    continue
                event = stream.poll()
                if event is DONE:
                    return
                if event is None:
                    stream.event.wait(0.1)  # a bound, so that the stop condition is seen
                    continue
                yield torch.from_numpy(event).unsqueeze(0)
        finally:
            stream.cancel()
            if isinstance(source, LMHandle):
                source.cancel()

    def _stream(self, uuid: Hashable, tokens: Iterator[int], prompt: tuple, seed: int,
                stopped: Callable[[], bool], token_hop_len: int | None) -> Iterator[torch.Tensor]:
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

    def _schedule(self, token_hop_len: int | None) -> tuple[HopSchedule, str]:
        """The request's own hop schedule; hops that are not whole flow chunks need the
        recomputing (official) flow loop instead of the cached one."""
        first = 25 if token_hop_len is None else int(token_hop_len)
        if first < 1:
            raise ValueError("token_hop_len must be >= 1")
        schedule = HopSchedule(first=first, max=max(100, first))
        chunk = self.flow.cfg.chunk_tokens
        return schedule, ("cached" if first % chunk == 0 and schedule.max % chunk == 0 else "exact")

