"""``CosyVoice2``: the Python API users of the official package know, on our loaders and model.

Same constructor and method names, arguments and results (``{'tts_speech': tensor [1, samples]}``
dicts at 24 kHz; ``stream=False`` yields one dict per text segment, ``stream=True`` one per audio
chunk).  Differences that matter:

- Nothing is executed or unpickled from the model directory (inert yaml, ``weights_only`` loads,
  strict keys).  ``load_jit`` / ``load_trt`` / ``load_vllm`` name accelerations we do not have; they
  are accepted and ignored with a warning, so scripts written for the official API still run.
- Every request has its own UUID, LM state, hop schedule, flow/vocoder caches and random generator
  (``seed=`` makes a request reproducible), so one instance serves concurrent threads.
- Text given as an iterator (a generator of LLM deltas) goes to bistream in every text mode, and
  is normalised incrementally (the official code skips normalisation for streamed text).
- The prompt of a zero-shot request is analysed once, not once per text segment.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ModelDir, resolve_device
from .features import WavSource
from .frontend import CosyVoiceFrontEnd
from .model import CosyVoice2Model, TokenCap
from .text import ENDOFPROMPT, CosyVoice2Tokenizer

__all__ = ["CosyVoice2", "Text"]

log = logging.getLogger("cosyvoice")

Text = str | Iterable[str]
PromptWav = WavSource | torch.Tensor
# zero-shot speaker fields that belong to the LM prompt (dropped for cross-lingual / instruct2)


class CosyVoice2:
    """A CosyVoice2-0.5B model directory, loaded once and shared by every request."""

    def __init__(
        self,
        model_dir: str | Path,
        load_jit: bool = False,
        load_trt: bool = False,
        load_vllm: bool = False,
        fp16: bool = False,
        trt_concurrent: int = 1,
        device: str | torch.device = "cpu",
        *,
        seed: int | None = None,
        dtype: str | None = None,
        max_token_ratio: float = 20.0,
        min_tokens: int = 50,
        left_chunks: int | str | None = None,
        lm: str = "batched",
        prompt_cache_mb: float | str = 256,
        t2w_budget_mb: float | str | None = None,
        kv_budget_mb: float = 1024,
        kv_max_slots: int = 32,
        cuda_graphs: bool | None = None,
        flow_slots: bool | None = None,
        flow_dtype: str | None = None,
        lm_overlap: bool | None = None,
    ):
        for flag, name in ((load_jit, "load_jit"), (load_trt, "load_trt"), (load_vllm, "load_vllm")):
            if flag:
                log.warning("%s=True ignored: this implementation has no JIT/TensorRT/vLLM path", name)
        self.model_dir = ModelDir(model_dir)
        missing = self.model_dir.missing()
        if missing:
            raise FileNotFoundError(
                f"{self.model_dir.root} is not a CosyVoice2 model directory: missing {missing}"
            )
        device = resolve_device(device)
        self.fp16 = bool(fp16) and device.type == "cuda"
        if fp16 and not self.fp16:
            log.warning("fp16=True ignored on %s (half precision is for CUDA)", device)
        self.seed = seed  # default for requests that pass none; None = fresh randomness per request
        # ``dtype`` (fp32 / fp16 / bf16, the LM's precision) and ``flow_dtype`` (the flow
        # estimator's) are ours; ``fp16`` is the official switch, which sets both.
        dtype = dtype or ("fp16" if self.fp16 else "fp32")
        self.model = CosyVoice2Model.from_model_dir(
            self.model_dir,
            dtype=dtype,
            device=device,
            left_chunks=left_chunks,
            cap=TokenCap(ratio=max_token_ratio, floor=min_tokens),
            lm=lm,
            prompt_cache_mb=prompt_cache_mb,
            t2w_budget_mb=t2w_budget_mb,
            kv_budget_mb=kv_budget_mb,
            kv_max_slots=kv_max_slots,
            cuda_graphs=cuda_graphs,
            flow_slots=flow_slots,
            flow_dtype=flow_dtype or ("fp16" if self.fp16 else "fp32"),
            lm_overlap=lm_overlap,
        )
        self.model.capture_graphs()  # on CUDA: recorded now, before the first request
        spk2info = self.model_dir.root / "spk2info.pt"
        self.frontend = CosyVoiceFrontEnd(
            CosyVoice2Tokenizer(self.model_dir.qwen_dir),
            self.model_dir.campplus_onnx,
            self.model_dir.speech_tokenizer_onnx,
            spk2info if spk2info.is_file() else None,
            device=device,
        )
        self.sample_rate = self.model.sample_rate
        self._spk_lock = threading.Lock()
        self._spk_path = spk2info
        self._spk_stamp = _stamp(spk2info)  # the file as last read: another process may replace it

    # ------------------------------------------------------------------------------ speakers

    def list_available_spks(self) -> list[str]:
        return list(self.spkinfo())

    def spkinfo(self) -> dict[str, dict[str, Any]]:
        """A snapshot of every speaker, including those another process (a replica sharing the
        model directory) has saved to spk2info.pt since we last looked: one ``stat`` per call."""
        stamp = _stamp(self._spk_path)
        if stamp != self._spk_stamp and stamp is not None:
            on_disk = torch.load(self._spk_path, map_location=self.frontend.device, weights_only=True)
            with self._spk_lock:
                self.frontend.spk2info.update(on_disk)
                self._spk_stamp = stamp
        with self._spk_lock:
            return dict(self.frontend.spk2info)

    def register_spk(self, spk_id: str, entry: dict[str, Any]) -> None:
        """Persist a speaker (from :meth:`zero_shot_entry`) for every process sharing the model
        directory; ``KeyError`` if that id exists already (here or saved by another process)."""
        if spk_id in self.spkinfo():
            raise KeyError(spk_id)
        self._save(new=(spk_id, entry))

    def add_zero_shot_spk(self, prompt_text: str, prompt_wav: PromptWav, zero_shot_spk_id: str) -> bool:
        """Analyse a prompt once and keep it under ``zero_shot_spk_id`` (``save_spkinfo`` persists it)."""
        if not zero_shot_spk_id:
            raise ValueError("zero_shot_spk_id must not be empty")
        entry = self.zero_shot_entry(prompt_text, prompt_wav)
        with self._spk_lock:
            self.frontend.spk2info[zero_shot_spk_id] = entry
        return True

    def zero_shot_entry(self, prompt_text: str, prompt_wav: PromptWav) -> dict[str, Any]:
        """A prompt analysed once (speaker embedding, speech tokens, mel, prompt text ids)."""
        prompt_text = self.frontend.text_normalize(prompt_text, split=False)
        entry = self.frontend.frontend_zero_shot("", prompt_text, prompt_wav, self.sample_rate)
        del entry["text"], entry["text_len"]
        return entry

    def save_spkinfo(self) -> Path:
        """Write spk2info.pt atomically (a crash leaves either the old or the new file, never
        half), merged with what other processes sharing the directory saved meanwhile."""
        return self._save()

    def _save(self, new: tuple[str, dict[str, Any]] | None = None) -> Path:
        """Under an exclusive lock on spk2info.pt.lock (every process sharing the directory takes
        it): read the file, add ours (and ``new``, refused with ``KeyError`` if the file has its
        id: another process registered it first), write a temporary file, rename it over."""
        path = self._spk_path
        with self._spk_lock, open(path.with_name(path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            on_disk = (
                torch.load(path, map_location=self.frontend.device, weights_only=True)
                if path.is_file()
                else {}
            )
            if new is not None and new[0] in on_disk:
                raise KeyError(new[0])
            merged = {**on_disk, **self.frontend.spk2info, **dict([new] if new else [])}
            fd, tmp = tempfile.mkstemp(prefix=".spk2info.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(merged, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the model directory unreadable to others
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.frontend.spk2info.update(merged)
            self._spk_stamp = _stamp(path)
        return path

    # ------------------------------------------------------------------------------ modes

    def inference_sft(
        self,
        tts_text: Text,
        spk_id: str,
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        prompt = self.frontend.prompt_input("sft", speaker=self._speaker(spk_id))
        yield from self._speak(prompt, tts_text, text_frontend, stream, speed, kwargs)

    def inference_zero_shot(
        self,
        tts_text: Text,
        prompt_text: str,
        prompt_wav: PromptWav | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        if not zero_shot_spk_id:
            prompt_text = self.frontend.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
        prompt = self._prompt("zero_shot", prompt_wav, zero_shot_spk_id, prompt_text=prompt_text)
        yield from self._speak(prompt, tts_text, text_frontend, stream, speed, kwargs)

    def inference_cross_lingual(
        self,
        tts_text: Text,
        prompt_wav: PromptWav | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        prompt = self._prompt("cross_lingual", prompt_wav, zero_shot_spk_id)
        yield from self._speak(prompt, tts_text, text_frontend, stream, speed, kwargs)

    def inference_instruct2(
        self,
        tts_text: Text,
        instruct_text: str,
        prompt_wav: PromptWav | None,
        zero_shot_spk_id: str = "",
        stream: bool = False,
        speed: float = 1.0,
        text_frontend: bool = True,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """``instruct_text`` is the LM's prompt text; ``<|endofprompt|>`` is appended if missing."""
        prompt = self._prompt(
            "instruct2", prompt_wav, zero_shot_spk_id, instruct_text=instruct_prompt(instruct_text)
        )
        yield from self._speak(prompt, tts_text, text_frontend, stream, speed, kwargs)

    def inference_instruct(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        """CosyVoice 1's speaker + instruction mode; CosyVoice2 has none (as in the official class)."""
        raise NotImplementedError("inference_instruct is CosyVoice 1 only; use inference_instruct2")

    def inference_vc(
        self,
        source_wav: PromptWav,
        prompt_wav: PromptWav,
        stream: bool = False,
        speed: float = 1.0,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        model_input = self.frontend.frontend_vc(source_wav, prompt_wav, self.sample_rate)
        request = self._request(kwargs)
        unsupported = set(request) - {"seed", "should_stop", "token_hop_len", "uuid"}
        if unsupported:
            raise TypeError(f"inference_vc does not take {sorted(unsupported)}")
        for speech in self.model.vc(model_input, stream=stream, speed=speed, **request):
            yield {"tts_speech": speech}

    def inference_sft_chunked(
        self,
        text_chunks: Iterable[str],
        spk_id: str,
        stream: bool = True,
        speed: float = 1.0,
        text_frontend: bool = True,
        token_hop_len: int | None = None,
        mel_cache_len: int | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Text chunks (a list or a generator, e.g. LLM deltas) as ONE utterance under one UUID:
        bistream underneath, so speech starts before the last chunk arrives."""
        if isinstance(text_chunks, str):
            text_chunks = [text_chunks]
        if text_frontend:
            model_input = self.frontend.frontend_sft(iter(text_chunks), spk_id)
        else:
            model_input = self._with_text(
                self.frontend.frontend_sft("", spk_id), _RawIds(self.frontend.tokenizer, text_chunks)
            )
        kwargs.update(token_hop_len=token_hop_len, mel_cache_len=mel_cache_len)
        yield from self._run(model_input, stream, speed, kwargs)

    # ------------------------------------------------------------------------------ helpers

    def _segments(self, tts_text: Text, text_frontend: bool) -> list[Text]:
        """Whole text: normalised and split into ~60-80 token segments (one request each, as
        official).  An iterator: one bistream request, normalised as it streams."""
        if isinstance(tts_text, str):
            return list(self.frontend.text_normalize(tts_text, split=True, text_frontend=text_frontend))
        if not text_frontend:  # as official: each chunk tokenized on its own, nothing normalised
            return [_RawIds(self.frontend.tokenizer, tts_text)]
        return [iter(tts_text)]

    def _speak(
        self,
        prompt: dict[str, Any],
        tts_text: Text,
        text_frontend: bool,
        stream: bool,
        speed: float,
        kwargs: dict[str, Any],
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Every segment of ``tts_text`` with the mode's ``prompt``, one request each (as official)."""
        for text in self._segments(tts_text, text_frontend):
            yield from self._run(self._with_text(prompt, text), stream, speed, kwargs)

    def _prompt(
        self, mode: str, prompt_wav: PromptWav | None, zero_shot_spk_id: str, **texts: str
    ) -> dict[str, Any]:
        """A stored speaker must be a zero-shot prompt here (an SFT speaker has nothing to clone)."""
        if zero_shot_spk_id:
            entry = self._speaker(zero_shot_spk_id)
            if "flow_prompt_speech_token" not in entry:
                raise ValueError(f"speaker {zero_shot_spk_id!r} is an SFT speaker, not a zero-shot prompt")
            return self.frontend.prompt_input(mode, speaker=entry, **texts)
        if prompt_wav is None:
            raise ValueError("a prompt_wav or a zero_shot_spk_id is needed")
        return self.frontend.prompt_input(
            mode, prompt_wav=prompt_wav, resample_rate=self.sample_rate, **texts
        )

    def _speaker(self, spk_id: str) -> dict[str, Any]:
        """The speaker's entry as the shared spk2info.pt has it now (another process may have
        registered it since we loaded)."""
        speakers = self.spkinfo()
        if spk_id not in speakers:
            raise KeyError(f"unknown speaker {spk_id!r}; available: {sorted(speakers)}")
        return speakers[spk_id]

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of ``text`` as a model input ([1, L] int32, [1] int32)."""
        ids = self.frontend.tokenizer.encode(text)
        return (torch.tensor([ids], dtype=torch.int32), torch.tensor([len(ids)], dtype=torch.int32))

    def _with_text(self, prompt: dict[str, Any], text: Text) -> dict[str, Any]:
        model_input = dict(prompt)
        if isinstance(text, str):
            model_input["text"], model_input["text_len"] = self.encode(text)
        elif isinstance(text, _RawIds):
            model_input["text"], model_input["text_len"] = iter(text), torch.tensor([0], dtype=torch.int32)
        else:
            model_input["text"] = self.frontend.stream_text_ids(text)
            model_input["text_len"] = torch.tensor([0], dtype=torch.int32)
        return model_input

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        allowed = {"seed", "should_stop", "token_hop_len", "mel_cache_len", "max_tokens", "sampler", "uuid"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
        out = {k: v for k, v in kwargs.items() if v is not None}
        if "seed" not in out and self.seed is not None:
            out["seed"] = self.seed
        return out

    def _run(
        self, model_input: dict[str, Any], stream: bool, speed: float, kwargs: dict[str, Any]
    ) -> Iterator[dict[str, torch.Tensor]]:
        for speech in self.model.tts(model_input, stream=stream, speed=speed, **self._request(kwargs)):
            yield {"tts_speech": speech}


class _RawIds:
    """Streamed text tokenized chunk by chunk without normalisation (``text_frontend=False``)."""

    def __init__(self, tokenizer: CosyVoice2Tokenizer, chunks: Iterable[str]):
        self.tokenizer, self.chunks = tokenizer, chunks

    def __iter__(self) -> Iterator[int]:
        for chunk in self.chunks:
            yield from self.tokenizer.encode(chunk)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file (an atomic rename makes a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def instruct_prompt(instruct_text: str) -> str:
    """The LM prompt text of instruct2: the instruction, ending with ``<|endofprompt|>``."""
    text = instruct_text.strip()
    return text if text.endswith(ENDOFPROMPT) else text + ENDOFPROMPT
