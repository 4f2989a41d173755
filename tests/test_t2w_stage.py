"""The token2wav stage (one thread, every stream batched a flow chunk per round): streams equal
their solo audio whenever they join; a stream that becomes ready waits one round, not another's
whole hop; a stream left out of a round is unchanged; cancel frees at the next round without
waiting; a reader that does not read holds nobody else; nothing a caller does runs model code."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cosyvoice.flow_graphs import FlowGraphs
from cosyvoice.t2w_stage import DONE, StaticTokens, T2WStage
from cosyvoice.token2wav import (
    HopSchedule,
    Job,
    MemoryPlan,
    Rounds,
    Token2Wav,
    Token2WavFull,
    fit_window,
    plan_memory,
    stream_bound,
)
from tests.conftest import load_npz
from tests.test_cosyvoice_api import assert_same_speech
from tests.test_token2wav import RecordingMels, maxdiff, prompt_sizes, tiny_models

torch.set_num_threads(1)
WAIT = 60


class Tokens:
    """A token source fed by the test: tokens arrive when it says so."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = False
        self.listeners: list = []

    def add(self, tokens, done: bool = False) -> None:
        self.tokens += [int(t) for t in tokens]
        self.done = done
        for listener in self.listeners:
            listener()

    def take(self):
        tokens, self.tokens = self.tokens, []
        return tokens, self.done

    def subscribe(self, listener) -> None:
        self.listeners.append(listener)


def solo(models, p, tokens, seed) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """A stream's chunks and mels alone."""
    t2w = RecordingMels(*models)
    t2w.open("solo", *p, seed=seed)
    t2w.push("solo", tokens)
    return t2w.pull("solo") + t2w.pull("solo", finished=True), t2w.mels["solo"]


def read_all(stream, timeout: float = WAIT) -> list[np.ndarray]:
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        stream.event.clear()
        item = stream.poll()
        if item is DONE:
            return chunks
        if item is None:
            assert time.monotonic() < deadline, "the stage never finished the stream"
            stream.event.wait(0.1)
            continue
        chunks.append(item)


def cases(fx, n: int):
    """n streams: random tokens of different lengths, prompts cut from the set's (for a 20-token
    prompt: 20, 14, 8, 20 tokens)."""
    rng = np.random.default_rng(5)
    whole, most, _, short = prompt_sizes(fx)
    out = []
    for k in range(n):
        n_prompt = (whole, most, short, whole)[k % 4]
        p = (fx["prompt_token"][:n_prompt], fx["prompt_feat"][: 2 * n_prompt], fx["embedding"])
        out.append((f"s{k}", p, rng.integers(0, 6561, size=120 + 30 * k), 10 + k))
    return out


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    return load_npz("token2wav_stream.npz")


@pytest.fixture(params=["caches", "slots", "fixed-shape rounds"])
def stage(models, fx, request):
    """The stage with every stream's flow state of its own, and in estimator slots (with a
    window wide enough for every case's whole utterance, so that the mel is the same), and in
    slots with rounds of whole chunks at fixed shapes (what CUDA graphs replay; eager here)."""
    if request.param != "caches":
        window = -(-(len(fx["prompt_token"]) + 400) // models[0].cfg.chunk_tokens)
        t2w = RecordingMels(*models, left_chunks=window, max_streams=8, flow_slots=True)
        if request.param == "fixed-shape rounds":
            t2w.slots.graphs = FlowGraphs(models[0], t2w.slots)
    else:
        t2w = RecordingMels(*models)
    stage = T2WStage(t2w)
    yield stage
    stage.close()
    if t2w.slots is not None:
        flows = [t2w._get(uuid).flow_stream for uuid in t2w.active_streams()]
        held = sum(1 for flow in flows if flow is not None and flow.slot is not None)
        assert t2w.slots.free + held == t2w.slots.slots  # every stream that ended gave its slot back


def test_streams_joining_at_different_times_equal_each_alone(models, fx, stage):
    """Tokens arrive in pieces at different times for each stream: every stream's chunks equal
    its solo chunks (same lengths, every mel within 1e-4, the same speech)."""
    specs = cases(fx, 3)
    sources = [Tokens() for _ in specs]
    streams = [
        stage.open(uuid, src, *p, seed=seed) for (uuid, p, _, seed), src in zip(specs, sources, strict=True)
    ]
    results: dict[str, list] = {}
    readers = [threading.Thread(target=lambda s=s: results.setdefault(s.uuid, read_all(s))) for s in streams]
    for r in readers:
        r.start()
    for step in range(4):  # each stream's tokens in four pieces, the streams one after another
        for (_, _, tokens, _), src in zip(specs, sources, strict=True):
            piece = np.array_split(tokens, 4)[step]
            src.add(piece, done=step == 3)
            time.sleep(0.05)
    for r in readers:
        r.join(WAIT)
    for uuid, p, tokens, seed in specs:
        expected, mels = solo(models, p, tokens, seed)
        got = results[uuid]
        assert [len(c) for c in got] == [len(c) for c in expected], uuid
        assert len(stage.token2wav.mels[uuid]) == len(mels)
        for a, b in zip(stage.token2wav.mels[uuid], mels, strict=True):
            assert maxdiff(a, b) <= 1e-4, uuid
        assert_same_speech(np.concatenate(got), np.concatenate(expected))
    assert stage.token2wav.active_streams() == []
    assert max(stage.group_sizes) >= 2  # some rounds did batch several streams


def test_a_stream_that_becomes_ready_waits_one_round_not_a_whole_hop(models, fx):
    """A stream in the middle of a long hop (several flow rounds) and a stream whose first chunk
    becomes ready after the first of those rounds: the first chunk comes out of the next rounds,
    long before the long hop is complete."""
    t2w = Token2Wav(*models)
    (_, p, tokens, _), (_, p2, tokens2, _) = cases(fx, 2)
    t2w.open("long", *p, schedule=HopSchedule(first=100, max=100), seed=1)
    t2w.push("long", np.tile(tokens, 2))  # its first hop: 100 + 80 (prompt + hop a multiple of 100)
    t2w.open("first", *p2, seed=2)
    t2w.push("first", tokens2)
    rounds = Rounds(t2w)
    rounds.add(t2w.next_job("long"))
    long_chunks = len(rounds.plans[0].pieces)
    assert long_chunks > 2
    assert rounds.step() == []  # one 25-token flow chunk of the long hop's many
    rounds.add(t2w.next_job("first"))
    first_chunks = len(rounds.plans[1].pieces)  # its one or two (or three) flow chunks
    assert first_chunks < long_chunks - 1
    order, n = [], 1
    while rounds:
        n += 1
        order += [(job.uuid, n, len(chunk)) for job, chunk in rounds.step()]
    (first, at_first, samples), (long, at_long, _) = order
    assert (first, long) == ("first", "long") and at_first < at_long and samples > 0
    assert at_first <= 1 + first_chunks  # its flow chunks, from the round after it was ready


def test_a_job_left_out_of_rounds_is_unchanged_and_still_equals_solo(models, fx):
    t2w = RecordingMels(*models)
    specs = cases(fx, 2)
    for uuid, p, tokens, seed in specs:
        t2w.open(uuid, *p, schedule=HopSchedule(first=50, max=50), seed=seed)
        t2w.push(uuid, tokens)
    rounds = Rounds(t2w)
    jobs = {uuid: t2w.next_job(uuid) for uuid, *_ in specs}
    for job in jobs.values():
        rounds.add(job)
    out: dict[str, np.ndarray] = {}
    while rounds:  # s1 sits out every other round
        for k in range(2):
            for job, chunk in rounds.step(only=lambda job, k=k: job.uuid == "s0" or k == 1):
                out[job.uuid] = chunk
    for uuid, p, tokens, seed in specs:
        alone = RecordingMels(*models)
        alone.open(uuid, *p, schedule=HopSchedule(first=50, max=50), seed=seed)
        alone.push(uuid, tokens)
        expected = alone.pull(uuid)[0]
        assert maxdiff(t2w.mels[uuid][0], alone.mels[uuid][0]) <= 1e-4
        assert_same_speech(out[uuid], expected)


def test_cancel_frees_at_the_next_round_without_waiting_and_the_others_go_on(models, fx, stage):
    specs = cases(fx, 2)
    sources = [Tokens() for _ in specs]
    streams = [
        stage.open(uuid, src, *p, seed=seed) for (uuid, p, _, seed), src in zip(specs, sources, strict=True)
    ]
    for (_, _, tokens, _), src in zip(specs, sources, strict=True):
        src.add(tokens)  # plenty, not done: both keep computing
    deadline = time.monotonic() + WAIT
    while streams[0].poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    streams[0].cancel()
    assert time.monotonic() - t0 < 0.05  # only marks it: no chunk is waited for
    assert streams[0].poll() is DONE
    while "s0" in stage.token2wav.active_streams():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sources[1].add([], done=True)
    assert len(read_all(streams[1])) > 0
    assert stage.token2wav.active_streams() == []


def test_a_reader_that_does_not_read_holds_nobody_else(models, fx, stage):
    specs = cases(fx, 2)
    slow = stage.open(specs[0][0], StaticTokens(np.tile(specs[0][2], 5)), *specs[0][1], seed=1)
    fast = stage.open(specs[1][0], StaticTokens(specs[1][2]), *specs[1][1], seed=2)
    assert len(read_all(fast)) > 0  # all of it, while the other is never read
    assert len(slow.out) <= stage.max_unread and not slow.finished
    slow.cancel()


def test_open_runs_no_model_code_in_the_caller(models, fx, stage, monkeypatch):
    """The flow prompt of a stream is computed by the stage's thread, not by whoever opens it."""
    threads = []
    real_open = stage.token2wav.open
    monkeypatch.setattr(
        stage.token2wav,
        "open",
        lambda *a, **kw: (threads.append(threading.current_thread().name), real_open(*a, **kw))[1],
    )
    ((uuid, p, tokens, seed),) = cases(fx, 1)
    stream = stage.open(uuid, StaticTokens(tokens), *p, seed=seed)
    assert len(read_all(stream)) > 0
    assert threads == ["t2w-stage"]


def test_rounds_refuse_two_jobs_of_one_stream(models, fx):
    t2w = Token2Wav(*models)
    ((uuid, p, tokens, seed),) = cases(fx, 1)
    t2w.open(uuid, *p, seed=seed)
    t2w.push(uuid, tokens)
    rounds = Rounds(t2w)
    job = t2w.next_job(uuid)
    rounds.add(job)
    with pytest.raises(ValueError, match="one job per stream"):
        rounds.add(Job(uuid, job.stream, job.hop))
    rounds.abort()
    assert t2w.active_streams() == []


class _SecondCallFails(Token2Wav):
    """A vocoder whose second call within one vocode() fails."""

    def _vocode_jobs(self, jobs, mels, on_group=None):
        self.calls = 0
        return super()._vocode_jobs(jobs, mels, on_group)

    def _vocode_group(self, streams, mels):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("vocoder broke")
        return super()._vocode_group(streams, mels)


def test_a_vocoder_failure_fails_every_stream_of_the_call_even_one_already_given_a_chunk(models, fx):
    """Chunks go out call by call; when a later call fails, the streams whose chunk went out
    earlier fail too (their state is closed with the others'), so no reader waits forever."""
    from cosyvoice.t2w_stage import T2WStream
    from tests.test_token2wav import prompt

    t2w = _SecondCallFails(*models)
    stage = T2WStage(t2w)
    rng = np.random.default_rng(9)
    for uuid in ("a", "b"):
        t2w.open(uuid, *prompt(fx), seed=1)
        t2w.push(uuid, rng.integers(0, 6561, size=160))
    t2w.run([t2w.next_job("a")])  # "a" is past its first hop: the two chunks differ in size
    rounds, streams = Rounds(t2w), {}
    for uuid in ("b", "a"):
        job = t2w.next_job(uuid)
        rounds.add(job)
        streams[uuid] = T2WStream(stage, uuid, StaticTokens([]), (), None, None, None)
        streams[uuid].pending_open, streams[uuid].busy = None, True
        stage._streams[uuid] = stage._vocoding[id(job)] = streams[uuid]
    done = []
    while rounds:
        done += rounds.advance()
    stage._vocode(done)
    # the two chunks differ in size: two calls, the first one's chunk went out before the failure
    # (which stream's comes first depends on the set's prompt: its chunks may be in b's first job)
    went_out = [stream for stream in streams.values() if stream.out]
    assert len(went_out) == 1 and isinstance(went_out[0].poll(), np.ndarray)
    for stream in streams.values():
        with pytest.raises(RuntimeError, match="vocoder broke"):
            stream.poll()
        assert stream.finished and not stream.busy
    assert t2w.active_streams() == []


def test_a_token2wav_budget_bounds_the_open_streams_and_a_closed_one_gives_its_place_back(models, fx):
    """``max_streams`` (what a memory budget holds) is enforced where a stream registers, in the
    caller's thread: one more is refused with a typed error at once, and a stream that ends or is
    cancelled gives its place back."""
    stage = T2WStage(Token2Wav(*models, max_streams=2))
    try:
        specs = cases(fx, 3)
        sources = [Tokens() for _ in specs]
        opened = [
            stage.open(uuid, src, *p, seed=seed)
            for (uuid, p, _, seed), src in zip(specs[:2], sources[:2], strict=True)
        ]
        with pytest.raises(Token2WavFull):
            stage.open(specs[2][0], sources[2], *specs[2][1], seed=specs[2][3])
        assert not stage.has_room()
        (_, _, tokens, _), src = specs[0], sources[0]
        src.add(tokens, done=True)
        assert len(read_all(opened[0])) > 0  # it ends: its place is free
        assert stage.has_room()
        third = stage.open(specs[2][0], sources[2], *specs[2][1], seed=specs[2][3])
        assert not stage.has_room()
        third.cancel()
        deadline = time.monotonic() + WAIT
        while not stage.has_room():  # the stage lets a cancelled stream go between rounds
            assert time.monotonic() < deadline
            time.sleep(0.01)
        opened[1].cancel()
    finally:
        stage.close()


def test_the_memory_plan_fits_the_widest_window_and_the_streams_the_budget_holds(models):
    flow = models[0]
    bound = {w: stream_bound(flow, w) for w in (None, 2, 5, 6)}
    assert fit_window(flow, 4, 4 * bound[None]) is None  # everything fits: the official model
    assert fit_window(flow, 4, 4 * bound[5]) == 5
    assert fit_window(flow, 4, 4 * bound[6] - 1) == 5
    assert fit_window(flow, 4, 3 * bound[2]) == 2  # never narrower than `least`: fewer streams instead
    # the budget pays for the voices' prompt states (an eighth, unless told) and then the streams
    assert plan_memory(flow, 4, None) == MemoryPlan(None, 256 << 20, None)
    assert plan_memory(flow, 4, None, "auto") == MemoryPlan(None, 256 << 20, None)
    assert plan_memory(flow, 4, None, 3, 0) == MemoryPlan(3, 0, None)
    budget = 8 * bound[5]
    assert plan_memory(flow, 4, budget, "auto") == MemoryPlan(
        fit_window(flow, 4, budget - budget // 8), budget // 8, 4
    )
    assert plan_memory(flow, 9, 4 * bound[5] + 100, 5, 100) == MemoryPlan(5, 100, 4)
    assert plan_memory(flow, 2, 4 * bound[5] + 100, 5, 100).max_streams == 2  # never more than the slots
    with pytest.raises(ValueError, match="holds no stream"):
        plan_memory(flow, 4, bound[5] + 99, 5, 100)
    for bad in (-1, "wide"):
        with pytest.raises(ValueError, match="left_chunks must be"):
            plan_memory(flow, 4, None, bad)
    # estimator slots: a stream reserves exactly its slot (smaller than the buffers' bound), and
    # the budget pays for the spare slot too
    from cosyvoice.flow_estimator import EstimatorSlots

    slot = EstimatorSlots.slot_nbytes(flow.decoder.estimator, flow.cfg.n_timesteps, 5)
    slotted = stream_bound(flow, 5, slots=True)
    assert slotted < bound[5]
    budget = slot + 6 * slotted + 100
    assert plan_memory(flow, 9, budget, 5, 100, flow_slots=True) == MemoryPlan(5, 100, 6, True)
    assert plan_memory(flow, 9, budget, 5, 100).max_streams < 6  # at the buffers' bound: fewer
    assert plan_memory(flow, 9, budget, 5, 100, flow_slots=None).flow_slots  # a narrow window: slots
    assert not plan_memory(flow, 9, 2 * bound[None], None, 100, flow_slots=None).flow_slots  # no window
    assert not plan_memory(flow, 9, None, 5, 100, flow_slots=None).flow_slots  # nor without a budget
    assert Token2Wav(*models, left_chunks=5, max_streams=2, flow_slots=True).max_stream_nbytes() == slotted
    t2w = Token2Wav(*models, left_chunks=5, max_streams=1)
    assert t2w.max_stream_nbytes() == bound[5]
    # used directly (the per-request path), the limit holds as well
    p = (np.zeros(0, dtype=np.int64), np.zeros((0, 80), dtype=np.float32), np.zeros(192, dtype=np.float32))
    t2w.open("a", *p)
    with pytest.raises(Token2WavFull):
        t2w.open("b", *p)
    t2w.open("exact", *p, mode="exact")  # a recomputing stream keeps no flow caches: not counted
    t2w.close("a")
    t2w.open("b", *p)


def test_a_new_voices_prompt_is_computed_in_the_rounds_not_at_open(models, fx):
    """A stream of a voice not seen before (a 110-token prompt: four flow chunks) used to compute
    its prompt when the stage opened it, holding every other stream that long.  Now opening
    computes nothing; its first job carries the prompt's chunks, which advance one per round
    batched with the other streams' chunks; and both streams still equal their solo audio."""
    rng = np.random.default_rng(11)
    long_prompt = (
        rng.integers(0, 6561, size=110),
        (rng.standard_normal((220, 80)) - 5).astype(np.float32),
        fx["embedding"],
    )
    (uuid, p, tokens, seed), new_tokens = cases(fx, 1)[0], rng.integers(0, 6561, size=60)
    t2w = RecordingMels(*models)
    t2w.open(uuid, *p, seed=seed)
    t2w.push(uuid, tokens)
    misses = t2w.prompts.misses  # (the set's prompt may be long enough to have chunks too)
    t2w.open("new", *long_prompt, seed=3)
    t2w.push("new", new_tokens)
    assert t2w._get("new").flow_stream.done_tokens == 0 and t2w.prompts.misses == misses + 1
    rounds = Rounds(t2w)
    for key in (uuid, "new"):
        rounds.add(t2w.next_job(key))
    left = {plan.job.uuid: len(plan.pieces) for plan in rounds.plans}
    assert left["new"] == 6  # 100 prompt tokens, then its first hop (40 with the pad): 25 per piece
    first = rounds.advance()
    after = {plan.job.uuid: len(plan.pieces) for plan in rounds.plans}
    assert after["new"] == 5 and after.get(uuid, 0) == left[uuid] - 1  # one round advanced both
    t2w.vocode(first)
    while True:  # every job of both to the end, as the stage's thread does
        for key in t2w.active_streams():
            if not any(plan.job.uuid == key for plan in rounds.plans):
                job = t2w.next_job(key, finished=True)
                if job is not None:
                    rounds.add(job)
        if not rounds:
            break
        t2w.vocode(rounds.advance())
    assert t2w.active_streams() == [] and len(t2w.prompts) == misses + 1  # the new voice's state is kept
    for key, prompt, toks, s in ((uuid, p, tokens, seed), ("new", long_prompt, new_tokens, 3)):
        _, mels = solo(models, prompt, toks, s)
        assert len(t2w.mels[key]) == len(mels), key
        for a, b in zip(t2w.mels[key], mels, strict=True):
            assert maxdiff(a, b) <= 1e-4, key
