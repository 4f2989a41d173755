"""The LM's fixed-shape decode step (what a CUDA graph records): the reference's numbers for
requests decoding together from pool slots, with the batch padded to its bucket and the keys read
to a block boundary; padding never touching a request's slot; only decode steps taken."""

from __future__ import annotations

import pytest
import torch

from cosyvoice.kv_cache import CacheFull, KVPool
from cosyvoice.llm import ROW_SPEECH, Qwen2LM
from cosyvoice.lm_graphs import DecodeGraphs, GraphCaptureFailed
from tests.conftest import load_npz, tiny_lm


@pytest.fixture(scope="module")
def lm() -> Qwen2LM:
    return tiny_lm()


@pytest.mark.parity
def test_fixed_shape_decode_matches_the_reference_beside_padding_and_stale_keys(lm):
    ref = load_npz("lm_forward.npz")
    xs = torch.from_numpy(ref["lm_input"])
    hidden = torch.from_numpy(ref["hidden"])
    n = xs.shape[0]
    pool = KVPool(lm.kv_shape(), slots=5, max_len=n + 4, spare=True)
    for table in pool.keys + pool.values:
        table.normal_(0, 50)  # what earlier requests may have left behind
    graphs = DecodeGraphs(lm, pool, key_block=4)
    ends = [n - 1, n // 2, n // 3]  # three requests at different lengths: a bucket of 4, one row of padding
    caches = [pool.acquire() for _ in ends]
    idle = pool.acquire()  # a slot held by a request that is not in this step
    idle_keys = [k[idle.slot].clone() for k in pool.keys]
    with torch.inference_mode():
        for cache, end in zip(caches, ends, strict=True):
            lm.forward_rows(xs[:end], [cache], [end])
        logits = graphs(torch.cat([xs[e : e + 1] for e in ends]), caches)
        expected = lm.llm_decoder(hidden[ends]).float()
    assert logits.shape == expected.shape
    assert torch.abs(logits - expected).max() <= 1e-4
    assert [c.length for c in caches] == [e + 1 for e in ends]
    assert all(torch.equal(k[idle.slot], before) for k, before in zip(pool.keys, idle_keys, strict=True))
    assert torch.equal(pool.keys[0][caches[0].slot, n - 1], caches[0].keys[0][n - 1])
    assert graphs.bucket(3) == 4 and graphs.steps == 1


@pytest.mark.parametrize("slots", [1, 5, 8, 21])
def test_buckets_are_powers_of_two_up_to_the_pool(lm, slots):
    graphs = DecodeGraphs(lm, KVPool(lm.kv_shape(), slots=slots, max_len=600, spare=True), key_block=256)
    assert graphs.buckets[-1] == slots and all(b <= slots for b in graphs.buckets)
    assert [graphs.bucket(k) for k in range(1, slots + 1)] == [
        min(1 << (k - 1).bit_length(), slots) for k in range(1, slots + 1)
    ]
    assert [graphs.key_length(r) for r in (1, 256, 257, 513, 600)] == [256, 256, 512, 600, 600]


def test_only_decode_steps_of_its_own_pool_are_taken_and_the_step_says_so(lm):
    pool = KVPool(lm.kv_shape(), slots=2, max_len=64, spare=True)
    graphs = DecodeGraphs(lm, pool)
    a, b = pool.acquire(), pool.acquire()
    own = lm.new_cache()
    assert graphs.takes([a, b], [1, 1])
    assert not graphs.takes([a, b], [1, 3])  # a prefill or a text group: the packed path
    assert not graphs.takes([a, own], [1, 1])  # a cache of its own
    other = KVPool(lm.kv_shape(), slots=2, max_len=64, spare=True).acquire()
    assert not graphs.takes([a, other], [1, 1])
    for cache in (a, b):
        lm.step([([(ROW_SPEECH, 3), (ROW_SPEECH, 4)], cache)], graphs)
    assert graphs.steps == 0
    lm.step([([(ROW_SPEECH, 5)], a), ([(ROW_SPEECH, 6)], b)], graphs)
    assert graphs.steps == 1 and (a.length, b.length) == (3, 3)


def test_a_full_slot_raises_and_nothing_advances(lm):
    pool = KVPool(lm.kv_shape(), slots=2, max_len=4, spare=True)
    graphs = DecodeGraphs(lm, pool)
    a, b = pool.acquire(), pool.acquire()
    lm.step([([(ROW_SPEECH, 1)] * 4, a)])
    lm.step([([(ROW_SPEECH, 1)], b)])
    with pytest.raises(CacheFull):
        lm.step([([(ROW_SPEECH, 2)], a), ([(ROW_SPEECH, 2)], b)], graphs)
    assert (a.length, b.length) == (4, 1)


def test_it_needs_a_spare_slot_and_records_graphs_only_on_cuda(lm):
    with pytest.raises(ValueError, match="spare"):
        DecodeGraphs(lm, KVPool(lm.kv_shape(), slots=2, max_len=8))
    spare = KVPool(lm.kv_shape(), slots=2, max_len=8, spare=True)
    assert spare.free == 2 and spare.keys[0].shape[0] == 3  # the spare is never handed out
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(lm, spare, capture=True)
    assert DecodeGraphs(lm, spare).capture_all() == 0  # nothing to record on a CPU


def test_a_graph_that_cannot_be_recorded_stops_the_start_with_a_way_out(lm, monkeypatch):
    pool = KVPool(lm.kv_shape(), slots=2, max_len=16, spare=True)
    graphs = DecodeGraphs(lm, pool, key_block=8)
    recorded = []

    def record(size, keys):
        if len(recorded) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded.append((size, keys))

    graphs.capture = True  # as on a GPU whose driver cannot record this step
    monkeypatch.setattr(graphs, "_record", record)
    with pytest.raises(GraphCaptureFailed, match="--cuda-graphs off"):
        graphs.capture_all()
    assert recorded == [(2, 16), (2, 8)]  # the largest bucket and key length first


def test_steps_without_a_recorded_graph_run_the_same_function_eagerly(lm):
    pool = KVPool(lm.kv_shape(), slots=2, max_len=16, spare=True)
    graphs = DecodeGraphs(lm, pool)
    a, b = pool.acquire(), pool.acquire()
    with torch.inference_mode():
        for cache in (a, b):
            lm.step([([(ROW_SPEECH, 3), (ROW_SPEECH, 4)], cache)])
        lm.step([([(ROW_SPEECH, 5)], a), ([(ROW_SPEECH, 6)], b)], graphs)
    assert graphs.capture_all() == 0 and graphs.steps == 1 and graphs.replays == 0
