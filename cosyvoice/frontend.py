"""CosyVoice2 frontend: turns text and prompt audio into the model-input dicts of each mode.

Key names and dtypes follow the official CosyVoiceFrontEnd (FACTS §8), so that stored speakers
(spk2info.pt) and the model code read the same dicts: token tensors are int32 [1, L] with int32 [1]
lengths, embeddings float32 [1, 192], prompt mel float32 [1, 2N, 80].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import soxr
import torch

from cosyvoice.features import (
    WavSource,
    align_prompt,
    campplus_input,
    load_wav,
    prompt_mel_24k,
    whisper_log_mel,
)
from cosyvoice.text import CosyVoice2Tokenizer, StreamingNormalizer, text_normalize, warmup

MAX_PROMPT_SECONDS = 30  # the speech tokenizer's limit (Whisper-style encoder)
Text = str | Iterable[str]


def _session(path: str | Path, device: str) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)


PROMPT_MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")
# the LM's share of a zero-shot prompt, which cross_lingual and instruct2 leave out
LM_PROMPT_TEXT = ("prompt_text", "prompt_text_len")
LM_PROMPT_SPEECH = ("llm_prompt_speech_token", "llm_prompt_speech_token_len")


def _ids(ids: list[int], device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([ids], dtype=torch.int32, device=device),
        torch.tensor([len(ids)], dtype=torch.int32, device=device),
    )


class TextIds:
    """Streamed text deltas -> token ids, normalised incrementally: what one bistream request
    reads.  Trailing whitespace of each released piece is carried over to the next, so that
    English words tokenize as they would in the whole text (Qwen2 attaches the space to the next
    word).  Cheap enough to run on an event loop (about 20 us per 4-character delta)."""

    def __init__(self, encode: Callable[[str], list[int]], normalizer: StreamingNormalizer | None) -> None:
        self._encode = encode
        self._normalizer = normalizer
        self._carry = ""

    def push(self, chunk: str) -> list[int]:
        """Ids of the text that can no longer change once ``chunk`` is added."""
        text = self._carry + (self._normalizer.push(chunk) if self._normalizer else chunk)
        body = text.rstrip()
        self._carry = text[len(body) :]
        return self._encode(body) if body else []

    @property
    def held(self) -> int:
        """Characters of the pushed text whose ids have not been returned yet (the normaliser holds
        them until they can no longer change): how far behind the text its ids are."""
        return len(self._normalizer.pending) if self._normalizer else 0

    def end(self) -> list[int]:
        """Ids of everything held back (the text is over)."""
        tail = self._carry + (self._normalizer.flush() if self._normalizer else "")
        self._carry = ""
        return self._encode(tail.rstrip()) if tail.strip() else []


class CosyVoiceFrontEnd:
    """One instance per model, shared by all sessions: the ONNX sessions are created once.

    The ONNX sessions run with one intra-op thread each, as the official frontend does, so that
    concurrent sessions don't oversubscribe the cores.
    """

    def __init__(
        self,
        tokenizer: CosyVoice2Tokenizer,
        campplus_onnx_path: str | Path,
        speech_tokenizer_onnx_path: str | Path,
        spk2info_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        normalize: bool = True,
    ):
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # campplus stays on CPU in the official code too: it is tiny and runs once per prompt
        self.campplus = _session(campplus_onnx_path, "cpu")
        self.speech_tokenizer = _session(speech_tokenizer_onnx_path, str(self.device))
        self._campplus_in = self.campplus.get_inputs()[0].name
        self._tokenizer_in = [i.name for i in self.speech_tokenizer.get_inputs()]
        if len(self._tokenizer_in) != 2:
            raise ValueError(f"speech tokenizer must take (feats, feats_length), got {self._tokenizer_in}")
        self.spk2info: dict[str, dict[str, torch.Tensor]] = {}
        if spk2info_path is not None and Path(spk2info_path).is_file():
            self.spk2info = torch.load(spk2info_path, map_location=self.device, weights_only=True)
        self.normalize = normalize
        if normalize:
            warmup()

    # ------------------------------------------------------------------------------ text

    def text_normalize(self, text: str, split: bool = True, text_frontend: bool = True) -> list[str] | str:
        return text_normalize(
            text, self.tokenizer.encode, split=split, enabled=text_frontend and self.normalize
        )

    def stream_text_ids(self, chunks: Iterable[str]) -> Iterator[int]:
        """Token ids of streamed text, one at a time, normalised incrementally."""
        ids = self.text_ids()
        for chunk in chunks:
            yield from ids.push(chunk)
        yield from ids.end()

    def text_ids(self) -> TextIds:
        """The incremental text front end of one stream of text (push deltas, get ids)."""
        return TextIds(self.tokenizer.encode, StreamingNormalizer() if self.normalize else None)

    def _extract_text_token(self, text: Text) -> tuple[torch.Tensor | Iterator[int], torch.Tensor]:
        """A string gives [1, L] int32 ids; a stream of strings gives an id generator and length 0
        (the official bistream convention)."""
        if isinstance(text, str):
            return _ids(self.tokenizer.encode(text), self.device)
        return self.stream_text_ids(text), torch.tensor([0], dtype=torch.int32, device=self.device)

    # ------------------------------------------------------------------------------ audio

    def extract_spk_embedding(self, wav_16k: torch.Tensor) -> torch.Tensor:
        """campplus speaker embedding -> [1, 192] float32."""
        feat = campplus_input(wav_16k).numpy()  # [1, frames, 80]
        embedding = self.campplus.run(None, {self._campplus_in: feat})[0]
        return torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(1, -1)).to(self.device)

    def extract_speech_token(self, wav_16k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """25 Hz speech tokens -> ([1, N] int32, [1] int32)."""
        n = wav_16k.shape[-1]
        if n > MAX_PROMPT_SECONDS * 16000:
            raise ValueError(
                f"prompt audio is {n / 16000:.1f} s; the speech tokenizer accepts at most {MAX_PROMPT_SECONDS} s"
            )
        mel = whisper_log_mel(wav_16k).unsqueeze(0).numpy()  # [1, 128, frames]
        length = np.array([mel.shape[2]], dtype=np.int32)
        tokens = self.speech_tokenizer.run(None, {self._tokenizer_in[0]: mel, self._tokenizer_in[1]: length})[
            0
        ]
        return _ids(np.asarray(tokens).reshape(-1).astype(np.int64).tolist(), self.device)

    def extract_speech_feat(self, wav_24k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow prompt mel -> ([1, frames, 80] float32, [1] int32)."""
        feat = prompt_mel_24k(wav_24k).unsqueeze(0).to(self.device)
        return feat, torch.tensor([feat.shape[1]], dtype=torch.int32, device=self.device)

    @staticmethod
    def _load_prompt(
        prompt_wav: WavSource | torch.Tensor, resample_rate: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(16 kHz, resample_rate) versions of a prompt: a file/bytes, or a [1, T] tensor at 16 kHz
        (the older official API's prompt_speech_16k)."""
        if isinstance(prompt_wav, torch.Tensor):
            wav_16k = prompt_wav.reshape(1, -1).to(torch.float32).cpu()
            if resample_rate == 16000:
                return wav_16k, wav_16k
            resampled = soxr.resample(wav_16k[0].numpy(), 16000, resample_rate, quality="VHQ")
            return wav_16k, torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32))[None]
        if hasattr(prompt_wav, "read"):
            prompt_wav = prompt_wav.read()
        return load_wav(prompt_wav, 16000), load_wav(prompt_wav, resample_rate)

    # ------------------------------------------------------------------------------ modes

    def prompt_input(
        self,
        mode: str,
        *,
        speaker: str | dict | None = None,
        prompt_wav: WavSource | torch.Tensor | None = None,
        prompt_text: str = "",
        instruct_text: str = "",
        resample_rate: int = 24000,
    ) -> dict:
        """A mode's model input without its text: the one place the modes' rules live (the
        official ``frontend_*`` methods, the Python API and the service's engine all build here).

        The voice is ``speaker`` (an id in spk2info, or an entry already looked up) or
        ``prompt_wav``.  ``sft``: the speaker's embedding alone (a registered zero-shot speaker's
        too, as official).  ``zero_shot``: the speaker's stored prompt, or the prompt audio's with
        ``prompt_text`` (tokenized as given: callers normalise it).  ``cross_lingual``: that prompt
        without the LM's prompt text and speech.  ``instruct2``: the LM's prompt text is
        ``instruct_text`` (raw, ending in ``<|endofprompt|>``), without LM prompt speech; a stored
        speaker's prompt text is replaced by it.  An SFT speaker has only an embedding, so it is
        that in every mode but ``zero_shot``, which needs a prompt."""
        if mode not in PROMPT_MODES:
            raise ValueError(f"mode must be one of {PROMPT_MODES}, got {mode!r}")
        if speaker is not None:
            entry = self._speaker(speaker) if isinstance(speaker, str) else speaker
            name = speaker if isinstance(speaker, str) else "this speaker"
        elif prompt_wav is not None:
            entry = self._prompt_features(prompt_wav, resample_rate)
            if mode == "zero_shot":
                entry["prompt_text"], entry["prompt_text_len"] = _ids(
                    self.tokenizer.encode(prompt_text), self.device
                )
        else:
            raise ValueError(f"{mode} needs a prompt wav or a speaker")
        if mode == "sft" or "flow_prompt_speech_token" not in entry:
            if mode == "zero_shot":
                raise ValueError(f"{name!r} is an SFT speaker, not a zero-shot prompt")
            # an SFT speaker stores 'embedding'; a zero-shot prompt 'flow_embedding'
            embedding = entry["embedding"] if "embedding" in entry else entry["flow_embedding"]
            model_input = {"llm_embedding": embedding, "flow_embedding": embedding}
        else:
            model_input = {k: v for k, v in entry.items() if k not in ("text", "text_len")}
        if mode == "cross_lingual":
            for key in LM_PROMPT_TEXT + LM_PROMPT_SPEECH:
                model_input.pop(key, None)
        elif mode == "instruct2":
            for key in LM_PROMPT_SPEECH:
                model_input.pop(key, None)
            model_input["prompt_text"], model_input["prompt_text_len"] = _ids(
                self.tokenizer.encode(instruct_text), self.device
            )
        return model_input

    def frontend_sft(self, tts_text: Text, spk_id: str) -> dict:
        return self._with_text(tts_text, self.prompt_input("sft", speaker=spk_id))

    def frontend_zero_shot(
        self,
        tts_text: Text,
        prompt_text: str,
        prompt_wav: WavSource | torch.Tensor | None,
        resample_rate: int = 24000,
        zero_shot_spk_id: str = "",
    ) -> dict:
        """prompt_text is used as given (the API normalises it, without splitting)."""
        return self._with_text(
            tts_text,
            self.prompt_input(
                "zero_shot",
                speaker=zero_shot_spk_id or None,
                prompt_wav=prompt_wav,
                prompt_text=prompt_text,
                resample_rate=resample_rate,
            ),
        )

    def frontend_cross_lingual(
        self, tts_text: Text, prompt_wav: WavSource | torch.Tensor | None, resample_rate: int = 24000,
        zero_shot_spk_id: str = "",
    ) -> dict:  # fmt: skip
        return self._with_text(
            tts_text,
            self.prompt_input(
                "cross_lingual",
                speaker=zero_shot_spk_id or None,
                prompt_wav=prompt_wav,
                resample_rate=resample_rate,
            ),
        )

    def frontend_instruct2(
        self, tts_text: Text, instruct_text: str, prompt_wav: WavSource | torch.Tensor | None,
        resample_rate: int = 24000, zero_shot_spk_id: str = "",
    ) -> dict:  # fmt: skip
        """instruct_text is the LM prompt text, raw; it must end with <|endofprompt|>."""
        return self._with_text(
            tts_text,
            self.prompt_input(
                "instruct2",
                speaker=zero_shot_spk_id or None,
                prompt_wav=prompt_wav,
                instruct_text=instruct_text,
                resample_rate=resample_rate,
            ),
        )

    def _with_text(self, tts_text: Text, model_input: dict) -> dict:
        model_input["text"], model_input["text_len"] = self._extract_text_token(tts_text)
        return model_input

    def frontend_vc(
        self,
        source_wav: WavSource | torch.Tensor,
        prompt_wav: WavSource | torch.Tensor,
        resample_rate: int = 24000,
    ) -> dict:
        """Voice conversion: no LM, the flow re-voices the source's speech tokens. Not trimmed."""
        prompt_16k, prompt_resampled = self._load_prompt(prompt_wav, resample_rate)
        prompt_token, prompt_token_len = self.extract_speech_token(prompt_16k)
        prompt_feat, prompt_feat_len = self.extract_speech_feat(prompt_resampled)
        embedding = self.extract_spk_embedding(prompt_16k)
        source_16k, _ = self._load_prompt(source_wav, 16000)
        source_token, source_token_len = self.extract_speech_token(source_16k)
        return {
            "source_speech_token": source_token,
            "source_speech_token_len": source_token_len,
            "flow_prompt_speech_token": prompt_token,
            "flow_prompt_speech_token_len": prompt_token_len,
            "prompt_speech_feat": prompt_feat,
            "prompt_speech_feat_len": prompt_feat_len,
            "flow_embedding": embedding,
        }

    # ------------------------------------------------------------------------------ helpers

    def _speaker(self, spk_id: str) -> dict:
        if spk_id not in self.spk2info:
            raise KeyError(f"unknown speaker {spk_id!r}; available: {sorted(self.spk2info)}")
        return self.spk2info[spk_id]

    def _prompt_features(self, prompt_wav: WavSource | torch.Tensor, resample_rate: int) -> dict:
        wav_16k, wav_resampled = self._load_prompt(prompt_wav, resample_rate)
        feat, feat_len = self.extract_speech_feat(wav_resampled)
        token, token_len = self.extract_speech_token(wav_16k)
        if resample_rate == 24000:  # CosyVoice2: mel frames = 2 x tokens
            feat, token = align_prompt(feat, token)
            feat_len = torch.tensor([feat.shape[1]], dtype=torch.int32, device=self.device)
            token_len = torch.tensor([token.shape[1]], dtype=torch.int32, device=self.device)
        embedding = self.extract_spk_embedding(wav_16k)
        return {
            "llm_prompt_speech_token": token,
            "llm_prompt_speech_token_len": token_len,
            "flow_prompt_speech_token": token,
            "flow_prompt_speech_token_len": token_len,
            "prompt_speech_feat": feat,
            "prompt_speech_feat_len": feat_len,
            "llm_embedding": embedding,
            "flow_embedding": embedding,
        }
