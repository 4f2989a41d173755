"""The one text front end every voice uses: LLM output in, what the voice says out, with the
source span of every word.

Both engines (the default voice and CosyVoice2) and every route (WebSocket, HTTP, the Python API)
call this module, so the same answer is read the same way whichever voice speaks it.  It strips
what LLM output carries (markdown, code fences, HTML, emoji, list markers, links -> their text)
and reads numbers, money, units, times, dates, phone numbers, ordinals, ranges, math, abbreviations,
URLs and e-mail addresses as words: English with our rules (:mod:`.english`), Chinese with wetext
and our fixes (:mod:`.chinese`).

Incremental by construction: the text is cut at *safe boundaries* (whitespace between plain words,
after Chinese punctuation, between runs of Chinese characters) that never fall inside anything a
rule rewrites, and each piece is read on its own (with the text before it visible as context).  A
cut depends only on the characters before it and the one after it, so :class:`Incremental` can
release a piece as soon as the next character arrives, and the result cannot depend on how the
text was chunked: ``spans(text)`` is by definition what :class:`Incremental` releases for it.

It also knows scripts: :func:`unspeakable` names the runs of text in a script a voice cannot say,
which the reader drops, so the service can warn instead of dropping them in silence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import chinese
from .english import Raw, lex

__all__ = [
    "Span",
    "spans",
    "normalize",
    "Incremental",
    "is_cut",
    "unspeakable",
    "ScriptWatch",
    "script",
    "speakable",
    "contains_chinese",
    "LANGUAGES",
]

LANGUAGES = ("en", "zh")  # the readers; a voice may speak more (it says which in VoiceInfo.languages)


@dataclass(frozen=True)
class Span:
    start: int  # source offset (chars of the text the client sent), inclusive
    end: int  # source offset, exclusive
    spoken: str  # what the voice says for source[start:end] ("" for markup, emoji, etc.)


# -- scripts -------------------------------------------------------------------------------------

# the scripts each language is written in (a letter in any other script is not spoken)
_LANGUAGE_SCRIPTS = {
    "en": {"Latin"},
    "zh": {"Han"},
    "yue": {"Han"},
    "ja": {"Han", "Kana"},
    "ko": {"Hangul", "Han"},
    "ru": {"Cyrillic"},
    "uk": {"Cyrillic"},
    "el": {"Greek"},
    "ar": {"Arabic"},
    "he": {"Hebrew"},
    "hi": {"Devanagari"},
    "th": {"Thai"},
}
_NAMED_SCRIPTS = {
    "LATIN": "Latin",
    "CJK": "Han",
    "HIRAGANA": "Kana",
    "KATAKANA": "Kana",
    "HALFWIDTH": "Kana",  # HALFWIDTH KATAKANA LETTER ...
    "HANGUL": "Hangul",
    "CYRILLIC": "Cyrillic",
    "GREEK": "Greek",
    "ARABIC": "Arabic",
    "HEBREW": "Hebrew",
    "DEVANAGARI": "Devanagari",
    "THAI": "Thai",
    "BENGALI": "Bengali",
    "TAMIL": "Tamil",
    "TELUGU": "Telugu",
    "GEORGIAN": "Georgian",
    "ARMENIAN": "Armenian",
    "ETHIOPIC": "Ethiopic",
    "KHMER": "Khmer",
    "LAO": "Lao",
    "MYANMAR": "Myanmar",
    "GUJARATI": "Gujarati",
    "GURMUKHI": "Gurmukhi",
    "KANNADA": "Kannada",
    "MALAYALAM": "Malayalam",
    "SINHALA": "Sinhala",
    "TIBETAN": "Tibetan",
}
_SYMBOL_LETTERS = set("πµ")  # letters read as symbols ("pi", micro in "µs"), never skipped


def script(c: str) -> str | None:
    """The script of a letter ("Latin", "Han", "Kana", "Hangul", "Cyrillic", ...), None for
    anything else (digits, punctuation, symbols, letters of no script we name)."""
    if c.isascii():
        return "Latin" if c.isalpha() else None
    if not c.isalpha() or c in _SYMBOL_LETTERS:
        return None
    if _is_cjk(c):
        return "Han"
    return _NAMED_SCRIPTS.get(unicodedata.name(c, "").split(" ", 1)[0])


def speakable(languages: Iterable[str]) -> Callable[[str], bool]:
    """Whether a character can be said by a voice speaking ``languages``."""
    scripts = set().union(*(_LANGUAGE_SCRIPTS.get(lang.split("-")[0].lower(), set()) for lang in languages))
    return lambda c: script(c) in scripts or script(c) is None


def unspeakable(text: str, languages: Iterable[str]) -> list[str]:
    """The runs of ``text`` written in a script none of ``languages`` is written in, in order: what
    a voice speaking ``languages`` skips.  A run spans punctuation and spaces between such letters
    and ends at a speakable letter or a digit."""
    can = speakable(languages)
    runs: list[str] = []
    start = last = -1
    for i, c in enumerate(text):
        if script(c) is not None:
            if not can(c):
                if start < 0:
                    start = i
                last = i
                continue
        elif not c.isdigit():
            continue
        if start >= 0:  # a speakable letter or a digit ends the run
            runs.append(text[start : last + 1])
            start = -1
    if start >= 0:
        runs.append(text[start : last + 1])
    return runs


class ScriptWatch:
    """:func:`unspeakable` as text arrives: :meth:`push` returns the runs a delta completed (a
    speakable letter or a digit followed them), :meth:`close` the one still open.  The runs are
    those of the whole text, however it was chunked; ``spoke`` says whether anything speakable
    (a letter of the voice's scripts, or a digit) has come."""

    def __init__(self, languages: Iterable[str]) -> None:
        self.languages = tuple(languages)
        self._can = speakable(self.languages)
        self._run: list[str] = []  # the open run, up to its last unspeakable letter
        self._gap: list[str] = []  # what came after that letter (spaces, punctuation)
        self.spoke = False

    def push(self, delta: str) -> list[str]:
        done: list[str] = []
        for c in delta:
            kind = script(c)
            if kind is not None and not self._can(c):
                self._run += self._gap if self._run else []
                self._run.append(c)
                self._gap = []
            elif kind is not None or c.isdigit():
                self.spoke = True
                done += self.close()
            elif self._run:
                self._gap.append(c)
        return done

    def close(self) -> list[str]:
        """The open run (at a flush or the end: what follows is spoken on its own)."""
        run, self._run, self._gap = "".join(self._run), [], []
        return [run] if run else []


# -- safe boundaries -------------------------------------------------------------------------------


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"


def contains_chinese(text: str) -> bool:
    return any(_is_cjk(c) for c in text)


def _no_space(c: str) -> bool:
    """Characters no space is kept next to: Chinese and Japanese are written without spaces."""
    return _is_cjk(c) or "\u3000" <= c <= "\u30ff" or "\uff00" <= c <= "\uffef"


_CJK_PUNCT = "，。！？；：、"
# a plain word, optionally followed by closing punctuation that never takes part in a rewrite
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*[,;:!?\"')]*")


def _starts_piece(c: str) -> bool:
    return _is_cjk(c) or (c.isascii() and c.isalpha())


def is_cut(text: str, i: int) -> bool:
    """Whether text may be cut before index i: a safe boundary for piecewise reading.

    Depends on text[:i + 1] only (and only on a bounded stretch of it), which is what makes the
    incremental front end chunking-invariant.
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
        # the word before must be plain too: rules such as "221 Baker Street" read two words on
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


# -- reading one piece -----------------------------------------------------------------------------

_PUNCT_FIRST = ".,;:!?)]}…"
_CLAUSE = ",;:"
_END_COMMAS = re.compile(r"[，,、\s]+$")


class _Reader:
    """Reads pieces in order; remembers the last character said, which decides spacing."""

    def __init__(self, language: str, keep: str | None, speaks: Iterable[str] | None) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"unsupported language {language!r}; expected one of {LANGUAGES}")
        self.language = language
        self.keep = keep
        default = ("en",) if language == "en" else ("zh", "en")
        self.keep_letter = speakable(tuple(speaks) if speaks is not None else default)
        self.last = ""  # the last character said so far ("" before anything)

    def piece(self, text: str, start: int, end: int, final: bool) -> list[Span]:
        piece = text[start:end]
        zh = self.language == "zh" and (contains_chinese(piece) or any(c in _CJK_PUNCT for c in piece))
        raws = lex(text, start, end, self.keep, self.keep_letter, markup_only=zh)
        if zh:
            raws = [self._zh(r) for r in raws]
        out = self._render(raws, None if final else text[end])
        if final and zh and contains_chinese("".join(s.spoken for s in out)):
            out = _end_with_full_stop(out)
        return out

    def _zh(self, r: Raw) -> Raw:
        if not r.run:  # markup, or an address read in English words: its dots and at in Chinese
            return Raw(r.start, r.end, r.spoken.replace(" dot ", "点").replace(" at ", "艾特"))
        said = chinese.read(r.spoken, self.keep_letter)
        text = r.spoken
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()) :] if text.strip() else ""
        return Raw(r.start, r.end, lead + said + trail if said else (lead + trail))

    def _space_ok(self, left: str, right: str) -> bool:
        return bool(left) and not left.isspace() and not _no_space(left) and not _no_space(right)

    def _separator(self, right: str, line_break: bool) -> str:
        """What whitespace between the last character said and ``right`` becomes."""
        if line_break and self.last.isalnum():
            return "，" if _no_space(self.last) or _no_space(right) else ", "
        return " " if self._space_ok(self.last, right) else ""

    def _render(self, raws: list[Raw], next_char: str | None) -> list[Span]:
        """Settle spacing: whitespace runs become one space (a line break after a word becomes a
        comma: list items keep a pause), no space before punctuation, none at either end, a space
        between a rule's reading and a letter next to it, nothing said before the first word."""
        out: list[list] = []  # [start, end, spoken]
        pending: tuple[int, bool] | None = None  # (index of the span that carries it, line break)
        word_before = False
        for r in raws:
            s = r.spoken
            body = " ".join(s.split())
            newline = "\n" in s
            if not body:
                out.append([r.start, r.end, ""])
                if s and pending is None:
                    pending = (len(out) - 1, newline)
                elif s and newline:
                    pending = (pending[0], True)
                continue
            if s[0].isspace() and pending is None:
                pending = (len(out), newline)
            first = body[0]
            if first in _PUNCT_FIRST:
                pending = None
                if not self.last:
                    body = body.lstrip(",;:.!?)]}… ")
                elif first in _CLAUSE and self.last in _CLAUSE:
                    body = body[1:].lstrip()
            else:
                need = (
                    pending is not None
                    or (r.word and self.last.isalnum())
                    or (word_before and first.isalnum())
                )
                sep = self._separator(first, pending is not None and pending[1]) if need else ""
                if sep:
                    if pending is not None and pending[0] < len(out):
                        out[pending[0]][2] += sep
                    else:
                        body = sep + body
                pending = None
            out.append([r.start, r.end, body])
            if body.strip():
                self.last = body.rstrip()[-1]
            word_before = r.word
            if s[-1].isspace():
                pending = (len(out) - 1, "\n" in s[len(s.rstrip()) :])
        sep = self._separator(next_char, pending[1]) if pending is not None and next_char is not None else ""
        if sep:
            out[pending[0]][2] += sep
            # the next piece starts with a letter: it adds no space of its own after this one
            self.last = " "
        return [Span(a, b, s) for a, b, s in out]


def _end_with_full_stop(out: list[Span]) -> list[Span]:
    """Chinese text that ends in commas ends in a full stop (the official frontend's rule)."""
    for k in range(len(out) - 1, -1, -1):
        if out[k].spoken.strip():
            trimmed = _END_COMMAS.sub("", out[k].spoken)
            if trimmed != out[k].spoken.rstrip() and trimmed:
                return [*out[:k], Span(out[k].start, out[k].end, trimmed + "。"), *out[k + 1 :]]
            if not trimmed:  # a span of commas only: look further back
                out = [*out[:k], Span(out[k].start, out[k].end, ""), *out[k + 1 :]]
                for j in range(k - 1, -1, -1):
                    if out[j].spoken.strip():
                        body = _END_COMMAS.sub("", out[j].spoken)
                        return [*out[:j], Span(out[j].start, out[j].end, body + "。"), *out[j + 1 :]]
                return out
            return out
    return out


# -- incremental and whole text ----------------------------------------------------------------------


class Incremental:
    """Reads text deltas as they arrive.

    :meth:`push` returns the spans that can no longer change (everything before the last safe
    boundary seen); the tail that could still change (an unfinished number, word, markdown marker
    or tag) is held back until the next boundary or :meth:`flush`.  The spans of all calls are
    :func:`spans` of the whole text, however it was chunked.
    """

    def __init__(
        self, language: str = "en", keep: str | None = None, speaks: Iterable[str] | None = None
    ) -> None:
        self._reader = _Reader(language, keep, speaks)
        self._text = ""
        self._start = 0  # start of the unreleased piece
        self._scanned = 1  # next index to test as a cut
        self._closed = False

    def push(self, delta: str) -> list[Span]:
        if self._closed:
            raise RuntimeError("the front end was already flushed")
        self._text += delta
        out: list[Span] = []
        for i in range(max(self._scanned, self._start + 1), len(self._text)):
            if is_cut(self._text, i):
                out += self._reader.piece(self._text, self._start, i, final=False)
                self._start = i
        self._scanned = max(len(self._text), 1)
        return out

    def flush(self) -> list[Span]:
        """The rest: the text is over."""
        if self._closed:
            return []
        self._closed = True
        if self._start == len(self._text):
            return []
        return self._reader.piece(self._text, self._start, len(self._text), final=True)

    @property
    def pending(self) -> str:
        """Raw text received but not yet released."""
        return "" if self._closed else self._text[self._start :]


def spans(
    text: str, language: str = "en", *, keep: str | None = None, speaks: Iterable[str] | None = None
) -> list[Span]:
    """Every character of ``text`` in a span, in order, with what the voice says for it.

    ``language``: the reader, "en" (the default voice) or "zh" (Chinese text read in Chinese,
    the rest in English: CosyVoice2).  ``keep``: a pattern of tags said verbatim (CosyVoice2's
    ``[laughter]``).  ``speaks``: the languages of the voice (default: ``language``, and English
    for "zh"); letters of other scripts are not said (see :func:`unspeakable`).
    """
    reader = Incremental(language, keep, speaks)
    return reader.push(text) + reader.flush()


def normalize(
    text: str, language: str = "en", *, keep: str | None = None, speaks: Iterable[str] | None = None
) -> str:
    """What the voice says for ``text``: ``"".join(s.spoken for s in spans(text, language))``."""
    return "".join(s.spoken for s in spans(text, language, keep=keep, speaks=speaks))
