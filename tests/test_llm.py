"""Qwen2LM and sampling: parity with the official implementation (TINY fixtures) and the
behaviour the service relies on (blocking text input, cancellation, caps, concurrency)."""

from __future__ import annotations

import gc
import json
import queue
import threading
import weakref

import numpy as np
import pytest
import torch

import cosyvoice.llm as llm_mod
from cosyvoice.checkpoint import CheckpointMismatch, load_state_dict
from cosyvoice.config import LLMConfig
from cosyvoice.llm import LM_HEAD_KEY, ROW_SPEECH, ROW_TASK, ROW_TEXT, Qwen2LM
from cosyvoice.sampling import RasSampler, nucleus_batch, nucleus_candidates, ras_batch, ras_sampling
from tests.conftest import load_npz, reference_file, tiny_json

torch.set_num_threads(1)

# The speech vocabulary's stop ids (6561 codes, then eos, an unused id, fill); the parity tests
# take them from the fixture set's config instead (lm.config), test_config checks the two agree.
EOS, UNUSED, FILL = 6561, 6562, 6563


@pytest.fixture(scope="module")
def tiny_config() -> LLMConfig:
    return LLMConfig.from_tiny_json(tiny_json())


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_state_dict(reference_file("tiny_llm.safetensors"))


@pytest.fixture(scope="module")
def lm(tiny_config, tiny_state) -> Qwen2LM:
    return Qwen2LM.from_state_dict(tiny_config, tiny_state)


class Recorder:
    """Trace callback: what the backbone was fed, call by call."""

    def __init__(self, text_received=None):
        self.rows, self.calls, self.cache_len, self.num_rows, self.logits, self.text = [], [], [], [], [], []
        self.text_received = text_received

    def __call__(self, rows, cache_len, n_rows, logits):
        self.rows += rows
        self.calls += [len(self.cache_len)] * len(rows)
        self.cache_len.append(cache_len)
        self.num_rows.append(n_rows)
        self.logits.append(logits.numpy().copy())
        if self.text_received is not None:
            self.text.append(self.text_received())


def forced(choices, then=None):
    it = iter(list(choices))

    def sampler(logp, decoded):
        try:
            return next(it)
        except StopIteration:
            if then is None:
                raise AssertionError("sampler consulted more often than the reference") from None
            return then(logp, decoded)

    return sampler


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parity
def test_forward_matches_reference(lm):
    ref = load_npz("lm_forward.npz")
    rows = (
        [(0, 0)]
        + [(ROW_TEXT, int(t)) for t in ref["text_ids"]]
        + [(ROW_TASK, 1)]
        + [(ROW_SPEECH, int(s)) for s in ref["speech_ids"]]
    )
    cache = lm.new_cache()
    with torch.inference_mode():
        xs = lm.embed_rows(rows)
        hidden = lm.forward_rows(xs[0], [cache], [len(rows)])
        logits = lm.llm_decoder(hidden)
        full = lm(xs)[0]
    np.testing.assert_array_equal(xs[0].numpy(), ref["lm_input"])
    assert cache.length == len(rows)
    assert np.abs(hidden.numpy() - ref["hidden"]).max() <= 1e-4
    assert np.abs(logits.numpy() - ref["logits"]).max() <= 1e-4
    assert np.abs(logits.log_softmax(-1).numpy() - ref["logp"]).max() <= 1e-4
    assert np.abs(full.numpy() - ref["logits"]).max() <= 1e-4


@pytest.mark.parity
def test_incremental_steps_match_full_forward(lm):
    """Feeding rows in pieces through the KV cache gives the same hidden states as one call: the
    prefill up to task_id, the first speech row alone, then two pieces of the rest."""
    ref = load_npz("lm_forward.npz")
    xs = torch.from_numpy(ref["lm_input"])
    n, prefill = xs.shape[0], 2 + len(ref["text_ids"])  # sos + text + task_id
    assert n - prefill >= 3, "the fixture needs a few speech rows"
    cuts = [0, prefill, prefill + 1, prefill + 1 + (n - prefill - 1) * 3 // 4, n]
    cache, outs = lm.new_cache(), []
    with torch.inference_mode():
        for a, b in zip(cuts, cuts[1:], strict=False):
            outs.append(lm.forward_rows(xs[a:b], [cache], [b - a]))
    assert [o.shape[0] for o in outs] == [b - a for a, b in zip(cuts, cuts[1:], strict=False)]
    assert np.abs(torch.cat(outs).numpy() - ref["hidden"]).max() <= 1e-4


@pytest.mark.parity
def test_packed_requests_match_each_request_alone(lm):
    """Rows of several requests in one call, each at its own position in its own cache, give every
    request the hidden states it gets alone (here: the reference's, cut at different points)."""
    ref = load_npz("lm_forward.npz")
    xs = torch.from_numpy(ref["lm_input"])
    n = xs.shape[0]
    # request 0 starts with 3/5 of the rows, request 1 is 3/10 in and adds a few, request 2 adds the last
    n0, a1, a2 = 3 * n // 5, 3 * n // 10, n - 1
    m1 = min(4, a2 - a1)
    assert 0 < a1 < a1 + m1 <= a2 and n0 > 1
    caches = [lm.new_cache() for _ in range(3)]
    with torch.inference_mode():
        lm.forward_rows(xs[:a1], [caches[1]], [a1])
        lm.forward_rows(xs[:a2], [caches[2]], [a2])
        packed = lm.forward_rows(torch.cat([xs[:n0], xs[a1 : a1 + m1], xs[a2:]]), caches, [n0, m1, 1])
    hidden = torch.from_numpy(ref["hidden"])
    assert torch.abs(packed[:n0] - hidden[:n0]).max() <= 1e-4
    assert torch.abs(packed[n0 : n0 + m1] - hidden[a1 : a1 + m1]).max() <= 1e-4
    assert torch.abs(packed[n0 + m1] - hidden[a2]).max() <= 1e-4
    assert [c.length for c in caches] == [n0, a1 + m1, n]


@pytest.mark.parity
def test_decoding_requests_in_pool_slots_attend_together_and_match_alone(lm):
    """Requests that each feed one row from a slot of one pool share one masked attention call
    (over the slots' keys up to the longest); each still gets the reference's hidden state at its
    own position, beside a multi-row request and one with a cache of its own, and rows beyond a
    request's length in its slot (stale keys of an earlier request) never reach it."""
    from cosyvoice.kv_cache import KVPool

    ref = load_npz("lm_forward.npz")
    xs = torch.from_numpy(ref["lm_input"])
    hidden = torch.from_numpy(ref["hidden"])
    n = xs.shape[0]
    pool = KVPool(lm.kv_shape(), slots=4, max_len=n + 4)
    for table in pool.keys + pool.values:
        table.normal_(0, 50)  # what an earlier request may have left behind
    ends = [n - 1, n // 2, n // 3]  # three decoding requests at different lengths
    caches = [pool.acquire() for _ in ends]
    own, multi_from = lm.new_cache(), n // 4
    with torch.inference_mode():
        for cache, end in zip(caches, ends, strict=True):
            lm.forward_rows(xs[:end], [cache], [end])
        lm.forward_rows(xs[:multi_from], [own], [multi_from])
        rows = torch.cat([xs[e : e + 1] for e in ends] + [xs[multi_from : multi_from + 3]])
        packed = lm.forward_rows(rows, [*caches, own], [1, 1, 1, 3])
    for k, end in enumerate(ends):
        assert torch.abs(packed[k] - hidden[end]).max() <= 1e-4
    assert torch.abs(packed[3:] - hidden[multi_from : multi_from + 3]).max() <= 1e-4
    assert [c.length for c in caches] == [e + 1 for e in ends]
    assert torch.equal(pool.keys[0][caches[0].slot, n - 1], caches[0].keys[0][n - 1])


@pytest.mark.parity
def test_unistream_inference_matches_reference(lm):
    ref = load_npz("lm_inference.npz")
    masked = []

    def record_mask(logp, decoded):
        masked.append(bool(torch.isneginf(logp[lm.config.eos_token])))
        return choose(logp, decoded)

    choose = forced(ref["forced_choices"].tolist())
    rec = Recorder()
    tokens = list(
        lm.inference(
            ref["text"], ref["prompt_text"], ref["prompt_speech_token"], sampler=record_mask, trace=rec
        )
    )
    assert tokens == ref["out_tokens"].tolist()
    np.testing.assert_array_equal(np.array(rec.rows), ref["feed_rows"])
    assert rec.calls == ref["feed_call"].tolist()
    assert rec.cache_len == ref["call_cache_len"].tolist()
    assert rec.num_rows == ref["call_num_rows"].tolist()
    assert masked == ref["eos_masked"].tolist()
    assert np.abs(np.stack(rec.logits) - ref["step_logits"]).max() <= 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor_1x1"])
def test_bistream_matches_reference(lm, as_tensor):
    ref = load_npz("lm_bistream.npz")
    received = [0]

    def text_one_at_a_time():
        for i, t in enumerate(ref["text"].tolist()):
            received[0] = i + 1
            yield torch.tensor([[t]]) if as_tensor else t  # the official frontend yields [1, 1] tensors
        received[0] = -1

    def eos_after_text(logp, decoded):
        assert received[0] == -1, "the reference samples eos only after the text ended"
        return lm.config.eos_token

    rec = Recorder(lambda: received[0])
    tokens = list(
        lm.inference_bistream(
            text_one_at_a_time(),
            ref["prompt_text"],
            ref["prompt_speech_token"],
            sampler=forced(ref["sampler_choices"].tolist(), then=eos_after_text),
            trace=rec,
        )
    )
    assert tokens == ref["yielded_tokens"].tolist()
    np.testing.assert_array_equal(np.array(rec.rows), ref["feed_rows"])
    assert rec.calls == ref["feed_call"].tolist()
    assert rec.cache_len == ref["call_cache_len"].tolist()
    assert rec.num_rows == ref["call_num_rows"].tolist()
    assert rec.text == ref["call_text_received"].tolist()
    assert np.abs(np.stack(rec.logits) - ref["step_logits"]).max() <= 1e-4


@pytest.mark.parity
def test_nucleus_candidates_match_reference(tiny_config):
    fwd, ref = load_npz("lm_forward.npz"), load_npz("sampling_nucleus.npz")
    top_p, top_k = tiny_config.top_p, tiny_config.top_k  # the config's ras_sampling parameters
    assert ref["candidate_probs_padded"].shape == (len(ref["logits_rows"]), top_k)
    for i, r in enumerate(ref["logits_rows"]):
        logp = torch.from_numpy(fwd["logits"][r]).log_softmax(-1)
        probs, ids = nucleus_candidates(logp, top_p=top_p, top_k=top_k)
        n = int(ref["candidate_count"][i])
        assert len(ids) == n
        assert ids.tolist() == ref["sorted_top30_idx"][i, :n].tolist()
        np.testing.assert_allclose(probs.numpy(), ref["candidate_probs_padded"][i, :n], atol=1e-6)
        assert probs[:-1].sum() < top_p <= probs.sum() + 1e-6  # the crossing candidate is included


# ----------------------------------------------------------------------------------------------
# sampling


def test_nucleus_respects_top_k_and_ties_are_stable():
    logp = torch.zeros(100).log_softmax(-1)  # all equal: top_p never reached before top_k
    probs, ids = nucleus_candidates(logp, top_p=0.8, top_k=25)
    assert ids.tolist() == list(range(25))


def _nucleus_by_full_sort(logp, top_p, top_k):
    """The reference's algorithm as written: a stable descending sort of the whole vocabulary,
    candidates summed one at a time in float32."""
    probs = logp.float().softmax(dim=-1)
    sorted_probs, sorted_ids = probs.sort(descending=True, stable=True)
    cum, count = torch.zeros((), dtype=torch.float32), 0
    for value in sorted_probs[:top_k]:
        if not (cum < top_p):
            break
        cum, count = cum + value, count + 1
    return sorted_probs[:count], sorted_ids[:count]


def test_nucleus_from_topk_equals_the_full_sort_with_ties_and_masks():
    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(2, 7000, (1,), generator=gen))
        x = torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) * 8)
        kind = trial % 5
        if kind == 1:
            x = x.round()  # many equal probabilities, at the top-k boundary too
        elif kind == 2:
            x = torch.zeros(n)
        elif kind == 3:
            x[torch.randint(0, n, (n // 2,), generator=gen)] = float("-inf")  # masked ids
        elif kind == 4:
            x = (x * 2).round() / 2
            x[: n // 3] = x.max()  # more ties at the maximum than top_k
        logp = x.log_softmax(-1)
        for top_p, top_k in ((0.8, 25), (0.5, 3), (0.99, 40), (1.0, 25)):
            probs, ids = nucleus_candidates(logp, top_p, top_k)
            ref_probs, ref_ids = _nucleus_by_full_sort(logp, top_p, top_k)
            assert ids.tolist() == ref_ids.tolist(), (trial, top_p, top_k)
            assert torch.equal(probs, ref_probs)


def test_nucleus_of_a_batch_equals_each_row_alone_with_ties_and_masks():
    """The LM stage computes every request's nucleus at once: each row's candidates are exactly the
    full-sort reference's for that row alone, rows with boundary ties beyond the top k included."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(60):
        x = torch.randn(16, 1000, generator=gen) * float(torch.rand(1, generator=gen) * 8)
        x[1::4] = x[1::4].round()  # ties, at the boundary too
        x[2::4, :300] = float("-inf")  # masked ids
        x[3::4, :200] = x[3::4].max()  # more ties at the maximum than top_k
        logps = x.log_softmax(-1)
        for top_p, top_k in ((0.8, 25), (0.5, 3)):
            got = nucleus_batch(logps, top_p, top_k)
            for row in range(len(x)):
                ref_probs, ref_ids = _nucleus_by_full_sort(logps[row], top_p, top_k)
                assert got[row][1].tolist() == ref_ids.tolist(), (trial, row)
                assert torch.equal(got[row][0], ref_probs)


def test_ras_sampling_is_reproducible_with_a_seeded_generator():
    logp = torch.linspace(0, 3, 200).log_softmax(-1)

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [ras_sampling(logp, [], gen) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    sampler_a, sampler_b = RasSampler.seeded(3), RasSampler.seeded(3)
    assert [sampler_a(logp, []) for _ in range(20)] == [sampler_b(logp, []) for _ in range(20)]


def test_ras_repetition_rule_bans_recent_token_and_draws_from_full_distribution():
    logits = torch.zeros(100)
    logits[7] = 20.0  # the nucleus is just {7}
    logp = logits.log_softmax(-1)
    before = logp.clone()
    gen = torch.Generator().manual_seed(0)
    assert ras_sampling(logp, [1, 2, 3], gen) == 7
    assert ras_sampling(logp, [7] + [1] * 10, gen) == 7  # outside the window of 10
    repeats = [ras_sampling(logp, [1] * 9 + [7], gen) for _ in range(300)]
    assert 7 not in repeats
    # The fallback is the full remaining distribution, not a nucleus: ids beyond the first 25 occur.
    assert max(repeats) >= 25
    assert torch.equal(logp, before)  # the caller's tensor is not modified


def _device_draws(logps, windows, seeds, n, **params):
    """``n`` draws of :func:`ras_batch` for every row, each row from its own seeded generator."""
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.stack([ras_batch(logps, windows, gens, **params) for _ in range(n)], dim=1)


def test_device_ras_draws_each_row_from_its_nucleus_in_proportion():
    """The batched draw on the device samples each row from that row's nucleus (never outside
    it), in proportion to the candidates' probabilities, as the host sampler does."""
    gen = torch.Generator().manual_seed(3)
    logps = (torch.randn(4, 300, generator=gen) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])).log_softmax(-1)
    logps[2, 5] = float("-inf")  # a masked id (eos before a request's minimum length)
    draws = _device_draws(logps, torch.full((4, 10), -1), [0, 1, 2, 3], 3000)
    for row in range(4):
        probs, ids = nucleus_candidates(logps[row], 0.8, 25)
        counts = torch.bincount(draws[row], minlength=300).float() / draws.shape[1]
        assert set(draws[row].tolist()) <= set(ids.tolist())  # nothing outside the nucleus
        expected = torch.zeros(300)
        expected[ids] = probs / probs.sum()
        assert (counts - expected).abs().max() < 0.035, row  # 3000 draws: a standard error below 0.01


def test_device_ras_bans_a_recent_token_per_row_and_each_row_draws_alone():
    logits = torch.zeros(3, 100)
    logits[:, 7] = 20.0  # every nucleus is just {7}
    logps = logits.log_softmax(-1)
    windows = torch.tensor([[1] * 9 + [7], [-1] * 10, [7] + [1] * 9])  # 7 in rows 0 and 2's windows
    draws = _device_draws(logps, windows, [0, 1, 2], 300)
    assert 7 not in draws[0].tolist() and 7 not in draws[2].tolist()
    assert max(draws[0].tolist()) >= 25  # the fallback is the whole remaining distribution
    assert draws[1].tolist() == [7] * 300
    # a row's tokens depend on its own generator only, not on the rows drawn beside it
    alone = _device_draws(logps[:1], windows[:1], [0], 300)
    assert torch.equal(alone[0], draws[0])
    assert torch.equal(_device_draws(logps, windows, [0, 1, 2], 50), draws[:, :50])  # reproducible


def test_a_samplers_device_generator_is_seeded_from_its_own():
    a, b, c = RasSampler.seeded(5), RasSampler.seeded(5), RasSampler.seeded(6)
    cpu = torch.device("cpu")
    draw = [lambda g=s.device_generator(cpu): torch.rand(4, generator=g).tolist() for s in (a, b, c)]
    assert draw[0]() == draw[1]() != draw[2]()
    assert a.device_generator(cpu) is a.device_generator(cpu)  # one per request


# ----------------------------------------------------------------------------------------------
# bistream behaviour


def test_bistream_pulls_from_a_blocking_iterator_fed_by_another_thread(lm):
    """Text arrives from a producer thread; speech comes out before the text has ended: the
    producer sends only the text the reference had received at its first backbone call (whose
    choice is a speech token), and waits for that token before sending the rest."""
    ref = load_npz("lm_bistream.npz")
    text = ref["text"].tolist()
    first = int(ref["call_text_received"][0])
    fill, eos = lm.config.fill_token, lm.config.eos_token
    assert 0 < first < len(text) and int(ref["sampler_choices"][0]) != fill, "fixture: first step mid-text"
    q: queue.Queue = queue.Queue()
    first_token = threading.Event()
    waited: list[bool] = []

    def queue_iter():
        while (item := q.get()) is not None:
            yield item

    def producer():
        try:
            for t in text[:first]:
                q.put(t)
            waited.append(first_token.wait(30))  # no speech token while the text was still streaming?
            for i in range(first, len(text), 2):
                q.put(text[i : i + 2])  # lists of ids are accepted too
        finally:
            q.put(None)  # the generator ends (and the test reports) whatever happened above

    worker = threading.Thread(target=producer)
    worker.start()
    tokens = []
    choose = forced(ref["sampler_choices"].tolist(), then=lambda lp, d: eos)
    for tok in lm.inference_bistream(
        queue_iter(), ref["prompt_text"], ref["prompt_speech_token"], sampler=choose
    ):
        tokens.append(tok)
        first_token.set()
    worker.join(30)
    assert not worker.is_alive()
    assert waited == [True], "no speech token while the text was still streaming"
    assert tokens == ref["yielded_tokens"].tolist()


class _TrackedCache(llm_mod.KVCache):
    instances: list = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _TrackedCache.instances.append(weakref.ref(self))


@pytest.fixture
def tracked_caches(monkeypatch):
    _TrackedCache.instances = []
    monkeypatch.setattr(llm_mod, "KVCache", _TrackedCache)
    return _TrackedCache.instances


def _alive(refs):
    gc.collect()
    return [r for r in refs if r() is not None]


def _never_eos(logp, decoded):
    return 100 + len(decoded) % 50


def test_stop_from_another_thread_ends_within_one_step_and_frees_the_cache(lm, tracked_caches):
    stop = threading.Event()
    rec = Recorder()
    gen = lm.inference_bistream(iter(range(40)), sampler=_never_eos, should_stop=stop, trace=rec)
    got = [next(gen) for _ in range(5)]
    assert len(got) == 5 and len(_alive(tracked_caches)) == 1
    calls_before = len(rec.cache_len)
    setter = threading.Thread(target=stop.set)
    setter.start()
    setter.join()
    assert list(gen) == []  # the generator returns; no more tokens
    assert len(rec.cache_len) == calls_before  # no backbone call after the stop was seen
    assert _alive(tracked_caches) == []  # released while the caller still holds the generator
    del gen


def test_callable_stop_condition_and_close_release_the_cache(lm, tracked_caches):
    n = [0]

    def should_stop():
        n[0] += 1
        return n[0] > 3

    assert len(list(lm.inference([5, 6, 7], sampler=_never_eos, should_stop=should_stop))) == 3
    gen = lm.inference([5, 6, 7, 8], sampler=_never_eos)
    next(gen)
    gen.close()  # GeneratorExit mid-stream
    assert _alive(tracked_caches) == []


def test_max_tokens_caps_a_model_that_never_emits_eos(lm, tracked_caches):
    rec = Recorder()
    tokens = list(lm.inference_bistream(iter(range(12)), sampler=_never_eos, max_tokens=40, trace=rec))
    assert len(tokens) == 40
    assert len(rec.cache_len) == 40 + 2  # 40 yielded + 2 forced fills, no extra backbone call
    assert list(lm.inference_bistream(iter(range(12)), sampler=_never_eos, max_tokens=0)) == []
    assert len(list(lm.inference([1, 2, 3], sampler=_never_eos, max_tokens=4))) == 4
    assert _alive(tracked_caches) == []


def test_unistream_stops_at_max_len_and_masks_eos_until_min_len(lm):
    seen = []

    def sampler(logp, decoded):
        seen.append(bool(torch.isneginf(logp[EOS])))
        return 5

    assert (
        len(list(lm.inference([9, 8], sampler=sampler, min_token_text_ratio=2, max_token_text_ratio=3))) == 6
    )
    assert seen == [True] * 4 + [False] * 2
    assert list(lm.inference([9, 8], sampler=lambda lp, d: FILL)) == []  # any stop id ends it


@pytest.mark.parametrize("bad", [EOS, UNUSED])
def test_bistream_rejects_stop_tokens_before_the_text_ends(lm, bad):
    seen = []

    def sampler(logp, decoded):
        seen.append(bool(torch.isneginf(logp[EOS])))
        return bad if len(decoded) == 3 else 11

    with pytest.raises(ValueError, match=str(bad)):
        list(lm.inference_bistream(iter(range(10)), sampler=sampler))
    assert seen and all(seen)  # eos is masked while text is streaming


def test_bistream_final_phase_rejects_fill_and_allows_eos_at_once(lm):
    seen = []

    def sampler(logp, decoded):
        seen.append(bool(torch.isneginf(logp[EOS])))
        return EOS

    assert list(lm.inference_bistream(iter([1, 2]), sampler=sampler)) == []
    assert seen == [False]
    with pytest.raises(ValueError, match=str(FILL)):
        list(lm.inference_bistream(iter([1, 2]), sampler=lambda lp, d: FILL))


def test_bistream_short_text_feeds_unconsumed_prefix_once(lm):
    """Text too short to interleave the prompt: nothing is duplicated, leftover prompt speech is
    dropped (official behaviour), text and task_id follow the fed prefix."""
    rec = Recorder()
    list(
        lm.inference_bistream(
            iter([40, 41]),
            [30, 31, 32, 33, 34, 35],
            list(range(100, 120)),
            sampler=lambda lp, d: EOS,
            trace=rec,
        )
    )
    expected = (
        [(0, 0)]
        + [(ROW_TEXT, t) for t in [30, 31, 32, 33, 34]]
        + [(ROW_SPEECH, s) for s in range(100, 115)]
        + [(ROW_TEXT, t) for t in [35, 40, 41]]
        + [(ROW_TASK, 1)]
    )
    assert rec.rows == expected and rec.cache_len == [0]


def test_forced_fill_schedule_without_prompt(lm):
    """P = 0: 15 tokens, forced fill, wait for 5 more text rows, which replace the fill."""
    rec = Recorder()
    gen = lm.inference_bistream(iter(range(200, 211)), sampler=_never_eos, max_tokens=32, trace=rec)
    tokens = list(gen)
    assert len(tokens) == 32
    assert rec.num_rows[:18] == [6] + [1] * 15 + [5] + [1]
    assert rec.rows[:6] == [(0, 0)] + [(ROW_TEXT, t) for t in range(200, 205)]
    assert rec.rows[21:26] == [(ROW_TEXT, t) for t in range(205, 210)]  # after the forced fill
    # end of text after the 2nd fill: last fed speech row again, then text 210 and task_id
    end = rec.num_rows.index(3, 17)
    assert rec.num_rows[end] == 3
    start = sum(rec.num_rows[:end])
    assert rec.rows[start : start + 3] == [rec.rows[start - 1], (ROW_TEXT, 210), (ROW_TASK, 1)]


def test_concurrent_requests_on_a_shared_model_match_solo_runs(lm):
    texts = [list(range(300, 317)), list(range(500, 509))]

    def run(i):
        ras = RasSampler.seeded(i)

        def sampler(logp, decoded):  # random weights: keep the ids that would raise out of reach
            logp = logp.clone()
            logp[UNUSED] = logp[FILL] = float("-inf")
            return ras(logp, decoded)

        return list(
            lm.inference_bistream(
                iter(texts[i]), [7, 8, 9], [1, 2, 3, 4, 5, 6, 7], sampler=sampler, max_tokens=45
            )
        )

    solo = [run(0), run(1)]
    results = [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        results[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == solo
    assert solo[0] != solo[1] and min(len(solo[0]), len(solo[1])) > 15


# ----------------------------------------------------------------------------------------------
# loading


def test_lm_head_is_dropped_but_other_extra_keys_are_rejected(tiny_config, tiny_state):
    assert LM_HEAD_KEY in tiny_state
    model = Qwen2LM(tiny_config)
    model.load_checkpoint(tiny_state)
    assert LM_HEAD_KEY not in model.state_dict()
    bad = dict(tiny_state, **{"llm.model.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatch, match="llm.model.extra.weight"):
        model.load_checkpoint(bad)
    missing = {k: v for k, v in tiny_state.items() if k != "speech_embedding.weight"}
    with pytest.raises(CheckpointMismatch, match="missing keys 1: speech_embedding.weight"):
        model.load_checkpoint(missing)


def test_dtype_option_casts_weights_and_keeps_rotary_in_float32(tiny_config, tiny_state, lm):
    half = Qwen2LM.from_state_dict(tiny_config, tiny_state, dtype="bf16")
    assert half.llm_decoder.weight.dtype == torch.bfloat16
    assert half.backbone.rotary_emb.inv_freq.dtype == torch.float32
    ref = load_npz("lm_forward.npz")
    with torch.inference_mode():
        out = half(torch.from_numpy(ref["lm_input"])[None].bfloat16())[0].float()
    assert (out - torch.from_numpy(ref["logits"])).abs().max() < 0.5  # bf16: close, not exact


def test_from_model_dir_loads_llm_pt_with_the_yaml_and_blanken_config(tmp_path, tiny_state):
    """A TINY model directory laid out like the release: yaml + BlankEN config.json + llm.pt."""
    data = tiny_json()
    llm = data["llm"]
    root = tmp_path / "model"
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(data["qwen2_config"]))
    (root / "cosyvoice2.yaml").write_text(
        f"__set_seed1: !apply:random.seed [1986]\nllm_input_size: {llm['llm_input_size']}\n"
        f"llm_output_size: {llm['llm_output_size']}\n"
        "qwen_pretrain_path: ''\nllm: !new:cosyvoice.llm.llm.Qwen2LM\n"
        "    llm_input_size: !ref <llm_input_size>\n    llm_output_size: !ref <llm_output_size>\n"
        f"    speech_token_size: {llm['speech_token_size']}\n    mix_ratio: {list(llm['mix_ratio'])}\n"
        "    llm: !new:cosyvoice.llm.llm.Qwen2Encoder\n        pretrain_path: !ref <qwen_pretrain_path>\n"
    )
    torch.save(tiny_state, root / "llm.pt")
    model = Qwen2LM.from_model_dir(root)
    ref = load_npz("lm_forward.npz")
    with torch.inference_mode():
        logits = model(torch.from_numpy(ref["lm_input"])[None])[0]
    assert np.abs(logits.numpy() - ref["logits"]).max() <= 1e-4
    (root / "llm.pt").unlink()
    with pytest.raises(ValueError, match="missing llm.pt"):
        Qwen2LM.from_model_dir(root)


def test_int8_copy_is_close_and_generates(lm):
    from cosyvoice.llm import quantize_int8

    q = quantize_int8(lm)
    assert isinstance(lm.llm_decoder.weight, torch.Tensor)  # the original is untouched
    ref = load_npz("lm_forward.npz")
    with torch.inference_mode():
        logits = q(torch.from_numpy(ref["lm_input"])[None])[0]
    err = np.abs(logits.numpy() - ref["logits"])
    assert 0 < err.mean() < 0.1 * np.abs(ref["logits"]).mean()
    tokens = list(q.inference_bistream(iter(range(12)), sampler=_never_eos, max_tokens=20))
    assert len(tokens) == 20
