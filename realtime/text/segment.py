"""Cut a stream of LLM text deltas into clauses that can be synthesised on their own.

A clause is released the moment it is known to be complete, so the first audio can start while
the model is still writing the rest.  "Known" is the subtle part: deltas split words anywhere
("Hel" + "lo wor" + "ld."), so a boundary counts only once the whitespace after it has arrived,
and every decision depends on the text received so far and nothing else.  That makes the cuts
independent of how the text was split into deltas, which the tests check with random splits.

Segments end right after their punctuation; the whitespace that confirmed the boundary belongs
to the next segment.  ``Segment.end`` is an offset into the raw text, which the engine reports
as a mark once the segment's audio is out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Segment", "SegmenterConfig", "ClauseSegmenter", "PlaybackClock", "FUNCTION_WORDS", "lead_cut"]


@dataclass(frozen=True)
class Segment:
    text: str  # raw text, as the client sent it
    start: int  # raw offset of text[0]
    end: int  # raw offset one past the last character: everything before it has been released


@dataclass
class SegmenterConfig:
    first_clause_words: int = 3  # a comma may end the first segment after this many words
    clause_words: int = 5  # ... and any later one after this many
    max_chars: int = 200  # a segment with no usable punctuation is cut at whitespace here
    poll_after: float = 0.4  # seconds pending text may wait before poll() releases it
    poll_min_words: int = 3  # ... if it has at least this many complete words
    # Before anything has been said the listener is waiting on us, so the first words go sooner;
    # the engine keeps that first piece short, and the text that follows refills the lead.
    first_poll_after: float = 0.15


# Words after which a period does not end a sentence.
# Ordinary words that double as abbreviations ("no", "sun") are left out: a missed split only
# makes a segment longer, a false one breaks a sentence in two.
_ABBREVIATIONS = frozenset(
    "dr mr mrs ms prof st jr sr mt vs approx fig cf inc ltd corp dept jan feb apr jun jul aug sep "
    "sept oct nov dec tue thu fri".split()
)
_INITIALISM = re.compile(r"(?:[A-Za-z]\.){2,}$")  # U.S. e.g. i.e. a.m.
_CLOSERS = "\"'”’)]}*_"
# A run of terminal punctuation plus closing quotes/brackets, or a clause mark, or a dash.
_CANDIDATE = re.compile(
    rf"(?P<stop>[.!?]*[!?][.!?]*|(?<!\.)\.(?!\.))[{re.escape(_CLOSERS)}]*(?=\s)"
    rf"|(?P<clause>[,;:]|\.{{2,}}|…)[{re.escape(_CLOSERS)}]*(?=\s)"
    r"|(?P<dash>(?<=\S)[ \t][—–-]{1,2}(?=\s)|[—–](?=[^\W\d_]))"  # "a — b", "word—word"
    r"|(?P<newline>\n)"
)
_WORD = re.compile(r"\w+")
_LAST_TOKEN = re.compile(r"\S+$")
_TAIL_WORD = re.compile(r"[A-Za-z0-9.]*$")


class ClauseSegmenter:
    """Sans-I/O: feed deltas with ``push``, drain with ``flush``/``end``, and call ``poll`` with the
    current time while waiting so that a slow producer does not hold back text that is ready."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        self._buf = ""  # received, not yet released
        self._offset = 0  # raw offset of _buf[0]
        self._released_words = False  # has any segment with words been released yet?
        self._pending_since: float | None = None
        self._ended = False

    @property
    def pending(self) -> str:
        return self._buf

    @property
    def offset(self) -> int:
        """Raw offset up to which text has been released."""
        return self._offset

    def push(self, text: str, now: float | None = None) -> list[Segment]:
        if self._ended:
            raise RuntimeError("push after end")
        self._buf += text
        out = self._scan(final=False)
        self._touch(now, released=bool(out))
        return out

    def poll(self, now: float, hurry: bool = False) -> list[Segment]:
        """Release text that has waited longer than ``poll_after`` seconds, or at once with
        ``hurry`` (the engine's listener is about to run out of audio).

        A clause that ends the pending text ("Hello world." with no space yet) is taken as complete:
        after that long a pause the producer is thinking, not mid-number.  Otherwise the complete
        words go, if there are enough of them; the word still being written stays.
        """
        if not self._buf.strip():
            return []
        if self._pending_since is None:
            self._pending_since = now
            if not hurry:
                return []
        wait = self.config.poll_after if self._released_words else self.config.first_poll_after
        if now - self._pending_since < wait and not hurry:
            return []
        out = self._scan(final=True)
        if not out:
            cut = _last_space(self._buf)
            if cut is None or len(_WORD.findall(self._buf[:cut])) < self.config.poll_min_words:
                return []
            out = [self._release(cut)]
        self._touch(now, released=True)
        return out

    def flush(self) -> list[Segment]:
        """Everything received so far, cut at the boundaries the end of text confirms."""
        out = self._scan(final=True)
        if self._buf:
            out.append(self._release(len(self._buf)))
        self._pending_since = None
        return out

    def end(self) -> list[Segment]:
        out = self.flush()
        self._ended = True
        return out

    # -- internals ---------------------------------------------------------------------------
    def _touch(self, now: float | None, released: bool) -> None:
        if not self._buf.strip():
            self._pending_since = None
        elif released or self._pending_since is None:
            self._pending_since = now

    def _release(self, cut: int) -> Segment:
        text, self._buf = self._buf[:cut], self._buf[cut:]
        seg = Segment(text, self._offset, self._offset + cut)
        self._offset += cut
        if _WORD.search(text):
            self._released_words = True
        return seg

    def _scan(self, final: bool) -> list[Segment]:
        out = []
        while True:
            cut = self._next_cut(final)
            if cut is None:
                return out
            out.append(self._release(cut))

    def _next_cut(self, final: bool) -> int | None:
        """Where the first segment of the buffer ends, if that is already decided."""
        buf, cfg = self._buf, self.config
        text = buf + " " if final else buf  # the end of text confirms a boundary like a space
        for m in _CANDIDATE.finditer(text):
            if m.start() >= cfg.max_chars:
                break
            if m["newline"] is not None:
                if buf[: m.start()].strip():
                    return m.start()
                continue
            cut = min(m.end(), len(buf))
            words = len(_WORD.findall(buf[:cut]))
            if m["stop"] is not None:
                verdict = self._sentence_end(text, m.start("stop"), m["stop"], final)
                if verdict is None:
                    return None  # needs a character that has not arrived yet
                if verdict and words:
                    return cut
                continue
            # A comma, colon, dash or ellipsis: a clause break once the clause is long enough.
            if words >= (cfg.clause_words if self._released_words else cfg.first_clause_words):
                return cut
        if len(buf) > cfg.max_chars:
            cut = _last_space(buf[: cfg.max_chars + 1])
            if cut is not None and buf[:cut].strip():
                return cut
        return None

    def _sentence_end(self, text: str, at: int, stop: str, final: bool) -> bool | None:
        """Does the stop run at ``text[at:]`` end a sentence?  ``None``: cannot tell yet."""
        if stop != ".":
            return True  # ! ? ?! ... all end a sentence
        token = _LAST_TOKEN.search(text, 0, at + 1)
        word = token[0] if token else "."
        bare = _TAIL_WORD.search(word.rstrip("."))[0].lower()  # "(Dr." -> "dr", "😀U.S." -> "u.s"
        if bare in ("etc", "no"):
            # "etc." ends a sentence only before a capital; "No." is "number" before a digit.
            rest = text[at + 1 :].lstrip()
            if not rest:
                return True if final else None
            return rest[0].isupper() if bare == "etc" else not rest[0].isdigit()
        if (
            bare.rsplit(".", 1)[-1] in _ABBREVIATIONS
            or _INITIALISM.search(bare + ".")
            or (len(bare) == 1 and bare.isalpha())
        ):
            return False
        if bare.isdigit() and len(bare) <= 3 and token is not None:
            # "1. " at the start of a line is a list marker, not the end of a sentence.
            before = text[: token.start()].rstrip(" \t")
            if before.endswith("\n") or (not before and self._offset == 0):
                return False
        return True


def _last_space(s: str) -> int | None:
    """Start of the last whitespace run that follows some text, or None."""
    stripped = s.rstrip()
    if len(stripped) < len(s) and stripped:
        return len(stripped)
    starts = [m.start() + 1 for m in re.finditer(r"\S\s", s)]
    return starts[-1] if starts else None


@dataclass
class PlaybackClock:
    """Where a listener who started playing at our first chunk would be now.

    The engine cannot see the client's player, but it knows how much audio it has handed out and
    when: that bounds how far ahead of playback it is (the lead), which is the time the next model
    call may take before the listener hears a gap.  A chunk handed out after the player ran dry
    starts playing when it arrives, so the clock never runs behind ``now``.
    """

    end: float | None = None  # when the audio handed out so far finishes playing

    def played(self, seconds: float, now: float) -> None:
        self.end = max(self.end if self.end is not None else now, now) + max(0.0, seconds)

    def lead(self, now: float) -> float:
        return 0.0 if self.end is None else max(0.0, self.end - now)


# Words a clause can be cut *before* without breaking a phrase: articles, prepositions,
# conjunctions, relative pronouns, auxiliaries.  A cut there sounds like a breath, a cut inside a
# noun phrase ("the | station") sounds like a stutter.
FUNCTION_WORDS = frozenset(
    "a an the and or but so nor yet to of in on at for from with by as into onto over under about "
    "after before than then that which who whom whose when where while because if although though "
    "unless until is are was were be been will would can could should shall may might must has have "
    "had do does did it its this these those my your our their his her not".split()
)
_TOKEN = re.compile(r"\S+")
_CLAUSE_MARK = tuple(",;:.!?—–")


def lead_cut(text: str, max_chars: float, min_words: int = 2) -> int | None:
    """Where to end the first piece of ``text`` so that it has at most ``max_chars`` characters.

    The engine asks this when its lead over playback is too small for the whole segment: a model
    call's cost grows with its input, and nothing is heard until it returns.  Cuts are only ever at
    word gaps and leave at least ``min_words`` words on each side; among the gaps that fit, one
    after a clause mark wins, then one before a function word, then any other, the longest first;
    a piece shorter than half the budget, or one ending on a function word, only when nothing
    better fits.  ``None``: no cut (the whole text
    fits, or it is too short to cut).
    """
    words = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    if not words or words[-1][1] - words[0][0] <= max_chars or len(words) < 2 * min_words:
        return None
    best: tuple[int, int] | None = None  # (rank, k): cut after words[k - 1]
    for k in range(min_words, len(words) - min_words + 1):
        size = words[k - 1][1] - words[0][0]
        if size > max_chars:
            break
        prev, nxt = text[slice(*words[k - 1])], text[slice(*words[k])]
        if prev.endswith(_CLAUSE_MARK):
            rank = 2
        elif _bare(prev) in FUNCTION_WORDS:
            rank = -2  # "over to | the harbour" dangles: worse than a short piece
        elif _bare(nxt) in FUNCTION_WORDS:
            rank = 1
        else:
            rank = 0
        if size * 2 < max_chars:
            rank -= 2  # a piece under half the budget wastes lead: only if nothing better fits
        if best is None or rank >= best[0]:
            best = (rank, k)
    k = best[1] if best is not None else min_words
    return words[k - 1][1]


def _bare(word: str) -> str:
    return word.strip(_CLOSERS + "\"'(,;:.!?").lower()
