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
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import device_stream, stream_event, to_device
from .kv_cache import KVCache, KVPool
from .llm import Qwen2LM, StopCondition, Timings, Trace, stop_fn
from .lm_graphs import DecodeGraphs
from .lm_request import ROW_SPEECH, LMRequest, Row, feed_text
from .sampling import RasSampler, nucleus_batch, ras_batch

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
        self.in_flight = 0  # steps it is in that are not taken yet (two with speculation)
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
        draw_on_device: bool = False,
        overlap: bool = False,
    ) -> None:
        """``graphs``: fixed-shape decode steps over ``pool`` (CUDA graphs on a GPU), for steps
        in which every request feeds one row.  ``draw_on_device``: requests with the model's own
        sampler draw on the LM's device (:func:`~cosyvoice.sampling.ras_batch`, from a generator
        seeded by theirs), so a step's tokens need no host round trip before the next step.
        ``overlap`` (needs it): a request's next step is enqueued before its token reaches the
        host, feeding the token from the device, so the host's work for a step (taking tokens,
        scheduling, the service's threads) runs while the device computes the next one.  A request
        whose token turns out to end it, or to be a fill after which it waits for text, has that
        row dropped: its key row is overwritten later and its draw rewound, so its tokens are the
        same as without ``overlap``."""
        if overlap and not draw_on_device:
            raise ValueError("overlap needs draw_on_device")
        self.lm = lm
        self.device = lm.speech_embedding.weight.device
        self.draw_on_device, self.overlap = draw_on_device, overlap
        self.graphs = graphs
        self.threads = threads  # torch intra-op threads of the stage's thread (None: leave as is)
        self.pool = pool
        self.max_rows = max_rows  # rows in one backbone call (a long prefill goes in a call of its own)
        self.max_ahead = max_ahead  # unread tokens after which a request waits for its reader
        self.cond = threading.Condition()
        self.steps = 0  # backbone calls made
        self.speculated = 0  # rows fed before their token reached the host (``overlap``)
        self.dropped = 0  # of those, rows whose token ended the request or made it wait for text
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
            if handle.in_flight:
                continue
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

    def _nuclei(self, step: _Step, logps: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The nucleus of every host-drawn request of a step that draws with the model's own
        sampler, in one batched computation (the rest draw one at a time in ``accept``);
        ``logps`` [len(step.host), V] are the host-drawn rows', with their masks applied."""
        groups: dict[tuple[float, int], list[int]] = {}  # (top_p, top_k) -> rows of logps
        for i, k in enumerate(step.host):
            entry = step.entries[k]
            sampler = entry.handle.request.sampler
            if entry.handle.cancelled or not entry.draws or not isinstance(sampler, RasSampler):
                continue
            groups.setdefault((sampler.top_p, sampler.top_k), []).append(i)
        nuclei = {}
        for (top_p, top_k), rows in groups.items():
            nuclei.update(zip(rows, nucleus_batch(logps[rows], top_p, top_k), strict=True))
        return nuclei

    def _speculate(self, step: _Step | None) -> list[tuple[_Entry, tuple[bool, bool]]]:
        """The requests of ``step`` (still in flight) whose next row is, most likely, the token
        it is drawing on the device: what :meth:`LMRequest.after_emit` says would follow, for
        those that may step again (under the lock)."""
        if step is None or step.error is not None:
            return []
        spec = []
        for entry in step.entries:
            handle = entry.handle
            fed = entry.rows is not None  # (a row fed ahead is checked by now: None, it was dropped)
            if not (entry.on_device and entry.draws and fed) or handle.cancelled or handle.stopped():
                continue
            if len(handle.tokens) + 1 >= self.max_ahead or handle.cache.length >= handle.cache.capacity:
                continue
            following = handle.request.after_emit()
            if following is not None:
                spec.append((entry, following))
        return spec

    def _launch(
        self, batch: list[LMHandle], spec: list[tuple[_Entry, tuple[bool, bool]]], prev: _Step | None
    ) -> _Step:
        """Enqueue one backbone call and its device draws (under the lock, which it releases
        while it calls the model)."""
        entries = []
        for handle in batch:
            draws, no_eos = handle.request.drawing()
            on_device = self.draw_on_device and isinstance(handle.request.sampler, RasSampler)
            entries.append(
                _Entry(handle, list(handle.request.rows()), handle.cache.length, draws, no_eos, on_device)
            )
        self.speculated += len(spec)
        for before, (draws, no_eos) in spec:
            entry = _Entry(
                before.handle, None, before.handle.cache.length, draws, no_eos, True, source=before.index
            )
            before.next = entry
            entries.append(entry)
        for k, entry in enumerate(entries):
            entry.index = k
            entry.handle.in_flight += 1
        step = _Step(entries, time.perf_counter())
        self.cond.release()
        try:
            fed = [
                (
                    entry.rows if entry.rows is not None else prev.tokens[entry.source : entry.source + 1],
                    entry.handle.cache,
                )
                for entry in entries
            ]
            step.logits = self.lm.step(fed, self.graphs)
            self._draw(step, step.logits, prev)
        except Exception as e:  # a broken step fails the requests in it, not the stage
            log.exception("LM step failed")
            step.error = e
        finally:
            self.cond.acquire()
        return step

    def _draw(self, step: _Step, logits: torch.Tensor, prev: _Step | None) -> None:
        """Mask and draw every row of a step: those with the model's own sampler on the device
        (``draw_on_device``), the others' log-probabilities to the host for their samplers; one
        copy to the host for all of it, not waited for here."""
        entries, device = step.entries, logits.device
        logps = logits.log_softmax(dim=-1)
        no_eos = [entry.index for entry in entries if entry.no_eos]
        if no_eos:  # (a scalar fill: assigning a Python float by index copies it, and waits, on CUDA)
            logps.select(1, self.lm.config.eos_token).index_fill_(0, to_device(no_eos, device), float("-inf"))
        tokens = torch.zeros(len(entries), dtype=torch.long, device=device)
        groups: dict[tuple, list[_Entry]] = {}
        for entry in entries:
            if entry.on_device and entry.draws:
                groups.setdefault(entry.handle.request.sampler.params, []).append(entry)
        for (top_p, top_k, win_size, tau_r), group in groups.items():
            windows, spec, generators = [], [], []
            for row, entry in enumerate(group):
                out = entry.handle.request.out
                if entry.rows is None:  # its last token is the one being drawn on the device
                    recent = (out[-(win_size - 1) :] if win_size > 1 else []) + [-1]
                    spec.append((row, entry.source))
                else:
                    recent = out[-win_size:] if win_size > 0 else []
                windows.append([-1] * (win_size - len(recent)) + recent)
                generator = entry.handle.request.sampler.device_generator(device)
                if entry.rows is None:
                    entry.rewind = generator.get_state()  # a draw that may be dropped
                generators.append(generator)
            window = to_device(torch.tensor(windows, dtype=torch.long).reshape(len(group), win_size), device)
            if spec and win_size > 0:
                spec_rows, sources = (to_device(column, device) for column in zip(*spec, strict=True))
                window[spec_rows, -1] = prev.tokens[sources]
            rows = to_device([entry.index for entry in group], device)
            tokens[rows] = ras_batch(logps[rows], window, generators, top_p, top_k, win_size, tau_r)
        step.tokens = tokens
        step.host = [entry.index for entry in entries if not entry.on_device]
        host_logps = logps[to_device(step.host, device)] if step.host else None
        step.results = (to_host(tokens), None if host_logps is None else to_host(host_logps))
        step.ready = stream_event(device)

    def _finish(self, step: _Step) -> None:
        """Take a step's tokens (waiting for the device without the lock): each request accepts
        its token, a speculative row that turned out not to be what its request wanted is dropped
        (its key row and its draw undone), and requests that ended give their slot back."""
        if step.ready is not None:
            self.cond.release()
            try:
                step.ready.synchronize()
            except Exception as e:  # an asynchronous device error of this step
                log.exception("LM step failed")
                step.error = e
            finally:
                self.cond.acquire()
        entries, error = step.entries, step.error
        elapsed = time.perf_counter() - step.t0  # from enqueue to tokens on the host
        self.steps += 1
        self.batch_sizes[len(entries)] += 1
        self.step_seconds.observe(elapsed)
        tokens, logps = step.results if error is None else (None, None)
        tokens = tokens.tolist() if tokens is not None else None
        total_rows = sum(1 if e.rows is None else len(e.rows) for e in entries)
        nuclei = self._nuclei(step, logps) if logps is not None else {}
        host_row = {k: i for i, k in enumerate(step.host)}
        for entry in entries:
            handle = entry.handle
            handle.in_flight -= 1
            handle.compute_seconds += elapsed * (1 if entry.rows is None else len(entry.rows)) / total_rows
            if entry.rows is None and (handle.request.finished or handle.cancelled):
                pass  # a row after the request's end: nothing to undo, nothing to fail
            elif error is not None:
                handle.error = error
            elif entry.rows is None:  # speculative, and not what its request wanted
                self.dropped += 1
                handle.cache.length -= 1
                if entry.rewind is not None:
                    handle.request.sampler.device_generator(self.device).set_state(entry.rewind)
            elif not handle.cancelled:
                if handle.trace is not None:
                    handle.trace(entry.rows, entry.cache_len, len(entry.rows), step.logits[entry.index])
                if entry.on_device:
                    token = handle.request.accept_drawn(tokens[entry.index])
                else:
                    i = host_row[entry.index]
                    token = handle.request.accept(logps[i], nuclei.get(i))
                if handle.request.error is not None:
                    handle.error = handle.request.error
                if token is not None:
                    handle.tokens.append(token)
                following = entry.next
                if (
                    following is not None
                    and handle.error is None
                    and handle.request.rows() == [(ROW_SPEECH, token)]
                    and handle.request.drawing() == (following.draws, following.no_eos)
                ):
                    following.rows = [(ROW_SPEECH, token)]  # it fed what the request wanted
            if handle.in_flight == 0 and (
                handle.cancelled or handle.error is not None or handle.request.finished
            ):
                self._retire(handle)
        self.cond.notify_all()
        for entry in entries:
            entry.handle.notify()

    def _run(self) -> None:
        """Launch a step, then take the previous one's tokens: with ``overlap``, the device
        computes a step while the host takes the tokens of the one before (and this thread never
        waits for an idle device); without, each step is taken before the next."""
        torch.set_grad_enabled(False)
        if self.threads:
            torch.set_num_threads(self.threads)  # per thread under OpenMP: the other stage keeps its own
        pending: _Step | None = None
        with device_stream(self.lm.speech_embedding.weight.device), self.cond:
            while not self._closed or pending is not None:
                batch = self._collect() if not self._closed else []
                spec = self._speculate(pending) if self.overlap and not self._closed else []
                if not batch and not spec:
                    if pending is not None:
                        self._finish(pending)
                        pending = None
                    else:
                        self.cond.wait()
                    continue
                if pending is not None and any(not entry.on_device for entry in pending.entries):
                    # requests drawn on the host cannot be fed ahead: take their tokens first,
                    # so that they are not left out of every other step
                    self._finish(pending)
                    pending = None
                    continue
                step = self._launch(batch, spec, pending)
                if pending is not None:
                    self._finish(pending)
                pending = step
                if not self.overlap:
                    self._finish(pending)
                    pending = None


@dataclass(eq=False)
class _Entry:
    """One request's part in one step."""

    handle: LMHandle
    rows: list[Row] | None  # None: one speech row fed from the device (the previous step's draw)
    cache_len: int  # its cache length before the step
    draws: bool  # this step's token is drawn (else a forced fill)
    no_eos: bool  # eos is masked for the draw
    on_device: bool  # drawn by the stage on the device (else by its sampler, on the host)
    source: int = -1  # a speculative row: its token's index in the previous step
    index: int = -1  # its row in the step
    next: _Entry | None = None  # its speculative row in the next step
    rewind: torch.Tensor | None = None  # its device generator's state before a speculative draw


@dataclass(eq=False)
class _Step:
    """One backbone call, from enqueue to its tokens on the host."""

    entries: list[_Entry]
    t0: float
    error: Exception | None = None
    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # [B] drawn on the device (0 for host-drawn rows)
    host: list[int] = field(default_factory=list)  # rows drawn on the host
    results: tuple = (None, None)  # (tokens, host rows' log-probabilities), on the host once ready
    ready: torch.cuda.Event | None = None


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` on the host that is complete once the calling thread's device work
    so far is (pinned memory, not waited for); the tensor itself on a CPU."""
    if tensor.device.type != "cuda":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out
