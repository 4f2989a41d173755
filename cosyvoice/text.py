"""Text side of the CosyVoice2 frontend: the Qwen2 tokenizer with CosyVoice2's specials, text
normalisation (whole text and incremental, for bistream) and paragraph splitting.

Normalisation is the service's one text front end (:mod:`realtime.text.frontend`, shared with the
default voice and every route): Chinese read by wetext plus our fixes and the official post-rules,
English by our rules, markdown, HTML and emoji stripped, CosyVoice2's special tags kept. Unlike the
official code, which skips normalisation for streamed text, we normalise streamed LLM deltas too,
and the front end guarantees that the streamed result equals the whole-text one however the text
was chunked (it is defined piecewise, at safe boundaries).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path

from realtime.text import chinese
from realtime.text.frontend import Incremental, contains_chinese, is_cut, normalize

__all__ = [
    "ADDITIONAL_SPECIAL_TOKENS",
    "ENDOFPROMPT",
    "ENDOFTEXT",
    "LANGUAGES",
    "CosyVoice2Tokenizer",
    "StreamingNormalizer",
    "build_tiny_blank_en",
    "contains_chinese",
    "is_cut",
    "is_only_punctuation",
    "normalize_text",
    "split_paragraph",
    "text_normalize",
    "warmup",
]

# CosyVoice2Tokenizer's additional special tokens, in the official order (FACTS §9).
ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
]  # fmt: skip
ENDOFTEXT = "<|endoftext|>"
ENDOFPROMPT = "<|endofprompt|>"


class CosyVoice2Tokenizer:
    """`CosyVoice-BlankEN` (a Qwen2 tokenizer) with CosyVoice2's special tokens added.

    encode adds no BOS/EOS and turns every special token in the text into its single id.
    """

    def __init__(self, blank_en_dir: str | Path, skip_special_tokens: bool = True):
        from transformers import AutoTokenizer

        path = Path(blank_en_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.add_special_tokens(
            {
                "eos_token": ENDOFTEXT,
                "pad_token": ENDOFTEXT,
                "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
            }
        )
        self.skip_special_tokens = skip_special_tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer([text])["input_ids"][0])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise KeyError(token)
        return int(ids[0])

    def __len__(self) -> int:
        return len(self.tokenizer)


# Qwen2's pre-tokenisation: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a small test of the speech synthesis system.",
    "We speak English and Chinese; numbers like one two three are spelled out.",
    "今天天气很好，我们去公园散步吧。你好，世界！欢迎使用语音合成。",
    "一二三四五六七八九十百千万亿，点，负，百分之。",
    "What time is it? It is three thirty in the afternoon!",
]


def build_tiny_blank_en(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Write a small Qwen2-style byte-level BPE tokenizer that AutoTokenizer loads like BlankEN.

    Trained on a fixed tiny corpus (deterministic), so every byte still encodes; the specials
    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` follow the learned vocabulary as in Qwen2, and
    CosyVoice2Tokenizer's additions come after them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tok.add_special_tokens([ENDOFTEXT, "<|im_start|>", "<|im_end|>"])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------------------------------
# Normalisation: the service's one text front end (realtime.text), read as CosyVoice2 reads

# The languages CosyVoice2 speaks (its README: Chinese, English, Japanese, Korean and Chinese
# dialects, Cantonese among them); letters of other scripts are not sent to the LM.
LANGUAGES = ("zh", "en", "ja", "ko", "yue")

# special tokens are said verbatim: the LM knows them ([laughter], <strong>, <|endofprompt|>)
_SPECIAL = re.compile(
    r"<\|[^|<>\s]*\|>|" + "|".join(re.escape(t) for t in ADDITIONAL_SPECIAL_TOKENS if not t.startswith("<|"))
)


def is_only_punctuation(text: str) -> bool:
    """True for text made only of punctuation, symbols and spaces (such a segment is not spoken)."""
    return all(unicodedata.category(c)[0] in "PSZ" for c in text)


def warmup() -> None:
    """Load the wetext graph now (about a second) rather than on the first request."""
    chinese.warmup()


def normalize_text(text: str) -> str:
    """Whole-text normalisation: what a StreamingNormalizer releases for the same text."""
    return normalize(text, "zh", keep=_SPECIAL.pattern, speaks=LANGUAGES)


class StreamingNormalizer:
    """Normalises LLM text deltas as they arrive, for bistream: the front end's
    :class:`~realtime.text.frontend.Incremental` with CosyVoice2's reading.

    push returns the normalised text that can no longer change; the tail that could still change
    (an unfinished number, word, markdown marker or special tag) is held back until the next safe
    boundary or flush.  The concatenation of all outputs equals normalize_text of the whole text,
    however the text was chunked.
    """

    def __init__(self) -> None:
        self._front = Incremental("zh", keep=_SPECIAL.pattern, speaks=LANGUAGES)

    def push(self, delta: str) -> str:
        try:
            return "".join(s.spoken for s in self._front.push(delta))
        except RuntimeError:
            raise RuntimeError("StreamingNormalizer already flushed") from None

    def flush(self) -> str:
        return "".join(s.spoken for s in self._front.flush())

    @property
    def pending(self) -> str:
        """Raw text received but not yet released."""
        return self._front.pending


# ---------------------------------------------------------------------------------------------------
# Whole-text frontend: normalise, then split into segments of ~60-80 tokens


def split_paragraph(
    text: str,
    tokenize: Callable[[str], list[int]],
    lang: str = "zh",
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
) -> list[str]:
    """Cut at sentence punctuation, then greedily merge sentences into segments.

    A segment is closed when adding the next sentence would pass token_max_n and it already has
    more than token_min_n; a last segment shorter than merge_len joins the previous one. Chinese
    text is measured in characters, English in tokens, as the official frontend does.
    """
    if not text:
        return []
    if lang == "zh":
        length = len
        marks = set("。？！；：、.?!;")
    else:

        def length(s: str) -> int:
            return len(tokenize(s))

        marks = set(".?!;:")
    if comma_split:
        marks |= {"，", ","}
    if text[-1] not in marks:
        text += "。" if lang == "zh" else "."

    sentences: list[str] = []
    start = 0
    i = 0
    while i < len(text):
        # a full stop straight before a letter is inside a token the front end wrote ("p.m.",
        # "U.S."), not a sentence end: a segment must not end between "p." and "m."
        if text[i] in marks and not (text[i] == "." and text[i + 1 : i + 2].isalpha()):
            end = i + 1
            if end < len(text) and text[end] in '"”':  # keep a closing quote with its sentence
                end += 1
            if i > start:
                sentences.append(text[start:end])
            elif sentences:
                sentences[-1] += text[start:end]
            start = end
            i = end
            continue
        i += 1

    segments: list[str] = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            segments.append(current)
            current = ""
        current += sentence
    if current:
        if segments and length(current) < merge_len:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


def text_normalize(
    text: str, tokenize: Callable[[str], list[int]], split: bool = True, enabled: bool = True
) -> list[str] | str:
    """The official whole-text rules: skip normalisation for text holding `<|...|>` specials
    (instruct prompts), else normalise and split into segments, dropping punctuation-only ones."""
    if not enabled or not text or ("<|" in text and "|>" in text):
        return [text] if split else text
    text = normalize_text(text.strip())
    if not split:
        return text
    lang = "zh" if contains_chinese(text) else "en"
    segments = split_paragraph(text, tokenize, lang, token_max_n=80, token_min_n=60, merge_len=20)
    return [s for s in segments if not is_only_punctuation(s)]
