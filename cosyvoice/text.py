"""Text side of the CosyVoice2 frontend: the Qwen2 tokenizer with CosyVoice2's specials, text
normalisation (whole text and incremental, for bistream) and paragraph splitting.

Normalisation uses `wetext` (WeTextProcessing's runtime, whose FST graphs ship inside the wheel, so
nothing is downloaded at run time) plus the post-rules the official frontend applies. Unlike the
official code, which skips normalisation for streamed text, we normalise streamed LLM deltas too.
To make streaming and whole-text normalisation agree exactly, both are defined piecewise: the text
is cut at "safe boundaries" (whitespace between plain words, after Chinese punctuation, between
runs of Chinese characters) that never fall inside anything the normaliser rewrites (numbers,
dates, units, markdown, special tags), and each piece is normalised on its own. A cut is decided
only by the characters before it and the one character after it, so a streaming normaliser can
release a piece as soon as the next character arrives, and the result cannot depend on how the
text was chunked.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

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
# Character classes


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"


def contains_chinese(text: str) -> bool:
    return any(_is_cjk(c) for c in text)


def is_only_punctuation(text: str) -> bool:
    """True for text made only of punctuation, symbols and spaces (such a segment is not spoken)."""
    return all(unicodedata.category(c)[0] in "PSZ" for c in text)


_CJK_PUNCT = "，。！？；：、"
# a plain word, optionally followed by closing punctuation that never takes part in a rewrite
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*[,;:!?\"')]*")
_SPECIAL = re.compile(
    r"<\|[^|<>\s]*\|>|" + "|".join(re.escape(t) for t in ADDITIONAL_SPECIAL_TOKENS if not t.startswith("<|"))
)


def _starts_piece(c: str) -> bool:
    return _is_cjk(c) or (c.isascii() and c.isalpha())


def is_cut(text: str, i: int) -> bool:
    """Whether text may be cut before index i: a safe boundary for piecewise normalisation.

    Depends on text[:i + 1] only (and only on a bounded stretch of it), which is what makes the
    streaming normaliser chunking-invariant.
    """
    if i <= 0 or i >= len(text) or text[i].isspace() or not _starts_piece(text[i]):
        return False
    j = i
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if j == 0:
        return False
    if j < i:  # whitespace run text[j:i]
        k = j
        while k > 0 and not text[k - 1].isspace():
            k -= 1
        token = text[k:j]
        if _is_cjk(token[-1]) or token[-1] in _CJK_PUNCT:
            return True
        if _PLAIN_WORD.fullmatch(token) is None:
            return False
        # the word before must be plain too: rewrites such as "221 Baker Street" read two words on
        while k > 0 and text[k - 1].isspace():
            k -= 1
        m = k
        while m > 0 and not text[m - 1].isspace():
            m -= 1
        previous = text[m:k]
        return not previous or _PLAIN_WORD.fullmatch(previous) is not None or _is_cjk(previous[-1])
    prev = text[i - 1]
    before = text[i - 2] if i >= 2 else ""
    if prev in _CJK_PUNCT:
        return not before.isdigit()
    return _is_cjk(prev) and _is_cjk(text[i]) and (before == "" or _is_cjk(before) or before in _CJK_PUNCT)


# ---------------------------------------------------------------------------------------------------
# Piece normalisation

_MD_LINE_START = re.compile(r"^[ \t]*(?:#{1,6}[ \t]+|[-*+][ \t]+|>[ \t]*)")
_MD_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")


def strip_markdown(text: str, line_start: bool) -> str:
    """Remove markdown that should not be read aloud: headings, bullets, quotes, emphasis, code
    ticks, link targets. Special tags like [laughter] are kept."""
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines):
        if n > 0 or line_start:
            line = _MD_LINE_START.sub("", line)
        out.append(line)
    text = "\n".join(out)
    text = _MD_LINK_TARGET.sub("", text)
    parts = _SPECIAL.split(text)
    specials = _SPECIAL.findall(text)
    cleaned = []
    for part in parts:
        part = re.sub(r"(?<!\d)\*|\*(?!\d)", "", part)  # emphasis, but keep 3*4
        part = re.sub(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])", "", part)  # _emphasis_, __strong__
        part = part.replace("`", "").replace("~~", "")
        part = part.replace("[", "").replace("]", "")
        cleaned.append(part)
    result = cleaned[0]
    for special, part in zip(specials, cleaned[1:], strict=True):
        result += special + part
    return result


@lru_cache(maxsize=2)
def _wetext(lang: str):
    from wetext import Normalizer

    return Normalizer(lang=lang, operator="tn", remove_erhua=False)


def warmup() -> None:
    """Load the wetext graphs now (about a second) rather than on the first request."""
    _wetext_normalize("1", "en")
    _wetext_normalize("1", "zh")


@lru_cache(maxsize=4096)
def _wetext_normalize(text: str, lang: str) -> str:
    try:
        return _wetext(lang).normalize(text)
    except Exception:  # wetext asserts on some inputs; unnormalised text is still speakable
        return text


def _keep_space(left: str, right: str) -> bool:
    """A space survives only between two ASCII characters (the official replace_blank rule)."""
    return bool(left) and bool(right) and left.isascii() and right.isascii()


def _squeeze_blanks(text: str) -> str:
    out = []
    for i, c in enumerate(text):
        if c.isspace():
            left = text[i - 1] if i > 0 else ""
            right = text[i + 1] if i + 1 < len(text) else ""
            if _keep_space(left, right) and not left.isspace():
                out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def _zh_post(text: str) -> str:
    text = text.replace("\n", "")
    text = _squeeze_blanks(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。").replace(" - ", "，")
    for c in "（）【】`":
        text = text.replace(c, "")
    return text.replace("——", "，")


def _normalize_core(core: str, line_start: bool) -> str:
    """Normalise one piece without its trailing whitespace."""
    text = strip_markdown(core, line_start)
    zh = contains_chinese(text)
    parts = _SPECIAL.split(text)
    specials = _SPECIAL.findall(text)
    out = []
    for n, part in enumerate(parts):
        if n > 0:
            out.append(specials[n - 1])
        squeezed = re.sub(r"\s+", " ", part)
        body = squeezed.strip()
        if not body:
            out.append(" " if squeezed and not zh and 0 < n < len(parts) - 1 else "")
            continue
        lead = " " if squeezed[0] == " " and n > 0 and not zh else ""
        tail = " " if squeezed[-1] == " " and n < len(parts) - 1 and not zh else ""
        normed = _wetext_normalize(body, "zh" if zh else "en")
        out.append(lead + (_zh_post(normed) if zh else normed) + tail)
    return "".join(out)


_END_COMMAS = re.compile(r"[，,、]+$")


def _normalize_piece(text: str, start: int, end: int, final: bool) -> str:
    piece = text[start:end]
    if start == 0:
        piece = piece.lstrip()
    core = piece.rstrip()
    if not core:
        return ""
    k = start
    while k > 0 and text[k - 1].isspace():
        k -= 1
    line_start = k == 0 or "\n" in text[k:start]
    out = _normalize_core(core, line_start)
    if final:
        if contains_chinese(out):
            out = _END_COMMAS.sub("。", out)
        return out
    if len(core) < len(piece) and out and _keep_space(out[-1], text[end]):
        out += " "
    return out


def normalize_text(text: str) -> str:
    """Whole-text normalisation: the same pieces a StreamingNormalizer would release."""
    out = []
    start = 0
    for i in range(1, len(text)):
        if is_cut(text, i):
            out.append(_normalize_piece(text, start, i, final=False))
            start = i
    out.append(_normalize_piece(text, start, len(text), final=True))
    return "".join(out)


class StreamingNormalizer:
    """Normalises LLM text deltas as they arrive, for bistream.

    push returns the normalised text that can no longer change (everything before the last safe
    boundary seen); the tail that could still change (an unfinished number, word, markdown marker
    or special tag) is held back until the next boundary or flush. The concatenation of all
    outputs equals normalize_text of the whole text, however the text was chunked.
    """

    def __init__(self) -> None:
        self._text = ""
        self._start = 0  # start of the unreleased piece
        self._scanned = 1  # next index to test as a cut
        self._closed = False

    def push(self, delta: str) -> str:
        if self._closed:
            raise RuntimeError("StreamingNormalizer already flushed")
        self._text += delta
        out = []
        for i in range(max(self._scanned, self._start + 1), len(self._text)):
            if is_cut(self._text, i):
                out.append(_normalize_piece(self._text, self._start, i, final=False))
                self._start = i
        self._scanned = max(len(self._text), 1)
        return "".join(out)

    def flush(self) -> str:
        if self._closed:
            return ""
        self._closed = True
        return _normalize_piece(self._text, self._start, len(self._text), final=True)

    @property
    def pending(self) -> str:
        """Raw text received but not yet released."""
        return "" if self._closed else self._text[self._start :]


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
        if text[i] in marks:
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
