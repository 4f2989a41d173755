"""CosyVoiceFrontEnd on tiny random ONNX stand-ins with the official signatures."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime
import pytest
import soundfile as sf
import torch

from cosyvoice.frontend import CosyVoiceFrontEnd
from cosyvoice.text import CosyVoice2Tokenizer, build_tiny_blank_en, normalize_text
from cosyvoice.tiny_onnx import export_tiny_campplus, export_tiny_speech_tokenizer
from tests.conftest import load_npz

torch.set_num_threads(1)

PROMPT_KEYS = {
    "prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len",
    "flow_prompt_speech_token", "flow_prompt_speech_token_len", "prompt_speech_feat",
    "prompt_speech_feat_len", "llm_embedding", "flow_embedding",
}  # fmt: skip


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return load_npz("frontend.npz")


def token_count(ref) -> int:
    """Speech tokens of the clip: 4 whisper frames (hop 160 at 16 kHz) per 25 Hz token."""
    frames = ref["whisper_log_mel"].shape[1]
    assert frames == len(ref["wav_16k"]) // 160
    return frames // 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_frontend")
    build_tiny_blank_en(root / "CosyVoice-BlankEN")
    export_tiny_campplus(root / "campplus.onnx")
    export_tiny_speech_tokenizer(root / "speech_tokenizer_v2.onnx")
    g = torch.Generator().manual_seed(0)
    spk2info = {
        "alice": {"embedding": torch.randn(1, 192, generator=g)},
        "bob": {"embedding": torch.randn(1, 192, generator=g)},
    }
    torch.save(spk2info, root / "spk2info.pt")
    return root


@pytest.fixture(scope="module")
def frontend(model_dir) -> CosyVoiceFrontEnd:
    return CosyVoiceFrontEnd(
        CosyVoice2Tokenizer(model_dir / "CosyVoice-BlankEN"),
        model_dir / "campplus.onnx",
        model_dir / "speech_tokenizer_v2.onnx",
        model_dir / "spk2info.pt",
        device="cpu",
    )


@pytest.fixture(scope="module")
def prompt_wav_bytes(ref) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, ref["wav_22050_int16"], 22050, subtype="PCM_16", format="WAV")
    return buf.getvalue()


@pytest.mark.parity
def test_speaker_embedding_sees_the_official_fbank(frontend, model_dir, ref):
    ours = frontend.extract_spk_embedding(torch.from_numpy(ref["wav_16k"])[None])
    assert ours.shape == (1, 192) and ours.dtype == torch.float32
    direct = onnxruntime.InferenceSession(str(model_dir / "campplus.onnx")).run(
        None, {"input": ref["campplus_fbank"][None]}
    )[0]
    np.testing.assert_allclose(ours.numpy(), direct, atol=1e-4)


@pytest.mark.parity
def test_speech_tokens_see_the_official_log_mel(frontend, model_dir, ref):
    tokens, length = frontend.extract_speech_token(torch.from_numpy(ref["wav_16k"])[None])
    n = token_count(ref)
    assert tokens.dtype == torch.int32 and tokens.shape == (1, n) and length.tolist() == [n]
    assert 0 <= int(tokens.min()) and int(tokens.max()) <= 6560
    frames = ref["whisper_log_mel"].shape[1]
    direct = onnxruntime.InferenceSession(str(model_dir / "speech_tokenizer_v2.onnx")).run(
        None, {"feats": ref["whisper_log_mel"][None], "feats_length": np.array([frames], np.int32)}
    )[0]
    # tokens are a rounded projection: allow a rare flip from float round-off at a rounding edge
    assert (tokens.numpy() != direct).sum() <= 1


def test_speech_tokenizer_refuses_more_than_30_seconds(frontend):
    with pytest.raises(ValueError, match="30 s"):
        frontend.extract_speech_token(torch.zeros(1, 16000 * 30 + 1))


@pytest.mark.parity
def test_zero_shot_input_is_aligned_and_typed(frontend, prompt_wav_bytes, ref):
    mi = frontend.frontend_zero_shot("Hello there, 2 cats.", "The quick brown fox.", prompt_wav_bytes, 24000)
    assert set(mi) == PROMPT_KEYS | {"text", "text_len"}
    n = int(mi["llm_prompt_speech_token_len"])
    assert (
        mi["llm_prompt_speech_token"].shape == (1, n) and mi["llm_prompt_speech_token"].dtype == torch.int32
    )
    assert torch.equal(mi["flow_prompt_speech_token"], mi["llm_prompt_speech_token"])
    assert mi["prompt_speech_feat"].shape == (1, 2 * n, 80) and int(mi["prompt_speech_feat_len"]) == 2 * n
    assert n == min(ref["prompt_feat"].shape[0] // 2, token_count(ref))
    # the prompt mel comes from soxr-resampled audio: close to the official one, not equal
    assert np.abs(mi["prompt_speech_feat"][0].numpy() - ref["prompt_feat"][: 2 * n]).mean() < 0.05
    assert mi["llm_embedding"].shape == (1, 192) and torch.equal(mi["llm_embedding"], mi["flow_embedding"])
    assert mi["text"].dtype == torch.int32 and mi["text_len"].tolist() == [mi["text"].shape[1]]
    assert frontend.tokenizer.decode(mi["prompt_text"][0].tolist()) == "The quick brown fox."


def test_zero_shot_with_stored_speaker_does_not_touch_the_store(frontend, prompt_wav_bytes):
    entry = frontend.frontend_zero_shot("", "prompt words", prompt_wav_bytes)
    del entry["text"], entry["text_len"]
    frontend.spk2info["carol"] = entry
    try:
        mi = frontend.frontend_zero_shot("Good morning", "", None, zero_shot_spk_id="carol")
        assert torch.equal(mi["prompt_speech_feat"], entry["prompt_speech_feat"])
        cl = frontend.frontend_cross_lingual("Bonjour", None, zero_shot_spk_id="carol")
        assert "llm_prompt_speech_token" not in cl and "prompt_text" not in cl
        assert (
            "llm_prompt_speech_token" in frontend.spk2info["carol"]
            and "text" not in frontend.spk2info["carol"]
        )
        sft = frontend.frontend_sft("Hi", "carol")  # a registered speaker also works for sft
        assert torch.equal(sft["flow_embedding"], entry["flow_embedding"])
    finally:
        del frontend.spk2info["carol"]


def test_sft_uses_the_stored_embedding(frontend):
    mi = frontend.frontend_sft("Hello world", "bob")
    assert set(mi) == {"text", "text_len", "llm_embedding", "flow_embedding"}
    assert torch.equal(mi["flow_embedding"], frontend.spk2info["bob"]["embedding"])
    assert frontend.tokenizer.decode(mi["text"][0].tolist()) == "Hello world"
    with pytest.raises(KeyError, match="unknown speaker"):
        frontend.frontend_sft("Hello", "nobody")


def test_cross_lingual_and_instruct2_drop_the_lm_prompt(frontend, prompt_wav_bytes):
    cl = frontend.frontend_cross_lingual("你好", prompt_wav_bytes)
    assert set(cl) == PROMPT_KEYS - {"prompt_text", "prompt_text_len", "llm_prompt_speech_token",
                                     "llm_prompt_speech_token_len"} | {"text", "text_len"}  # fmt: skip
    instruct = "Speak happily.<|endofprompt|>"
    ins = frontend.frontend_instruct2("Hello", instruct, prompt_wav_bytes)
    assert "llm_prompt_speech_token" not in ins and "flow_prompt_speech_token" in ins
    ids = ins["prompt_text"][0].tolist()
    assert ids[-1] == frontend.tokenizer.token_id("<|endofprompt|>")
    with pytest.raises(ValueError):
        frontend.frontend_zero_shot("x", "y", None)


def test_prompt_input_is_each_modes_rule_for_every_kind_of_voice(frontend, prompt_wav_bytes):
    """The one builder of a mode's prompt: stored zero-shot speaker, SFT speaker and prompt audio,
    in each mode; the official frontend_* methods are it plus the text."""
    entry = frontend.prompt_input("zero_shot", prompt_wav=prompt_wav_bytes, prompt_text="prompt words")
    assert set(entry) == PROMPT_KEYS
    frontend.spk2info["dave"] = entry
    try:
        stored = frontend.prompt_input("zero_shot", speaker="dave", prompt_text="ignored: the stored one")
        assert torch.equal(stored["prompt_text"], entry["prompt_text"])
        instruct = "Whisper.<|endofprompt|>"
        ins = frontend.prompt_input("instruct2", speaker="dave", instruct_text=instruct)
        ids = ins["prompt_text"][0].tolist()  # replaces the stored text
        assert ids == frontend.tokenizer.encode(instruct) and ids[-1] == frontend.tokenizer.token_id(
            "<|endofprompt|>"
        )
        assert "llm_prompt_speech_token" not in ins and torch.equal(
            ins["prompt_speech_feat"], entry["prompt_speech_feat"]
        )
        assert set(frontend.prompt_input("sft", speaker="dave")) == {"llm_embedding", "flow_embedding"}
        official = frontend.frontend_instruct2("Hi", instruct, None, zero_shot_spk_id="dave")
        assert set(official) == set(ins) | {"text", "text_len"}
    finally:
        del frontend.spk2info["dave"]
    # an SFT speaker is its embedding in every mode but zero_shot, which needs a prompt
    for mode in ("sft", "cross_lingual", "instruct2"):
        mi = frontend.prompt_input(mode, speaker="bob", instruct_text="Slowly.<|endofprompt|>")
        assert torch.equal(mi["flow_embedding"], frontend.spk2info["bob"]["embedding"])
        assert "flow_prompt_speech_token" not in mi and ("prompt_text" in mi) == (mode == "instruct2")
    with pytest.raises(ValueError, match="SFT speaker"):
        frontend.prompt_input("zero_shot", speaker="bob")
    with pytest.raises(ValueError, match="mode must be one of"):
        frontend.prompt_input("vc", speaker="bob")
    with pytest.raises(ValueError, match="needs a prompt wav or a speaker"):
        frontend.prompt_input("cross_lingual")


def test_vc_uses_source_tokens_and_untrimmed_prompt(frontend, prompt_wav_bytes, ref):
    source = torch.from_numpy(ref["wav_16k"][:16000])[None]  # a 16 kHz tensor works as input too
    assert source.shape[1] == 16000
    mi = frontend.frontend_vc(source, prompt_wav_bytes, 24000)
    assert set(mi) == {
        "source_speech_token", "source_speech_token_len", "flow_prompt_speech_token",
        "flow_prompt_speech_token_len", "prompt_speech_feat", "prompt_speech_feat_len", "flow_embedding",
    }  # fmt: skip
    assert mi["source_speech_token"].shape == (1, 16000 // 160 // 4)
    assert mi["prompt_speech_feat"].shape == (1, *ref["prompt_feat"].shape)  # not cut to 2 x tokens
    assert mi["flow_prompt_speech_token"].shape == (1, token_count(ref))


def test_streamed_text_ids_match_whole_text_for_english(frontend):
    text = "I have 3 apples and **2** pears, said Dr. Smith today."
    whole = frontend.tokenizer.encode(normalize_text(text))
    for size in (1, 3, 7):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        ids, length = frontend._extract_text_token(iter(chunks))
        assert length.tolist() == [0]
        assert list(ids) == whole


def test_text_normalize_splits_long_text(frontend):
    text = "This is a sentence about 3 things. " * 20
    segments = frontend.text_normalize(text)
    assert len(segments) > 1 and all("3" not in s for s in segments)
    assert frontend.text_normalize(text, text_frontend=False) == [text]
