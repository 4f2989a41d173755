"""The batched LM stage: the official fixtures reproduced by a request that shares every step with
others, batched == solo for requests that join, leave and wait for text at different times, slots
given back, a reader that does not read costing nobody else, and a full pool refusing cleanly."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from cosyvoice.kv_cache import KVPool
from cosyvoice.llm import Qwen2LM
from cosyvoice.lm_graphs import DecodeGraphs
from cosyvoice.lm_request import LMRequest
from cosyvoice.lm_stage import DONE, NEEDS_TEXT, LMStage, _Entry, _Step
from cosyvoice.sampling import RasSampler
from tests.conftest import load_npz, tiny_lm
from tests.test_llm import EOS, FILL, UNUSED, Recorder, forced

WAIT = 60.0


@pytest.fixture(scope="module")
def lm() -> Qwen2LM:
    return tiny_lm()


def make_stage(lm, fixed: bool = False, overlap: bool = False, on_device: bool = False, slots: int = 6):
    pool = KVPool(lm.kv_shape(), slots=slots, max_len=1024, spare=fixed)
    return LMStage(
        lm,
        pool,
        max_ahead=8,
        graphs=DecodeGraphs(lm, pool, key_block=64) if fixed else None,
        draw_on_device=on_device or overlap,
        overlap=overlap,
    )


@pytest.fixture(params=["packed", "fixed-shape", "overlap"])
def stage(lm, request):
    """The stage as on a CPU; with its decode steps at fixed shapes (what CUDA graphs record on
    a GPU; eager here, keys read in blocks of 64); and as on a GPU by default, at fixed shapes
    with the model's sampler drawing on the device and steps overlapped with the host."""
    s = make_stage(lm, fixed=request.param != "packed", overlap=request.param == "overlap")
    yield s
    s.close()


def alone(lm, request: LMRequest, text=(), on_device: bool = False, trace=None) -> list[int]:
    """``request``'s tokens when it is the only one, one step at a time (drawn where a stage
    with ``on_device`` draws)."""
    if not on_device:
        return list(lm.run_alone(request, text, trace=trace))
    solo = make_stage(lm, on_device=True, slots=1)
    try:
        return consume(solo.submit(request, trace=trace), text)
    finally:
        solo.close()


def wait_until(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def seeded_sampler(seed: int):
    """RAS with the ids that end or break a bistream request masked (random weights would hit them)."""
    ras = RasSampler.seeded(seed)

    def sampler(logp, decoded):
        logp = logp.clone()
        logp[EOS] = logp[UNUSED] = logp[FILL] = float("-inf")
        return ras(logp, decoded)

    return sampler


def consume(handle, text=(), delay: float = 0.0, out: list | None = None) -> list[int]:
    """Read every token (pulling text items with ``delay`` seconds before each), in this thread."""
    out = [] if out is None else out

    def slow(items):
        for item in items:
            time.sleep(delay)
            yield item

    out.extend(handle.tokens_from(slow(text)))
    return out


def in_threads(*jobs) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()


def others(lm, stage, n: int = 2, delay: float = 0.0):
    """Requests of other lengths and schedules to share the fixture request's steps."""
    jobs = []
    for k in range(n):
        request = LMRequest(
            lm.config,
            seeded_sampler(k),
            list(range(40, 40 + 3 * k)),
            list(range(200, 207 + k)),
            max_tokens=30 + 7 * k,
        )
        handle = stage.submit(request)
        jobs.append(
            lambda h=handle, k=k: consume(h, list(range(300 + 13 * k, 317 + 13 * k)), delay * (k + 1))
        )
    return jobs


@pytest.mark.parity
def test_bistream_fixture_through_the_batched_stage_with_others_in_the_batch(lm, stage):
    ref = load_npz("lm_bistream.npz")
    received = [0]

    def text_one_at_a_time():
        for i, t in enumerate(ref["text"].tolist()):
            received[0] = i + 1
            yield t
        received[0] = -1

    rec = Recorder(lambda: received[0])
    request = LMRequest(
        lm.config,
        forced(ref["sampler_choices"].tolist(), then=lambda lp, d: lm.config.eos_token),
        ref["prompt_text"],
        ref["prompt_speech_token"],
    )
    handle = stage.submit(request, trace=rec)
    tokens: list[int] = []
    in_threads(lambda: consume(handle, text_one_at_a_time(), 0.002, tokens), *others(lm, stage, 3, 0.003))
    assert tokens == ref["yielded_tokens"].tolist()
    np.testing.assert_array_equal(np.array(rec.rows), ref["feed_rows"])
    assert rec.calls == ref["feed_call"].tolist()
    assert rec.cache_len == ref["call_cache_len"].tolist()
    assert rec.num_rows == ref["call_num_rows"].tolist()
    assert rec.text == ref["call_text_received"].tolist()
    assert np.abs(np.stack(rec.logits) - ref["step_logits"]).max() <= 1e-4
    assert max(stage.batch_sizes) > 1  # it really shared steps
    assert stage.graphs is None or stage.graphs.steps > 0


@pytest.mark.parity
def test_unistream_fixture_through_the_batched_stage_with_others_in_the_batch(lm, stage):
    ref = load_npz("lm_inference.npz")
    rec = Recorder()
    request = LMRequest(
        lm.config,
        forced(ref["forced_choices"].tolist()),
        ref["prompt_text"],
        ref["prompt_speech_token"],
        text=ref["text"],
    )
    handle = stage.submit(request, trace=rec)
    tokens: list[int] = []
    in_threads(lambda: consume(handle, out=tokens), *others(lm, stage, 2))
    assert tokens == ref["out_tokens"].tolist()
    np.testing.assert_array_equal(np.array(rec.rows), ref["feed_rows"])
    assert rec.cache_len == ref["call_cache_len"].tolist()
    assert np.abs(np.stack(rec.logits) - ref["step_logits"]).max() <= 1e-4


def test_batched_equals_solo_for_requests_joining_leaving_and_waiting_at_different_times(lm, stage):
    specs = [  # (prompt text, prompt speech, text, cap, seconds between text items, start after)
        ([7, 8, 9], list(range(1, 8)), list(range(300, 317)), 45, 0.0, 0.0),
        ([], [], list(range(500, 509)), 25, 0.01, 0.01),
        (list(range(60, 70)), list(range(90, 130)), list(range(700, 740)), 80, 0.002, 0.005),
        ([5], [11, 12], list(range(900, 906)), 12, 0.03, 0.03),
    ]

    def request(k: int, spec) -> LMRequest:
        prompt, speech, _text, cap, *_ = spec
        return LMRequest(lm.config, seeded_sampler(k), prompt, speech, max_tokens=cap)

    solo = []
    for k, spec in enumerate(specs):
        rec = Recorder()
        tokens = list(lm.run_alone(request(k, spec), spec[2], trace=rec))
        solo.append((tokens, rec))

    results: list = [None] * len(specs)
    recs = [Recorder() for _ in specs]

    def job(k: int, spec) -> None:
        time.sleep(spec[5])
        handle = stage.submit(request(k, spec), trace=recs[k])
        results[k] = consume(handle, spec[2], spec[4])

    in_threads(*(lambda k=k, spec=spec: job(k, spec) for k, spec in enumerate(specs)))
    for k, (tokens, rec) in enumerate(solo):
        assert results[k] == tokens and len(tokens) == specs[k][3], k
        assert recs[k].rows == rec.rows and recs[k].cache_len == rec.cache_len
        assert np.abs(np.stack(recs[k].logits) - np.stack(rec.logits)).max() <= 1e-4
    assert max(stage.batch_sizes) >= 2  # they shared steps (how many at once depends on timing)
    assert stage.free_slots == stage.pool.slots


def test_the_models_own_sampler_draws_the_same_tokens_when_a_step_draws_for_all_at_once(lm, stage):
    """Requests with the model's RAS sampler get their nucleus computed for the whole step in one
    go (``nucleus_batch``): each request's tokens are those it draws alone, one row at a time."""
    texts = [list(range(300, 312)), list(range(500, 504)), list(range(700, 720)), list(range(900, 907))]

    def request(k: int) -> LMRequest:
        sampler = lm.sampler_for(torch.Generator().manual_seed(40 + k))
        return LMRequest(lm.config, sampler, text=texts[k], max_tokens=50)

    solo = [alone(lm, request(k), on_device=stage.draw_on_device) for k in range(len(texts))]
    results: list = [None] * len(texts)

    def job(k: int) -> None:
        time.sleep(0.004 * k)
        results[k] = consume(stage.submit(request(k)))

    in_threads(*(lambda k=k: job(k) for k in range(len(texts))))
    assert results == solo and all(len(tokens) > 3 for tokens in solo)
    assert max(stage.batch_sizes) >= 2


def test_cancel_gives_the_slot_back_and_a_full_pool_refuses(lm, stage):
    handles = [stage.submit(LMRequest(lm.config, seeded_sampler(k))) for k in range(stage.pool.slots)]
    assert stage.free_slots == 0
    assert stage.submit(LMRequest(lm.config, seeded_sampler(9)), wait=False) is None
    assert handles[0].next(WAIT) is NEEDS_TEXT  # a request waiting for text holds its slot ...
    handles[0].cancel()
    assert stage.free_slots == 1  # ... until it is cancelled
    assert handles[0].next(WAIT) is DONE
    late = stage.submit(LMRequest(lm.config, seeded_sampler(9)), wait=False)
    assert late is not None
    for h in [*handles[1:], late]:
        h.cancel()
    assert wait_until(lambda: stage.free_slots == stage.pool.slots)


def test_a_reader_that_does_not_read_does_not_slow_the_others(lm, stage):
    idle = stage.submit(LMRequest(lm.config, seeded_sampler(1), text=list(range(400, 430)), max_tokens=500))
    busy = stage.submit(LMRequest(lm.config, seeded_sampler(2), text=list(range(600, 630)), max_tokens=200))
    tokens = consume(busy)
    assert len(tokens) == 200
    assert len(idle.tokens) == stage.max_ahead  # it stepped until its reader fell behind, then waited
    assert len(consume(idle)) == 500  # reading again lets it go on to its end


def test_a_stop_condition_ends_a_request_before_its_next_step(lm, stage):
    stop = threading.Event()
    steps: list[int] = []

    def sampler(logp, decoded):
        steps.append(len(decoded))
        if len(decoded) == 10:
            stop.set()
        return 100 + len(decoded) % 50

    handle = stage.submit(
        LMRequest(lm.config, sampler, text=list(range(10, 30)), max_tokens=400), should_stop=stop
    )
    assert len(consume(handle)) <= 11
    assert max(steps) == 10 and stage.free_slots == stage.pool.slots


def test_a_request_whose_slot_fills_up_ends_as_if_capped(lm, caplog):
    stage = LMStage(lm, KVPool(lm.kv_shape(), slots=1, max_len=40))
    try:
        handle = stage.submit(
            LMRequest(lm.config, seeded_sampler(3), text=list(range(10, 20)), max_tokens=500)
        )
        tokens = consume(handle)
        assert len(tokens) == 40 - 12 + 1  # sos + 10 text + task_id, then one row per token until full
        assert stage.free_slots == 1
        assert "KV slot is full (40 rows)" in caplog.text  # never silently
    finally:
        stage.close()


def test_kv_pool_is_sized_from_a_budget(lm):
    shape = lm.kv_shape()
    pool = KVPool.for_budget(shape, budget_bytes=10 * shape.bytes_per_row() * 100, max_len=100)
    assert pool.slots == 10 and pool.nbytes() == 10 * 100 * shape.bytes_per_row()
    a, b = pool.acquire(), pool.acquire()
    assert {a.slot, b.slot} == {0, 1} and pool.free == 8
    pool.release(a)
    pool.release(a)  # idempotent
    assert pool.free == 9
    assert torch.equal(torch.tensor(b.keys[0].shape), torch.tensor([100, shape.kv_heads, shape.head_dim]))


def test_a_steps_nuclei_are_drawn_from_the_masks_accept_applies(lm, stage):
    """Where ``accept`` masks eos (unistream before its minimum length), the step's batched
    nucleus is computed from the masked row, even when eos is the most probable token; a request
    whose next token is a forced fill, or whose sampler is not the model's, gets none."""
    from types import SimpleNamespace

    eos = lm.config.eos_token
    ras = lm.sampler_for(torch.Generator().manual_seed(0))
    masked = LMRequest(lm.config, ras, text=[300, 301, 302])  # eos masked for its first 6 tokens
    forced = LMRequest(lm.config, ras)  # bistream
    forced._next_fill = len(forced.out)  # its next token is a forced fill: nothing is drawn
    custom = LMRequest(lm.config, lambda logp, out: 5, text=[300])
    requests = (masked, forced, custom)
    step = _Step(
        [
            _Entry(SimpleNamespace(cancelled=False, request=r), [], 0, *r.drawing(), False, index=k)
            for k, r in enumerate(requests)
        ],
        0.0,
    )
    logits = torch.full((3, lm.config.speech_token_size + 3), -20.0)
    logits[:, eos], logits[:, 7] = 0.0, -1.0
    stage._draw(step, logits, None)  # on the host: every row's log-probabilities, masked
    nuclei = stage._nuclei(step, step.results[1])
    assert masked.drawing() == (True, True) and forced.drawing() == (False, False)
    assert set(nuclei) == {0}
    assert eos not in nuclei[0][1].tolist() and nuclei[0][1][0] == 7


def test_device_draws_see_the_recent_tokens_the_host_sampler_sees(lm):
    """RAS on the device bans a token that occurs among a request's last ``win_size`` tokens,
    also early in a request (fewer tokens than the window) and for a row fed ahead, whose last
    token is the previous step's draw, still on the device; eos is never drawn where masked."""
    from types import SimpleNamespace

    stage = make_stage(lm, overlap=True)
    ras = [lm.sampler_for(torch.Generator().manual_seed(k)) for k in range(3)]
    requests = [LMRequest(lm.config, sampler, text=[300, 301, 302]) for sampler in ras]
    requests[0].out = [7] + [1] * 7  # 7 is recent: banned
    requests[1].out = [7] + [1] * 7  # fed ahead (with 5): 7 is recent, banned
    requests[2].out = [7] + [1] * 10  # 7 left the window: drawn
    requests.append(LMRequest(lm.config, lm.sampler_for(torch.Generator().manual_seed(3)), text=[300]))
    entries = [
        _Entry(SimpleNamespace(cancelled=False, request=r), [(3, 1)], 0, True, False, True, index=k)
        for k, r in enumerate(requests)
    ]
    entries[1].rows, entries[1].source = None, 0
    entries[3].no_eos = True  # eos masked (before a unistream request's minimum length)
    prev = SimpleNamespace(tokens=torch.tensor([5]))
    logits = torch.full((4, lm.config.speech_token_size + 3), -20.0)
    logits[:, 7] = 20.0  # every nucleus is just {7} ...
    logits[3, EOS] = 40.0  # ... but the last one's, {eos}, which is masked
    try:
        for _ in range(20):
            step = _Step(entries, 0.0)
            stage._draw(step, logits, prev)
            assert step.tokens[0] != 7 and step.tokens[1] != 7 and step.tokens[2] == 7
            assert step.tokens[3] == 7
    finally:
        stage.close()


def biased_lm(lm, fill: float | None):
    """The TINY LM with eos and the unused id never drawn, and fill tokens drawn now and then
    (``fill``: their added logit) or never (None)."""
    other = copy.deepcopy(lm)
    with torch.no_grad():
        other.llm_decoder.bias[[EOS, UNUSED]] = -1e4
        if fill is None:
            other.llm_decoder.bias[FILL] = -1e4
        else:
            other.llm_decoder.bias[FILL] += fill
    return other


@pytest.fixture(scope="module")
def chatty_lm(lm):
    """Bistream requests stop to wait for text after a drawn fill, which is where a row fed
    ahead is dropped (and a fill after the end of the text ends a request with an error)."""
    return biased_lm(lm, 20)


def outcome(
    handle, text=(), delay: float = 0.0, cancel_at: int | None = None
) -> tuple[list[int], str | None]:
    """A request's tokens (read with ``delay`` seconds after each, stopping at ``cancel_at``)
    and the error it ended with, if any."""
    tokens: list[int] = []
    try:
        for token in handle.tokens_from(iter(text)):
            time.sleep(delay)
            tokens.append(token)
            if len(tokens) == cancel_at:
                break  # the iteration's end cancels the request
    except ValueError as e:
        return tokens, str(e)
    return tokens, None


@pytest.mark.parametrize("fixed", [False, True], ids=["packed", "fixed-shape"])
def test_overlapped_steps_give_each_request_the_rows_and_tokens_it_gets_alone(chatty_lm, fixed):
    """With ``overlap`` a request's next row is fed from the device before its token reaches the
    host.  Where that token is a fill (the request then waits for text) the row is dropped and
    its draw rewound: each request's fed rows, tokens and end are those it gets alone, one step
    at a time, also when it shares steps with others that join, wait and are cancelled; every
    slot comes back."""
    lm = chatty_lm
    specs = [  # (prompt text, prompt speech, text, unistream, cap, seconds between items, start, cancel at)
        ([7, 8, 9], list(range(1, 8)), list(range(300, 340)), False, 70, 0.0, 0.0, None),
        ([], [], list(range(500, 530)), False, 50, 0.01, 0.01, None),
        (list(range(60, 70)), list(range(90, 130)), list(range(700, 740)), False, 80, 0.002, 0.005, None),
        ([5], [11, 12], list(range(900, 930)), False, 60, 0.0, 0.0, 25),
        ([3], [4, 5], list(range(100, 110)), True, 40, 0.0, 0.02, None),
    ]

    def request(k: int) -> tuple[LMRequest, list[int]]:
        prompt, speech, text, unistream, cap, *_ = specs[k]
        sampler = lm.sampler_for(torch.Generator().manual_seed(70 + k))
        if unistream:
            return LMRequest(lm.config, sampler, prompt, speech, text=text, max_tokens=cap), []
        return LMRequest(lm.config, sampler, prompt, speech, max_tokens=cap), text

    solo = []
    for k in range(len(specs)):
        rec, (req, text) = Recorder(), request(k)
        one = make_stage(lm, on_device=True, slots=1)
        try:
            solo.append((outcome(one.submit(req, trace=rec), text), rec))
        finally:
            one.close()

    stage = make_stage(lm, fixed=fixed, overlap=True)
    results: list = [None] * len(specs)
    recs = [Recorder() for _ in specs]

    def job(k: int) -> None:
        *_, delay, start, cancel_at = specs[k]
        time.sleep(start)
        req, text = request(k)
        results[k] = outcome(stage.submit(req, trace=recs[k]), text, delay, cancel_at)

    try:
        in_threads(*(lambda k=k: job(k) for k in range(len(specs))))
        for k, ((tokens, error), rec) in enumerate(solo):
            cancel_at = specs[k][-1]
            if cancel_at is not None and len(tokens) >= cancel_at:
                assert results[k] == (tokens[:cancel_at], None), k
                continue
            assert results[k] == (tokens, error), k
            assert recs[k].rows == rec.rows and recs[k].cache_len == rec.cache_len, k
            # (eos and the unused id sit at -1e4, where float32 is 1e-3 apart)
            np.testing.assert_allclose(np.stack(recs[k].logits), np.stack(rec.logits), rtol=1e-6, atol=1e-4)
        assert stage.speculated > stage.dropped > 0  # rows were fed ahead, and some dropped
        assert max(stage.batch_sizes) >= 2
        assert wait_until(lambda: stage.free_slots == stage.pool.slots)
        assert not fixed or stage.graphs.steps > 0
    finally:
        stage.close()


def test_an_unread_request_stays_within_max_ahead_when_its_steps_are_overlapped(lm):
    lm = biased_lm(lm, None)  # no stop token: unistream requests run to their caps
    stage = make_stage(lm, overlap=True)
    try:
        ras = [lm.sampler_for(torch.Generator().manual_seed(k)) for k in range(2)]
        idle = stage.submit(LMRequest(lm.config, ras[0], text=list(range(400, 430)), max_tokens=200))
        busy = stage.submit(LMRequest(lm.config, ras[1], text=list(range(600, 630)), max_tokens=100))
        assert len(consume(busy)) == 100
        assert len(idle.tokens) == stage.max_ahead  # never more, with a row fed ahead
        assert len(consume(idle)) == 200
        assert stage.speculated > 0
    finally:
        stage.close()


def test_a_failed_step_does_not_fail_a_request_that_ended_before_it(chatty_lm):
    """A unistream request ends at a drawn stop token (a fill, with this LM) while its next row,
    fed ahead, is in a step that fails: the request ends cleanly with its tokens; the step's
    failure is the others' business."""
    lm = chatty_lm
    stop_ids = set(lm.config.stop_token_ids)
    real_step = lm.step
    failed = []

    def step(batch, graphs=None):
        ahead = [rows for rows, _ in batch if isinstance(rows, torch.Tensor)]
        if any(int(rows[0]) in stop_ids for rows in ahead):  # a row fed after the request's end
            failed.append(len(batch))
            raise RuntimeError("injected: the device failed this step")
        return real_step(batch, graphs)

    stage = make_stage(lm, overlap=True)
    stage.lm = copy.copy(lm)
    stage.lm.step = step
    try:
        request = LMRequest(
            lm.config,
            lm.sampler_for(torch.Generator().manual_seed(5)),
            text=list(range(300, 340)),
            max_tokens=500,
        )
        tokens = consume(stage.submit(request))  # would raise the injected error
        assert failed and request.finished and request.error is None
        assert tokens == request.tokens and len(tokens) < 500  # it ended at its stop token
        assert wait_until(lambda: stage.free_slots == stage.pool.slots)
    finally:
        stage.close()
