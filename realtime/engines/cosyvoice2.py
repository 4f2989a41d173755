"""The ``cosyvoice2`` engine: our CosyVoice2 on a model directory, fed by streamed LLM text.

One :class:`cosyvoice.CosyVoice2` (LM, flow, HiFT, frontend) is shared by every session.  A context
is one or more *segments*: text up to a flush, or up to the end.  Each segment is one bistream
request with its own UUID: its text iterator pulls deltas from the context's
:class:`~realtime.engines.base.TextStream` as they arrive (a blocking ``get``, never a poll),
normalises them incrementally and hands token ids to the LM, which generates speech while the text
is still coming; token2wav turns the tokens into audio chunks that are yielded as soon as they
exist.  A flush ends the segment's text, so the LM runs its end phase and the vocoder its final
flush; the next text starts a fresh segment with the same prompt.

Cancellation: the LM checks the stream before every step and the orchestration before every flow
chunk; a cancelled ``get`` raises at once.  Every per-request cache is freed in ``finally``.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    AudioChunk,
    BlockingEngine,
    End,
    EngineError,
    Flush,
    Flushed,
    SynthesisOptions,
    TextStream,
    VoiceInfo,
)

VOICE_ID = re.compile(r"^[\w][\w .\-]{0,63}$")
_LM_PROMPT_TEXT = ("prompt_text", "prompt_text_len")
_LM_PROMPT_SPEECH = ("llm_prompt_speech_token", "llm_prompt_speech_token_len")


def _is_zero_shot(entry: dict[str, Any]) -> bool:
    return "flow_prompt_speech_token" in entry


class CosyVoice2Engine(BlockingEngine):
    name = "cosyvoice2"
    sample_rate = 24000
    modes = ("sft", "zero_shot", "cross_lingual", "instruct2")

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str = "fp32",
                 max_token_ratio: float = 20.0, min_tokens: int = 50, left_chunks: int | None = None,
                 lm: str = "batched", **kwargs: Any) -> None:
        from cosyvoice.api import CosyVoice2

        if kwargs:
            raise TypeError(f"unexpected engine option(s) {sorted(kwargs)}")
        super().__init__()
        self.cv = CosyVoice2(model_dir, device=device, dtype=dtype, max_token_ratio=max_token_ratio,
                             min_tokens=min_tokens, left_chunks=left_chunks, lm=lm)
        # Every stream's LM runs in the model's batched LM stage and its token2wav in the batched
        # token2wav stage (lm="per-request": each stream's LM and token2wav in its own thread, as
        # before batching): admission counts the LM's KV slots.  A stream's own thread only hands
        # text to the LM and audio to the service, so it holds no compute slot.
        self.capacity = self.cv.model.lm_stage.pool.slots
        self.compute_slots = None
        if self.cv.model.llm.speech_embedding.weight.device.type == "cpu":
            # parallelism comes from the LM stage and the streams' threads running at once; each
            # op on one thread keeps them from oversubscribing the cores (16 sessions on TINY:
            # 14.6 audio s per wall s against 12.0 with torch's default of a thread per core)
            torch.set_num_threads(1)
        self.sample_rate = self.cv.sample_rate
        self._register_lock = threading.Lock()
        sft = [v.id for v in self.voices() if v.kind == "sft"]
        self.default_voice = sft[0] if sft else None

    def close(self) -> None:
        self.cv.model.close()

    def stats(self) -> dict[str, float]:
        model = self.cv.model
        lm, t2w = model.llm.stats, model.t2w_stage.group_sizes
        return {"cosyvoice_lm_calls_total": lm.calls, "cosyvoice_lm_requests_stepped_total": lm.requests,
                "cosyvoice_lm_rows_total": lm.rows, "cosyvoice_kv_slots_free": model.lm_stage.free_slots,
                "cosyvoice_kv_slots": model.lm_stage.pool.slots,
                "cosyvoice_t2w_calls_total": sum(t2w.values()),
                "cosyvoice_t2w_chunks_total": sum(size * n for size, n in t2w.items())}

    # -- voices ---------------------------------------------------------------------------------
    def _spk2info(self) -> dict[str, dict[str, Any]]:
        with self.cv._spk_lock:
            return dict(self.cv.frontend.spk2info)

    def voices(self) -> list[VoiceInfo]:
        out = []
        for spk_id, entry in self._spk2info().items():
            if _is_zero_shot(entry):
                out.append(VoiceInfo(spk_id, spk_id, "multi", "zero_shot", "registered zero-shot prompt"))
            else:
                out.append(VoiceInfo(spk_id, spk_id, "multi", "sft", "CosyVoice2 SFT speaker"))
        return out

    def register_voice(self, voice_id: str, wav_bytes: bytes, prompt_text: str) -> VoiceInfo:
        """Analyse a prompt (WAV + the words spoken in it) and persist it in spk2info.pt."""
        if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
            raise EngineError("bad_request", "voice_id must be 1-64 letters, digits, spaces, '.', '_' or '-'")
        if not prompt_text or not prompt_text.strip():
            raise EngineError("bad_request", "prompt_text (the words spoken in prompt_wav) is required")
        if not wav_bytes:
            raise EngineError("bad_request", "prompt_wav is required")
        with self._register_lock:
            if voice_id in self._spk2info():
                raise EngineError("conflict", f"voice {voice_id!r} already exists")
            try:
                self.cv.add_zero_shot_spk(prompt_text, wav_bytes, voice_id)
            except Exception as e:
                raise EngineError("bad_request", f"prompt_wav could not be analysed: {e}") from None
            try:
                self.cv.save_spkinfo()
            except Exception as e:
                with self.cv._spk_lock:
                    self.cv.frontend.spk2info.pop(voice_id, None)
                raise EngineError("internal", f"could not save spk2info.pt: {type(e).__name__}") from None
        return VoiceInfo(voice_id, voice_id, "multi", "zero_shot", "registered zero-shot prompt")

    # -- synthesis ------------------------------------------------------------------------------
    def validate(self, options: SynthesisOptions) -> None:
        super().validate(options)
        chunk = self.cv.model.flow.cfg.chunk_tokens
        if options.token_hop_len is not None and options.token_hop_len % chunk:
            # other hops need the official loop that re-runs the flow over the whole prefix for
            # every chunk: a context's cost would grow with its length
            raise EngineError("bad_request", f"token_hop_len must be a multiple of {chunk} (a whole flow chunk)")
        if options.mode == "sft" and not (options.voice or self.default_voice):
            raise EngineError("bad_request", "sft needs a voice and this model directory has no SFT speakers")

    def _prompt(self, options: SynthesisOptions) -> dict[str, Any]:
        """The model input of the context minus its text (built once, reused by every segment)."""
        cv, mode = self.cv, options.mode
        entry = None
        voice = options.voice or (self.default_voice if options.prompt_audio is None else None)
        if voice is not None and options.prompt_audio is None:
            entry = self._spk2info().get(voice)
            if entry is None:
                raise EngineError("unknown_voice", f"unknown voice {voice!r}")
        if entry is not None and not _is_zero_shot(entry):  # an SFT speaker: only its embedding
            if mode == "zero_shot":
                raise EngineError("bad_request", f"voice {voice!r} is an SFT speaker; zero_shot needs prompt_audio")
            prompt: dict[str, Any] = {"flow_embedding": entry["embedding"], "llm_embedding": entry["embedding"]}
        elif entry is not None:  # a registered zero-shot voice (in sft mode too: it has no other use)
            prompt = dict(entry)
            mode = "zero_shot" if mode == "sft" else mode
        else:
            if options.prompt_audio is None:
                raise EngineError("bad_request", f"mode {mode} needs prompt_audio or a registered voice")
            if mode == "sft":  # a voice given only as audio: its timbre, without an LM prompt
                mode = "cross_lingual"
            try:
                prompt = cv.frontend.frontend_zero_shot("", "", options.prompt_audio, cv.sample_rate)
            except Exception as e:
                raise EngineError("bad_request", f"prompt_audio is not a usable WAV file: {e}") from None
            if mode == "zero_shot":
                text = cv.frontend.text_normalize(options.prompt_text or "", split=False)
                prompt["prompt_text"], prompt["prompt_text_len"] = cv._encode(text)
        if mode in ("cross_lingual", "instruct2"):
            for key in _LM_PROMPT_SPEECH + (_LM_PROMPT_TEXT if mode == "cross_lingual" else ()):
                prompt.pop(key, None)
        if mode == "instruct2":
            from cosyvoice.api import instruct_prompt

            prompt["prompt_text"], prompt["prompt_text_len"] = cv._encode(instruct_prompt(options.instruct_text or ""))
        prompt.pop("text", None)
        prompt.pop("text_len", None)
        return prompt

    def synthesize(self, text: TextStream, options: SynthesisOptions) -> Iterator[AudioChunk | Flushed]:
        self.validate(options)
        prompt = self._prompt(options)
        stream = options.speed == 1.0  # a changed speed stretches each segment's mel as a whole
        for index in itertools.count():
            marker: list[Flush | End] = []
            deltas = _segment_deltas(text, marker)
            ids = self.cv.frontend.stream_text_ids(deltas)
            first = next(ids, None)  # blocks until the segment has a token, or ends without one
            if first is not None:
                model_input = {**prompt, "text": itertools.chain([first], ids),
                               "text_len": torch.tensor([0], dtype=torch.int32)}
                seed = None if options.seed is None else options.seed + index
                request = self.cv.model.tts(model_input, stream=stream, speed=options.speed, seed=seed,
                                            should_stop=lambda: text.cancelled, token_hop_len=options.token_hop_len)
                try:
                    for speech in request:
                        text.check()
                        yield AudioChunk(speech.reshape(-1).numpy())
                finally:
                    request.close()  # frees the segment's LM and token2wav state at once, however we leave
                text.check()
                for _ in deltas:  # text the LM did not take (token cap reached): skip to the marker
                    pass
            # everything handed out so far is spoken once the audio above has played
            yield AudioChunk(np.zeros(0, dtype=np.float32), text_offset=text.offset)
            if not marker or isinstance(marker[0], End):
                return
            yield Flushed()


def _segment_deltas(text: TextStream, marker: list[Flush | End]) -> Iterator[str]:
    """The context's deltas up to the next flush or end (recorded in ``marker``)."""
    while True:
        item = text.get()
        if isinstance(item, str):
            yield item
        else:
            marker.append(item)
            return
