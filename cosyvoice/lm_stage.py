"""The speech LM stage: one thread per model and device steps every request that has rows ready
in one batched backbone call (continuous batching).

Requests join and leave at any step.  A bistream request waiting for text keeps its KV slot but
leaves the batch until text arrives; a request whose consumer has ``max_ahead`` tokens unread
(its listener is not keeping up) leaves it too, so one slow reader never slows the others.  The
caller's side of a request is an :class:`LMHandle`: push text, read tokens (and learn when the
request wants more text), cancel.  The stage never waits on a caller.

Each request is sampled with its own sampler and generator, so a request's tokens do not depend
on which others share its steps; its fed rows are exactly those it would be fed alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .config import device_stream
from .kv_cache import KVCache, KVPool
from .llm import Qwen2LM, StopCondition, Timings, Trace, stop_fn
from .lm_graphs import DecodeGraphs
from .lm_request import LMRequest, feed_text
from .sampling import RasSampler, nucleus_batch

__all__ = ["DONE", "NEEDS_TEXT", "LMHandle", "LMStage"]

log = logging.getLogger("cosyvoice.lm_stage")

NEEDS_TEXT = "needs text"
DONE = "done"


class LMHandle:
    """One request in the stage, seen from the thread that feeds it text and reads its tokens."""

    def __init__(
        self,
        stage: LMStage,
        request: LMRequest,
        cache: KVCache,
        trace: Trace | None,
        should_stop: StopCondition | None,
    ) -> None:
        self.stage = stage
        self.request = request
        self.cache = cache
        self.trace = trace
        self.stopped = stop_fn(should_stop)  # looked at by the stage before every step
        self.tokens: deque[int] = deque()  # produced, not yet read
        self.cancelled = False
        self.in_flight = False  # in the step being computed
        self.retired = False  # its KV slot is back in the pool
        self.compute_seconds = 0.0  # its share of the backbone calls it was in
        self.error: Exception | None = None
        self._listeners: list = []

    # -- the caller's side --------------------------------------------------------------------
    def subscribe(self, listener) -> None:
        """``listener()`` is called after every step of this request and when it ends (it must
        not block: it runs in the stage's thread)."""
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in self._listeners:
            listener()

    def take(self) -> tuple[list[int], bool]:
        """Every token produced and not yet read, and whether the request has ended (a token
        source for the token2wav stage); raises the request's error."""
        with self.stage.cond:
            tokens = list(self.tokens)
            self.tokens.clear()
            if tokens:
                self.stage.cond.notify_all()  # it may step again
            if self.error is not None:
                raise self.error
            return tokens, self.request.finished or self.cancelled

    def wants_text(self) -> bool:
        """The request can go no further until more text (or its end) is pushed."""
        with self.stage.cond:
            return self.request.needs_text and not self.cancelled

    def push_text(self, item: Any) -> None:
        with self.stage.cond:
            self.request.push_text(item)
            self.stage.cond.notify_all()

    def end_text(self) -> None:
        with self.stage.cond:
            self.request.end_text()
            self.stage.cond.notify_all()

    def cancel(self) -> None:
        """Stop now: the slot is given back at once, or after the step in flight."""
        with self.stage.cond:
            if self.cancelled:
                return
            self.cancelled = True
            self.request.cancel()
            if not self.in_flight:
                self.stage._retire(self)
            self.stage.cond.notify_all()
        self.notify()

    def next(self, timeout: float | None = None) -> int | str | None:
        """The next token, :data:`NEEDS_TEXT`, :data:`DONE`, or None after ``timeout`` seconds."""
        with self.stage.cond:
            ready = self.stage.cond.wait_for(
                lambda: (
                    self.tokens
                    or self.request.finished
                    or self.request.needs_text
                    or self.error
                    or self.cancelled
                ),
                timeout,
            )
            if not ready:
                return None
            if self.tokens:
                token = self.tokens.popleft()
                if len(self.tokens) == self.stage.max_ahead - 1:
                    self.stage.cond.notify_all()  # it may step again
                return token
            if self.error is not None:
                raise self.error
            if self.request.finished or self.cancelled:
                return DONE
            return NEEDS_TEXT

    def tokens_from(self, text: Iterable[Any] = (), poll: float = 0.05) -> Iterator[int]:
        """The request's speech tokens, pulling ``text`` (which may block) whenever the request
        waits for more.  The stop condition is also looked at every ``poll`` seconds while
        waiting; the request is cancelled however the iteration ends."""
        items = iter(text)
        try:
            while not self.stopped():
                event = self.next(poll)
                if event is None:
                    continue
                if event is DONE:
                    return
                if event is NEEDS_TEXT:
                    feed_text(items, self)
                    continue
                yield event
        finally:
            self.cancel()


class LMStage:
    """Steps all requests of one :class:`Qwen2LM` together; KV caches are slots of ``pool``."""

    def __init__(
        self,
        lm: Qwen2LM,
        pool: KVPool,
        max_rows: int = 4096,
        max_ahead: int = 64,
        threads: int | None = None,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        """``graphs``: fixed-shape decode steps over ``pool`` (CUDA graphs on a GPU), for steps
        in which every request feeds one row."""
        self.lm = lm
        self.graphs = graphs
        self.threads = threads  # torch intra-op threads of the stage's thread (None: leave as is)
        self.pool = pool
        self.max_rows = max_rows  # rows in one backbone call (a long prefill goes in a call of its own)
        self.max_ahead = max_ahead  # unread tokens after which a request waits for its reader
        self.cond = threading.Condition()
        self.steps = 0  # backbone calls made
        self.batch_sizes: Counter[int] = Counter()  # requests per call -> calls
        self.step_seconds = Timings()  # how long each backbone call took
        self._active: list[LMHandle] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def free_slots(self) -> int:
        return self.pool.free

    def submit(
        self,
        request: LMRequest,
        trace: Trace | None = None,
        should_stop: StopCondition | None = None,
        wait: bool = True,
    ) -> LMHandle | None:
        """Add ``request``; with ``wait``, block until a KV slot is free, else None when none is.
        ``should_stop`` is checked before every step of the request: once it fires, no more."""
        with self.cond:
            while (cache := self.pool.acquire()) is None:
                if not wait or self._closed:
                    return None
                self.cond.wait()
            handle = LMHandle(self, request, cache, trace, should_stop)
            self._active.append(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lm-stage", daemon=True)
                self._thread.start()
            self.cond.notify_all()
            return handle

    def close(self) -> None:
        with self.cond:
            self._closed = True
            for handle in list(self._active):
                handle.cancelled = True
                handle.request.cancel()
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _retire(self, handle: LMHandle) -> None:  # under the lock
        if not handle.retired:
            handle.retired = True
            self.pool.release(handle.cache)
            if handle in self._active:
                self._active.remove(handle)
            self.cond.notify_all()

    def _collect(self) -> list[LMHandle]:  # under the lock
        batch: list[LMHandle] = []
        rows = 0
        for handle in list(self._active):
            request = handle.request
            if not handle.cancelled and handle.stopped():
                handle.cancelled = True
                request.cancel()
            if handle.cancelled or request.finished:
                self._retire(handle)
                handle.notify()
                continue
            want = request.rows()
            if want is None or len(handle.tokens) >= self.max_ahead:
                continue
            if handle.cache.length + len(want) > handle.cache.capacity:
                log.warning(
                    "a request's KV slot is full (%d rows): it ends with %d speech tokens, text it did "
                    "not take is not spoken (split long texts; the service does so at sentence ends)",
                    handle.cache.capacity,
                    len(request.out),
                )
                request.cancel()  # its slot is full: it ends as if capped
                self._retire(handle)
                handle.notify()
                continue
            if batch and rows + len(want) > self.max_rows:
                continue
            batch.append(handle)
            rows += len(want)
        return batch

    def _nuclei(self, work: list, logps: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The nucleus of every request of a step that draws with the model's own sampler, in one
        batched computation (the rest draw one at a time in ``accept``); masks ``logps`` as each
        request's ``accept`` will."""
        eos = self.lm.config.eos_token
        groups: dict[tuple[float, int], list[int]] = {}  # (top_p, top_k) -> rows
        for k, (handle, _, _) in enumerate(work):
            sampler = handle.request.sampler
            if handle.cancelled or not isinstance(sampler, RasSampler):
                continue
            draws, no_eos = handle.request.drawing()
            if not draws:
                continue
            if no_eos:
                logps[k, eos] = float("-inf")
            groups.setdefault((sampler.top_p, sampler.top_k), []).append(k)
        nuclei = {}
        for (top_p, top_k), ks in groups.items():
            nuclei.update(zip(ks, nucleus_batch(logps[ks], top_p, top_k), strict=True))
        return nuclei

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: the other stage keeps its own
        with device_stream(self.lm.speech_embedding.weight.device), self.cond:
            while not self._closed:
                batch = self._collect()
                if not batch:
                    self.cond.wait()
                    continue
                work = [(h, list(h.request.rows()), h.cache.length) for h in batch]
                for handle in batch:
                    handle.in_flight = True
                self.cond.release()
                t0 = time.perf_counter()
                try:
                    logits, error = self.lm.step([(rows, h.cache) for h, rows, _ in work], self.graphs), None
                except Exception as e:  # a broken step fails the requests in it, not the stage
                    log.exception("LM step failed")
                    logits, error = None, e
                finally:
                    self.cond.acquire()
                self.steps += 1
                self.batch_sizes[len(work)] += 1
                elapsed = time.perf_counter() - t0
                self.step_seconds.observe(elapsed)
                total_rows = sum(len(rows) for _, rows, _ in work)
                for handle, rows, _ in work:  # the call's time, shared out by rows fed
                    handle.compute_seconds += elapsed * len(rows) / total_rows
                # every request's sampling runs on the host: one transfer (and sync) per step
                logps = logits.log_softmax(dim=-1).cpu() if logits is not None else None
                nuclei = self._nuclei(work, logps) if logps is not None else {}
                for k, (handle, rows, cache_len) in enumerate(work):
                    handle.in_flight = False
                    if error is not None:
                        handle.error = error
                    elif not handle.cancelled:
                        if handle.trace is not None:
                            handle.trace(rows, cache_len, len(rows), logits[k])
                        token = handle.request.accept(logps[k], nuclei.get(k))
                        if handle.request.error is not None:
                            handle.error = handle.request.error
                        if token is not None:
                            handle.tokens.append(token)
                    if handle.cancelled or handle.error is not None or handle.request.finished:
                        self._retire(handle)
                self.cond.notify_all()
                for handle, _, _ in work:
                    handle.notify()
