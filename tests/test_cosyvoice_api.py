"""The user-facing CosyVoice2 API on a TINY random-weight model directory: every mode, streaming and
not, text generators (bistream), stored speakers, per-request isolation, cancellation and the
token cap.  The audio is noise, so the checks are about lengths (960 samples per speech token),
determinism and state, not sound."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyvoice import CosyVoice2
from cosyvoice.model import SAMPLES_PER_TOKEN, TokenCap
from cosyvoice.tiny import SFT_SPEAKERS, prompt_wav, write_model_dir

torch.set_num_threads(1)
EN, ZH = SFT_SPEAKERS[1], SFT_SPEAKERS[0]


def audio(outputs) -> np.ndarray:
    chunks = [o["tts_speech"] for o in outputs]
    for c in chunks:
        assert c.dtype == torch.float32 and c.dim() == 2 and c.shape[0] == 1
    return np.concatenate([c[0].numpy() for c in chunks]) if chunks else np.zeros(0, np.float32)


def words(text: str):
    for w in text.split(" "):
        yield w + " "


def never_eos(logp, decoded):
    return 100 + len(decoded) % 50


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    root = write_model_dir(tmp_path_factory.mktemp("api") / "tiny")
    return CosyVoice2(root, load_jit=True, load_trt=True)  # accepted and ignored, as documented


def assert_same_speech(got: np.ndarray, alone: np.ndarray) -> None:
    """Audio of a request that shared batched steps with others against the same request alone.
    The tokens are the same and every mel within 1e-4 (tests/test_lm_stage.py, test_token2wav.py),
    but the TINY vocoder's f0 predictor (weights x250) turns that float round-off into phase
    drift of up to ~1e-2: the same speech, not the same floats.  Another request's audio, or a
    mix-up, is as loud as the signal itself."""
    assert got.shape == alone.shape
    assert np.sqrt(np.mean((got - alone) ** 2)) <= 0.1 * np.sqrt(np.mean(alone**2))


def all_caches_free(cv) -> bool:
    """Every KV slot of the LM stage is back in its pool and every token2wav stream is freed (a
    request's slot is released when it is cancelled, or after the step it is in; its token2wav
    caches before the stage's next chunk)."""
    stage = cv.model.lm_stage
    deadline = time.monotonic() + 5
    while (
        stage.free_slots != stage.pool.slots or cv.model.token2wav.active_streams()
    ) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stage.free_slots == stage.pool.slots and not cv.model.token2wav.active_streams()


def test_api_surface(cv):
    assert cv.sample_rate == 24000
    assert cv.list_available_spks() == [ZH, EN]
    with pytest.raises(KeyError):
        list(cv.inference_sft("Hello.", "nobody"))
    with pytest.raises(TypeError):
        list(cv.inference_sft("Hello.", EN, bogus=1))
    with pytest.raises(NotImplementedError, match="instruct2"):
        list(cv.inference_instruct("Hello.", EN, "Speak slowly."))


def test_sft_stream_and_whole_give_the_same_tokens(cv):
    whole = [o["tts_speech"] for o in cv.inference_sft("Hello world, this is a test.", EN, seed=3)]
    assert len(whole) == 1  # one segment -> one dict
    x = whole[0][0].numpy()
    assert len(x) % SAMPLES_PER_TOKEN == 0 and len(x) > 0
    assert np.isfinite(x).all() and np.abs(x).max() <= 0.99 + 1e-6
    chunks = [
        o["tts_speech"] for o in cv.inference_sft("Hello world, this is a test.", EN, stream=True, seed=3)
    ]
    streamed = np.concatenate([c[0].numpy() for c in chunks])
    assert len(streamed) == len(x)  # same LM tokens with the same seed; 960 samples per token
    again = audio(cv.inference_sft("Hello world, this is a test.", EN, seed=3))
    assert np.array_equal(again, x)  # seeded requests are reproducible


def test_speed_stretches_the_whole_utterance_and_is_refused_when_streaming(cv):
    one = audio(cv.inference_sft("Hello world.", EN, seed=5))
    fast = audio(cv.inference_sft("Hello world.", EN, seed=5, speed=2.0))
    n_frames = len(one) // 480
    assert len(fast) == int(n_frames / 2.0) * 480
    with pytest.raises(ValueError, match="stream=False"):
        list(cv.inference_sft("Hello world.", EN, stream=True, speed=1.5))


def test_long_text_is_split_into_segments_each_its_own_request(cv):
    text = " ".join(["This is sentence number one of a rather long paragraph of text."] * 8)
    outs = [o["tts_speech"] for o in cv.inference_sft(text, EN, max_tokens=5, seed=1)]
    assert len(outs) == len(cv.frontend.text_normalize(text, split=True)) > 1
    assert all(o.shape[1] == 5 * SAMPLES_PER_TOKEN for o in outs)


def test_text_generator_is_bistream_and_starts_before_the_text_ends(cv):
    consumed = []

    def chunks():  # an LLM's pace: the model works while the text is still being written
        for i, w in enumerate(
            words("Hello world, this is a small streaming test of the speech model today ok")
        ):
            consumed.append(i)
            time.sleep(0.15)
            yield w

    got_first_at = None
    total = 0
    for out in cv.inference_sft_chunked(chunks(), EN, seed=4):
        if got_first_at is None:
            got_first_at = len(consumed)
        total += out["tts_speech"].shape[1]
    assert got_first_at is not None and got_first_at < len(consumed)  # audio before the last chunk
    assert total % SAMPLES_PER_TOKEN == 0
    same = audio(
        cv.inference_sft(
            words("Hello world, this is a small streaming test of the speech model today ok"),
            EN,
            stream=True,
            seed=4,
        )
    )
    assert len(same) == total  # a generator in inference_sft is the same bistream request


def test_zero_shot_cross_lingual_instruct2_and_stored_speaker(cv):
    wav = prompt_wav()
    zs = audio(cv.inference_zero_shot("Hello there.", "A prompt sentence.", wav, seed=9))
    assert len(zs) % SAMPLES_PER_TOKEN == 0 and len(zs) > 0
    assert cv.add_zero_shot_spk("A prompt sentence.", wav, "my_voice") is True
    assert "my_voice" in cv.list_available_spks()
    stored = audio(cv.inference_zero_shot("Hello there.", "", None, zero_shot_spk_id="my_voice", seed=9))
    assert np.array_equal(stored, zs)  # the stored prompt is exactly the analysed one
    streamed = audio(
        cv.inference_zero_shot(
            words("Hello there, how are you"), "A prompt sentence.", wav, stream=True, seed=2
        )
    )
    assert len(streamed) % SAMPLES_PER_TOKEN == 0 and len(streamed) > 0
    cross = audio(cv.inference_cross_lingual("Hello there.", wav, seed=9))
    assert len(cross) % SAMPLES_PER_TOKEN == 0 and len(cross) > 0
    cross_stored = audio(
        cv.inference_cross_lingual("Hello there.", None, zero_shot_spk_id="my_voice", seed=9)
    )
    assert np.array_equal(cross_stored, cross)
    instruct = audio(cv.inference_instruct2("Hello there.", "Speak slowly.", wav, stream=True, seed=9))
    assert len(instruct) % SAMPLES_PER_TOKEN == 0 and len(instruct) > 0
    with pytest.raises(ValueError, match="SFT speaker"):
        list(cv.inference_zero_shot("Hi.", "", None, zero_shot_spk_id=EN))
    with pytest.raises(ValueError, match="prompt_wav"):
        list(cv.inference_cross_lingual("Hi.", None))


def test_vc_gives_960_samples_per_source_token(cv):
    source = prompt_wav(1.0, seed=1)
    whole = audio(cv.inference_vc(source, prompt_wav(), seed=1))
    n_tokens = cv.frontend.extract_speech_token(
        torch.from_numpy(sf.read(io.BytesIO(source), dtype="float32")[0])[None]
    )[0].shape[1]
    assert len(whole) == n_tokens * SAMPLES_PER_TOKEN
    streamed = audio(cv.inference_vc(source, prompt_wav(), stream=True, seed=1))
    assert len(streamed) == len(whole)


def test_save_spkinfo_round_trip_and_atomic_on_crash(cv, monkeypatch):
    cv.add_zero_shot_spk("Another prompt.", prompt_wav(seed=3), "saved_voice")
    path = cv.save_spkinfo()
    stored = torch.load(path, weights_only=True)
    assert "saved_voice" in stored and set(SFT_SPEAKERS) <= set(stored)
    entry = stored["saved_voice"]
    assert entry["flow_prompt_speech_token"].shape[1] * 2 == entry["prompt_speech_feat"].shape[1]
    assert entry["flow_embedding"].shape == (1, 192) and "text" not in entry
    before = path.read_bytes()

    cv.add_zero_shot_spk("Third prompt.", prompt_wav(seed=4), "crash_voice")

    def crashing_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="mid-write"):
        cv.save_spkinfo()
    assert path.read_bytes() == before  # the old file is intact
    assert [p for p in os.listdir(path.parent) if p.startswith(".spk2info")] == []  # no temp left behind


def test_concurrent_requests_get_exactly_their_solo_audio(cv):
    jobs = {"a": ("Hello world, first request.", EN, 11), "b": ("Another request here ok.", ZH, 12)}
    solo = {
        k: [o["tts_speech"][0].numpy() for o in cv.inference_sft(t, s, stream=True, seed=seed)]
        for k, (t, s, seed) in jobs.items()
    }
    results: dict[str, list] = {}
    barrier = threading.Barrier(2)

    def run(key):
        text, spk, seed = jobs[key]
        barrier.wait()
        results[key] = [
            o["tts_speech"][0].numpy() for o in cv.inference_sft(text, spk, stream=True, seed=seed)
        ]

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for key in jobs:
        assert [len(a) for a in results[key]] == [len(b) for b in solo[key]], key
        assert_same_speech(np.concatenate(results[key]), np.concatenate(solo[key]))
    assert all_caches_free(cv)


def test_every_streaming_request_starts_at_the_first_hop(cv):
    """The official model doubles a shared token_hop_len and never resets it (second request: 100)."""

    def sizes(max_tokens=80, **kw):
        # unistream also stops at 20 x the text tokens (official): the text must allow 80 tokens
        return [
            o["tts_speech"].shape[1]
            for o in cv.inference_sft(
                "Hello world, this is a test.",
                EN,
                stream=True,
                sampler=never_eos,
                max_tokens=max_tokens,
                seed=1,
                **kw,
            )
        ]

    first, second = sizes(), sizes()
    hold = 3840  # the vocoder keeps the last 3840 samples of a chunk for the cross-fade
    assert first == second
    assert first[:2] == [25 * SAMPLES_PER_TOKEN - hold, 50 * SAMPLES_PER_TOKEN]
    assert sum(first) == 80 * SAMPLES_PER_TOKEN
    hop50 = sizes(token_hop_len=50)
    assert hop50[0] == 50 * SAMPLES_PER_TOKEN - hold and sum(hop50) == 80 * SAMPLES_PER_TOKEN
    odd = sizes(40, token_hop_len=10)  # not a whole flow chunk: the recomputing loop, same lengths
    assert (
        odd[:2] == [10 * SAMPLES_PER_TOKEN - hold, 20 * SAMPLES_PER_TOKEN]
        and sum(odd) == 40 * SAMPLES_PER_TOKEN
    )
    with pytest.raises(ValueError, match="mel_cache_len"):
        list(cv.inference_sft_chunked(["Hi."], EN, mel_cache_len=4))


def test_stop_mid_lm_frees_every_cache(cv):
    stop = threading.Event()
    steps = []

    def sampler(logp, decoded):
        steps.append(len(decoded))
        if len(decoded) == 10:
            stop.set()
        return never_eos(logp, decoded)

    out = audio(cv.inference_sft("Hello world.", EN, stream=True, sampler=sampler, should_stop=stop, seed=1))
    assert len(out) == 0  # stopped before the first hop: no audio at all
    assert max(steps) == 10  # no LM step after the stop was seen
    assert all_caches_free(cv)


def test_stop_mid_flow_and_early_close_free_every_cache(cv):
    stop = threading.Event()
    got = []
    for out in cv.inference_sft(
        "Hi.", EN, stream=True, sampler=never_eos, max_tokens=200, should_stop=stop, seed=1
    ):
        got.append(out["tts_speech"].shape[1])
        stop.set()  # the consumer stops after the first chunk: no further flow chunk runs
    assert got == [25 * SAMPLES_PER_TOKEN - 3840]
    assert all_caches_free(cv)

    gen = cv.inference_sft("Hi.", EN, stream=True, sampler=never_eos, max_tokens=200, seed=1)
    next(gen)
    assert len(cv.model.token2wav.active_streams()) == 1
    gen.close()  # the caller walks away mid-stream
    assert all_caches_free(cv)


def test_token_cap_stops_a_runaway_lm(cv, monkeypatch):
    monkeypatch.setattr(cv.model, "cap", TokenCap(ratio=4, floor=10))
    text = "Hello world, this is it."
    n_text = len(cv.frontend.tokenizer.encode(cv.frontend.text_normalize(text, split=False)))
    uni = audio(cv.inference_sft(text, EN, sampler=never_eos, seed=1))
    assert len(uni) == max(10, 4 * n_text) * SAMPLES_PER_TOKEN
    n_stream = len(list(cv.frontend.stream_text_ids(words(text))))
    bi = audio(cv.inference_sft(words(text), EN, sampler=never_eos, seed=1))
    assert len(bi) == max(10, 4 * n_stream) * SAMPLES_PER_TOKEN  # the bistream end phase is capped too
    capped = audio(cv.inference_sft(words(text), EN, sampler=never_eos, stream=True, max_tokens=30, seed=1))
    assert len(capped) == 30 * SAMPLES_PER_TOKEN
    # text_frontend=False: streamed chunks are tokenized one by one, unnormalised (official behaviour)
    raw = ["It costs 123 ", "dollars."]
    n_raw = sum(len(cv.frontend.tokenizer.encode(c)) for c in raw)
    assert n_raw != len(list(cv.frontend.stream_text_ids(raw)))  # "123" is spelled out when normalised
    plain = audio(cv.inference_sft(iter(raw), EN, sampler=never_eos, text_frontend=False, seed=1))
    assert len(plain) == max(10, 4 * n_raw) * SAMPLES_PER_TOKEN
    chunked = audio(cv.inference_sft_chunked(iter(raw), EN, sampler=never_eos, text_frontend=False, seed=1))
    assert len(chunked) == len(plain)


def test_the_tiny_lm_ends_on_its_own(cv):
    """The generator shapes eos so utterances end well before the cap (see cosyvoice.tiny)."""
    text = "Hello world."
    n_text = len(cv.frontend.tokenizer.encode(text))
    lengths = [len(audio(cv.inference_sft(text, EN, seed=s))) // SAMPLES_PER_TOKEN for s in range(3)]
    assert all(2 * n_text <= n < 20 * n_text for n in lengths), lengths


def test_a_missing_file_is_a_clear_error(tmp_path):
    root = write_model_dir(tmp_path / "broken")
    (root / "flow.pt").unlink()
    with pytest.raises(FileNotFoundError, match="flow.pt"):
        CosyVoice2(root)
