"""The speech LM's row schedule as a state machine: what one request feeds the backbone next.

A request does not run anything.  It says which input rows it wants fed (:meth:`LMRequest.rows`:
the prompt prefill, a group of 5 text tokens, one speech token, or ``None`` while it waits for
text), takes the log-probabilities of the last row fed (:meth:`LMRequest.accept`) and chooses the
next token with its own sampler.  Whoever owns the backbone decides when: the blocking generators
of :class:`~cosyvoice.llm.Qwen2LM` step one request at a time, and the LM stage
(:mod:`cosyvoice.lm_stage`) steps every request that has rows in one batched call.

The fed-row sequence is exactly the official one (``lm_inference.npz``, ``lm_bistream.npz``):

* unistream: sos, prompt text + text, task_id, prompt speech; then one row per generated token;
  eos masked for the first ``min_ratio x len(text)`` steps, at most ``max_ratio x len(text)``.
* bistream (FACTS 4.4): the prompt text is the start of the text stream and the prompt speech is
  interleaved with it in groups of 5 text : 15 speech rows; after that every group of 5 text rows
  is followed by generated tokens until a fill token (forced every 15 tokens, or sampled), after
  which the request waits for the next 5 text tokens.  Text arrives as *items* (one pull of the
  official text iterator each) and at most one group is taken per item, as the official loop does.
  At the end of text the rows of the last call are fed again with the remaining text and task_id
  (an official quirk), then one row per token until eos.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .config import LLMConfig
from .sampling import Sampler

__all__ = [
    "LMRequest",
    "ROW_SOS",
    "ROW_TASK",
    "ROW_TEXT",
    "ROW_SPEECH",
    "Row",
    "TokenLimit",
    "feed_text",
    "ids_of",
]

# Kinds of input rows (the numbering of the reference fixtures' feed_rows).
ROW_SOS, ROW_TASK, ROW_TEXT, ROW_SPEECH = 0, 1, 2, 3
Row = tuple[int, int]
# Most speech tokens a request may yield: a number, or a function of the text tokens it has taken.
TokenLimit = int | Callable[[int], int]

_WAIT, _DECODE, _FINAL, _DONE = "wait for text", "decode", "final", "done"


class LMRequest:
    """One request's rows, tokens and sampler.  Not thread-safe: its owner serialises calls."""

    def __init__(
        self,
        config: LLMConfig,
        sampler: Sampler,
        prompt_text: Any = (),
        prompt_speech: Any = (),
        *,
        text: Any = None,
        min_ratio: float = 2,
        max_ratio: float = 20,
        max_tokens: TokenLimit | None = None,
    ) -> None:
        """``text`` given: unistream over that text.  ``text`` None: bistream, text comes through
        :meth:`push_text` / :meth:`end_text`."""
        self.config = config
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.out: list[int] = []  # generated tokens, fills included (the sampler's history, as official)
        self.tokens: list[int] = []  # speech tokens yielded (no fills)
        self.error: Exception | None = None
        self.n_text = 0  # text tokens taken (bistream: as the official loop pulls them)
        # bistream: (text tokens fed so far, speech tokens yielded before them), each time more of
        # the text goes in: what ties a group of text tokens to the speech generated after it
        # (word timing; see realtime.engines.cosyvoice2)
        self.text_fed: list[tuple[int, int]] = []
        self.bistream = text is None
        self._ready = True  # ``_rows`` are still to be fed
        if self.bistream:
            n_text, n_speech = config.mix_ratio
            self._rows: list[Row] = [(ROW_SOS, config.sos)]
            self._text: list[Row] = [(ROW_TEXT, t) for t in ids_of(prompt_text)]
            self._prompt_speech: list[Row] = [(ROW_SPEECH, s) for s in ids_of(prompt_speech)]
            p = len(self._prompt_speech)
            self._next_fill = (p // n_speech + 1) * n_speech - p
            self._items: deque[list[int]] = deque()
            self._text_ended = False
            self._phase = _WAIT
            self._ready = False
        else:
            ids = ids_of(text)
            self.n_text = len(ids)
            self._rows = (
                [(ROW_SOS, config.sos)]
                + [(ROW_TEXT, t) for t in ids_of(prompt_text) + ids]
                + [(ROW_TASK, config.task_id)]
                + [(ROW_SPEECH, s) for s in ids_of(prompt_speech)]
            )
            self._min_len = int(len(ids) * min_ratio)
            self._max_len = int(len(ids) * max_ratio)
            self._phase = _DECODE if self._max_len > 0 else _DONE
        if isinstance(max_tokens, int) and max_tokens <= 0:
            self._phase = _DONE

    # -- state -----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._phase == _DONE

    @property
    def needs_text(self) -> bool:
        """A bistream request that can go no further until more text (or the end of it) comes."""
        return self.bistream and self._phase == _WAIT and not self._items and not self._text_ended

    def rows(self) -> list[Row] | None:
        """The rows to feed next; None while waiting for text or once finished."""
        return self._rows if self._ready and self._phase in (_DECODE, _FINAL) else None

    # -- text (bistream) ---------------------------------------------------------------------------
    def push_text(self, item: Any) -> None:
        """One pull of the text iterator: a token id, or several."""
        if not self.bistream or self._text_ended:
            raise RuntimeError("push_text on a request whose text is complete")
        self._items.append(ids_of(item))
        self._take_text()

    def end_text(self) -> None:
        if self.bistream and not self._text_ended:
            self._text_ended = True
            self._take_text()

    def _take_text(self) -> None:
        """While waiting for text: consume pushed items one at a time, as the official loop pulls
        them, until the request can decode (or, at the end of text, enters the final phase)."""
        n_text, n_speech = self.config.mix_ratio
        while self._phase == _WAIT:
            if not self._items:
                if self._text_ended:  # prompt speech not yet interleaved is dropped (official)
                    self._rows = self._rows + self._text + [(ROW_TASK, self.config.task_id)]
                    self._text = []
                    self._phase, self._ready = _FINAL, True
                    self._fed()
                return
            item = self._items.popleft()
            self.n_text += len(item)
            self._text.extend((ROW_TEXT, t) for t in item)
            while self._prompt_speech and len(self._text) >= n_text:
                self._rows = self._rows + self._text[:n_text] + self._prompt_speech[:n_speech]
                del self._text[:n_text], self._prompt_speech[:n_speech]
            if self._prompt_speech:
                continue
            after_fill = bool(self.out) and self.out[-1] == self.config.fill_token
            if after_fill or (not self.out and self._rows == [(ROW_SOS, self.config.sos)]):
                if len(self._text) < n_text:
                    continue
                group = self._text[:n_text]
                del self._text[:n_text]
                # the fill token itself is never fed: the next group replaces it
                self._rows = group if after_fill else self._rows + group
            self._phase, self._ready = _DECODE, True
            self._fed()

    def _fed(self) -> None:
        """Record how much of the text (prompt text not counted) is in the rows now."""
        fed = max(0, self.n_text - len(self._text))  # the prompt text goes in first
        if fed and (not self.text_fed or self.text_fed[-1][0] < fed):
            self.text_fed.append((fed, len(self.tokens)))

    # -- a step ------------------------------------------------------------------------------------
    def drawing(self) -> tuple[bool, bool]:
        """(whether :meth:`accept` draws a token for the rows being fed, whether eos is masked for
        that draw): the LM stage masks the log-probabilities of a whole step and computes every
        drawing request's nucleus at once."""
        if not self.bistream:
            return True, len(self.out) < self._min_len
        if self._phase == _FINAL:
            return True, False
        if len(self.out) == self._next_fill:
            return False, False  # a fill token is forced
        return True, True

    def accept(
        self, logp: torch.Tensor, candidates: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> int | None:
        """Log-probabilities [V] of the last row fed (a normal tensor this may mask in place);
        returns the speech token to yield, if this step produced one.  ``candidates``: the nucleus
        of the masked ``logp``, computed by the caller for a sampler that takes it."""
        if self.rows() is None:
            raise RuntimeError("accept without rows fed")
        cfg = self.config
        draws, no_eos = self.drawing()
        if no_eos:
            logp[cfg.eos_token] = float("-inf")
        if not draws:
            token = cfg.fill_token
        elif candidates is not None:
            token = int(self.sampler(logp, self.out, candidates))
        else:
            token = int(self.sampler(logp, self.out))
        return self._advance(token)

    def accept_drawn(self, token: int) -> int | None:
        """:meth:`accept` for a token the caller drew itself (the LM stage, on the device, with
        the masks :meth:`drawing` asked for); ignored when this step forces a fill token."""
        if self.rows() is None:
            raise RuntimeError("accept without rows fed")
        return self._advance(token if self.drawing()[0] else self.config.fill_token)

    def after_emit(self) -> tuple[bool, bool] | None:
        """What :meth:`drawing` will say at the next step if this step's token turns out to be a
        speech token that does not end the request (its one row is then fed next); None when
        such a token would end it.  The LM stage feeds that row before it knows the token
        (speculation, see :mod:`cosyvoice.lm_stage`) and drops the row when the token differs."""
        n_out, n_tokens = len(self.out) + 1, len(self.tokens) + 1
        if n_tokens >= self.cap():
            return None
        if not self.bistream:
            return None if n_out >= self._max_len else (True, n_out < self._min_len)
        if self._phase == _FINAL:
            return True, False
        return (False, False) if n_out == self._next_fill else (True, True)

    def _advance(self, token: int) -> int | None:
        """The state after this step's token: the speech token to yield, if any."""
        cfg = self.config
        if not self.bistream:
            if token in cfg.stop_token_ids:
                return self._finish()
            return self._emit(token, max_len=self._max_len)
        if self._phase == _FINAL:
            if token == cfg.eos_token:
                return self._finish()
            if token in cfg.stop_token_ids:
                return self._fail(ValueError(f"speech LM produced token {token} after the end of the text"))
            return self._emit(token)
        if token == cfg.fill_token:
            self._next_fill = len(self.out) + cfg.mix_ratio[1] + 1
            self.out.append(token)
            self._phase, self._ready = _WAIT, False  # ``_rows`` keep the rows just fed
            self._take_text()
            return None
        if token in cfg.stop_token_ids:
            return self._fail(ValueError(f"speech LM produced stop token {token} before the end of the text"))
        return self._emit(token)

    def _emit(self, token: int, max_len: int | None = None) -> int:
        self.out.append(token)
        self.tokens.append(token)
        self._rows, self._ready = [(ROW_SPEECH, token)], True
        if (max_len is not None and len(self.out) >= max_len) or len(self.tokens) >= self.cap():
            self._phase = _DONE
        return token

    def cap(self) -> float:
        """The most tokens this request may yield, given the text it has taken so far."""
        if self.max_tokens is None:
            return float("inf")
        return self.max_tokens(self.n_text) if callable(self.max_tokens) else self.max_tokens

    def _finish(self) -> None:  # returns the (absent) token, for accept's tail calls
        self._phase = _DONE
        return None

    def _fail(self, error: Exception) -> None:
        self.error = error
        self._phase = _DONE
        return None

    def cancel(self) -> None:
        self._phase = _DONE


_END = object()


def feed_text(items: Iterator[Any], target: Any) -> None:
    """One pull of a text iterator (it may block) handed to ``target``, a request or an LM stage
    handle: the item, or the end of the text once the iterator is exhausted."""
    item = next(items, _END)
    if item is _END:
        target.end_text()
    else:
        target.push_text(item)


def ids_of(x: Any) -> list[int]:
    """Token ids from an int, a sequence or a tensor of any shape."""
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]
