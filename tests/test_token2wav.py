"""Streaming token2wav: the official chunk loop (token2wav_stream.npz), the constant-cost mode, and
the per-UUID lifecycle (hop schedule per request, caches freed, concurrent streams)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.checkpoint import load_state_dict, load_strict
from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig
from cosyvoice.hift import HiFTConfig, HiFTGenerator, load_hift_state_dict
from cosyvoice.token2wav import HopSchedule, Token2Wav, fade_in_out, hamming_window
from tests.conftest import load_npz, reference_file

torch.set_num_threads(1)
ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> tuple[CausalMaskedDiffWithXvec, HiFTGenerator]:
    return tiny_models()


def tiny_models() -> tuple[CausalMaskedDiffWithXvec, HiFTGenerator]:
    """The reference set's tiny flow and HiFT."""
    cfg = json.loads(reference_file("config_tiny.json").read_text())
    flow = CausalMaskedDiffWithXvec(FlowConfig.from_dict(cfg["flow"]))
    load_strict(flow, load_state_dict(reference_file("tiny_flow.safetensors")), "tiny flow")
    hift = HiFTGenerator(HiFTConfig.from_dict(cfg["hift"]))
    load_hift_state_dict(hift, load_file(str(reference_file("tiny_hift.safetensors"))))
    return flow.eval(), hift.eval()


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    return load_npz("token2wav_stream.npz")


def prompt(fx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return fx["prompt_token"], fx["prompt_feat"], fx["embedding"]


def maxdiff(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


class RecordingFlow:
    """Passes every flow call through and records (n_tokens, streaming, finalize, mel)."""

    def __init__(self, flow):
        self.flow, self.calls = flow, []

    def __getattr__(self, name):
        return getattr(self.flow, name)

    def inference(self, **kw):
        mel = self.flow.inference(**kw)
        self.calls.append((kw["token"].shape[1], kw["streaming"], kw["finalize"], mel))
        return mel


class ReplaySource(Token2Wav):
    """Vocodes with given sources instead of fresh random ones, recording what HiFT was fed."""

    def __init__(self, flow, hift, sources: list[torch.Tensor]):
        super().__init__(flow, hift)
        self.sources, self.fed = sources, []

    def _vocode(self, stream, mel, cache_source):
        source = self.sources[len(self.fed)].reshape(1, 1, -1).clone()
        if cache_source is not None:
            assert torch.equal(source[..., : cache_source.shape[-1]], cache_source)
        speech = self.hift.decode(mel, source)
        self.fed.append((mel, None if cache_source is None else cache_source.shape[-1], source, speech))
        return speech, source


class RecordingSource(Token2Wav):
    def __init__(self, flow, hift):
        super().__init__(flow, hift)
        self.fed = []

    def _vocode(self, stream, mel, cache_source):
        speech, source = super()._vocode(stream, mel, cache_source)
        self.fed.append((mel, source))
        return speech, source


@pytest.mark.parity
def test_exact_mode_reproduces_official_chunk_loop(models, fx):
    flow, hift = models
    rec = RecordingFlow(flow)
    sources = [torch.from_numpy(fx[f"chunk{i}_hift_source"]) for i in range(3)]
    t2w = ReplaySource(rec, hift, sources)
    t2w.open("u1", *prompt(fx), mode="exact")
    t2w.push("u1", fx["tokens"])
    out = t2w.pull("u1") + t2w.pull("u1", finished=True)
    assert int(fx["n_chunks"]) == len(out) == len(rec.calls) == 3
    for i, (n_tokens, streaming, finalize, mel) in enumerate(rec.calls):
        assert n_tokens == fx[f"chunk{i}_n_tokens"]
        assert streaming == bool(fx[f"chunk{i}_streaming"])
        assert finalize == bool(fx[f"chunk{i}_finalize"])
        assert maxdiff(mel[0], fx[f"chunk{i}_flow_mel"]) <= ATOL
        mel_in, cache_len, _, speech = t2w.fed[i]
        assert maxdiff(mel_in[0], fx[f"chunk{i}_hift_mel_in"]) <= ATOL
        assert (cache_len or 0) == fx[f"chunk{i}_hift_cache_source_len"]
        assert maxdiff(speech[0], fx[f"chunk{i}_hift_speech_raw"]) <= ATOL
        assert maxdiff(out[i], fx[f"chunk{i}_out"]) <= ATOL
    assert sum(len(o) for o in out) == 960 * len(fx["tokens"])
    assert t2w.active_streams() == []


@pytest.mark.parity
def test_non_streaming_matches_official(models, fx):
    flow, hift = models
    rec = RecordingFlow(flow)
    t2w = ReplaySource(rec, hift, [torch.from_numpy(fx["nonstream_hift_source"])])
    audio = t2w.token2wav(fx["tokens"], *prompt(fx))
    assert [(n, s, f) for n, s, f, _ in rec.calls] == [(160, False, True)]
    assert maxdiff(rec.calls[0][3][0], fx["nonstream_flow_mel"]) <= ATOL
    assert maxdiff(audio, fx["nonstream_out"]) <= ATOL


def test_window_and_fade(fx):
    window = hamming_window()
    assert maxdiff(window, fx["speech_window"]) == 0
    new, old = torch.ones(1, 8000), torch.full((1, 5000), 2.0)
    faded = fade_in_out(new, old, window)
    assert torch.allclose(faded[0, :3840], window[:3840] + 2 * window[3840:])
    assert torch.equal(faded[0, 3840:], new[0, 3840:])
    assert torch.equal(new, torch.ones(1, 8000))  # inputs untouched


def _stream(t2w, uuid, tokens, fx, mode, seed, piece=7, **kw) -> list[np.ndarray]:
    t2w.open(uuid, *prompt(fx), mode=mode, seed=seed, **kw)
    out = []
    for k in range(0, len(tokens), piece):
        t2w.push(uuid, tokens[k : k + piece])
        out += t2w.pull(uuid)
    return out + t2w.pull(uuid, finished=True)


def test_cached_mode_equals_chunk_causal_recompute_400_tokens(models, fx):
    """Same mel to float round-off, and the same audio when HiFT is given the same sources (the
    sources themselves come from the f0 predictor, which amplifies round-off: see the report)."""
    flow, hift = models
    tokens = np.random.default_rng(0).integers(0, 6561, size=400)
    # Larger later hops than the default keep the O(n^2) recompute reference affordable in a test:
    # hops 25 + 5, 100, 200, then the final 70 tokens.
    schedule = HopSchedule(first=25, growth=4, max=200)
    cached = RecordingSource(flow, hift)
    out_cached = _stream(cached, "c", tokens, fx, "cached", seed=11, schedule=schedule)
    recompute = ReplaySource(flow, hift, [source for _, source in cached.fed])
    out_recompute = _stream(recompute, "r", tokens, fx, "recompute", seed=11, schedule=schedule)
    expected = [30 * 960 - 3840, 100 * 960, 200 * 960, 70 * 960 + 3840]
    assert [len(o) for o in out_cached] == [len(o) for o in out_recompute] == expected
    assert sum(len(o) for o in out_cached) == 960 * 400
    for (mel_c, _), (mel_r, *_) in zip(cached.fed, recompute.fed, strict=True):
        assert maxdiff(mel_c, mel_r) <= ATOL
    for a, b in zip(out_cached, out_recompute, strict=True):
        assert maxdiff(a, b) <= ATOL
    assert cached.active_streams() == recompute.active_streams() == []


def test_same_seed_same_audio_and_seed_matters(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    tokens = fx["tokens"][:40]
    a = np.concatenate(_stream(t2w, "a", tokens, fx, "cached", seed=5))
    b = np.concatenate(_stream(t2w, "b", tokens, fx, "cached", seed=5))
    c = np.concatenate(_stream(t2w, "c", tokens, fx, "cached", seed=6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hop_schedule_is_per_request(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    tokens = fx["tokens"][:100]
    first = [len(o) for o in _stream(t2w, "x", tokens, fx, "cached", seed=1)]
    second = [len(o) for o in _stream(t2w, "y", tokens, fx, "cached", seed=1)]
    # prompt 20 -> pad 5: hops 30, 50, then the rest (20 tokens < 100 + 3) in the final flush
    assert first == second == [30 * 960 - 3840, 50 * 960, 20 * 960 + 3840]
    # first 50 -> pad 30 -> hop 80; then 20 tokens < 50 + 3 remain for the flush
    custom = [len(o) for o in _stream(t2w, "z", tokens, fx, "exact", seed=1,
                                      schedule=HopSchedule(first=50, growth=1, max=50))]
    assert custom == [80 * 960 - 3840, 20 * 960 + 3840]


def test_hop_schedule_values_and_validation():
    s = HopSchedule()
    assert (s.prompt_pad(20), s.prompt_pad(25), s.prompt_pad(0), s.prompt_pad(76)) == (5, 0, 0, 24)
    assert [s.next(h) for h in (25, 50, 100)] == [50, 100, 100]
    with pytest.raises(ValueError):
        HopSchedule(first=0)
    with pytest.raises(ValueError):
        HopSchedule(first=50, max=25)


def test_incremental_pushes_equal_one_push(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    tokens = fx["tokens"][:60]
    piecewise = _stream(t2w, "p", tokens, fx, "cached", seed=2, piece=3)
    at_once = _stream(t2w, "q", tokens, fx, "cached", seed=2, piece=len(tokens))
    assert len(piecewise) == len(at_once)
    assert all(np.array_equal(a, b) for a, b in zip(piecewise, at_once, strict=True))


def test_caches_freed_on_finish_and_on_cancel(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    t2w.open("done", *prompt(fx), seed=0)
    t2w.open("cancel", *prompt(fx), seed=0)
    assert sorted(t2w.active_streams()) == ["cancel", "done"]
    for uuid in ("done", "cancel"):
        t2w.push(uuid, fx["tokens"][:40])
        assert len(t2w.pull(uuid)) == 1
    stream = t2w._streams["cancel"]
    assert t2w.stream_nbytes("cancel") > 0 and stream.flow_stream is not None
    t2w.pull("done", finished=True)
    assert t2w.active_streams() == ["cancel"]
    t2w.close("cancel")
    t2w.close("cancel")  # idempotent
    assert t2w.active_streams() == []
    assert stream.closed and stream.flow_stream is None and stream.mel_cache is None
    with pytest.raises(KeyError):
        t2w.push("cancel", [1, 2, 3])
    with pytest.raises(KeyError):
        t2w.pull("done")


def test_concurrent_streams_equal_each_alone(models, fx):
    flow, hift = models
    tokens = {"s1": fx["tokens"][:40], "s2": fx["tokens"][100:145]}
    alone = {u: np.concatenate(_stream(Token2Wav(flow, hift), u, t, fx, "cached", seed=9)) for u, t in tokens.items()}
    shared = Token2Wav(flow, hift)
    results, errors = {}, []

    def run(uuid):
        try:
            results[uuid] = np.concatenate(_stream(shared, uuid, tokens[uuid], fx, "cached", seed=9, piece=5))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(u,)) for u in tokens]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for u in tokens:
        assert np.array_equal(results[u], alone[u])
    assert shared.active_streams() == []


def test_speed_stretches_mel(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    tokens = fx["tokens"][:20]
    normal = t2w.token2wav(tokens, *prompt(fx), seed=0)
    fast = t2w.token2wav(tokens, *prompt(fx), speed=1.5, seed=0)
    slow = t2w.token2wav(tokens, *prompt(fx), speed=0.7, seed=0)
    assert len(normal) == 960 * 20
    assert len(fast) == 480 * int(40 / 1.5) and len(slow) == 480 * int(40 / 0.7)
    with pytest.raises(ValueError):
        t2w.token2wav(tokens, *prompt(fx), speed=0)


def test_bad_requests(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    with pytest.raises(ValueError, match="mode"):
        t2w.open("m", *prompt(fx), mode="fast")
    with pytest.raises(ValueError, match="multiples"):
        t2w.open("m", *prompt(fx), schedule=HopSchedule(first=10, max=40))
    t2w.open("m", *prompt(fx))
    with pytest.raises(ValueError, match="already open"):
        t2w.open("m", *prompt(fx))
    with pytest.raises(KeyError):
        t2w.push("nobody", [1])
    with pytest.raises(ValueError):
        t2w.open("n", np.zeros((2, 3), dtype=np.int64), *prompt(fx)[1:])
    assert t2w.pull("m", finished=True) == []  # no tokens: nothing to say, stream freed
    assert t2w.active_streams() == []


class Gate(Token2Wav):
    """Blocks inside the vocoder until released, to interleave other threads deterministically."""

    def __init__(self, flow, hift):
        super().__init__(flow, hift)
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0

    def _vocode(self, stream, mel, cache_source):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(30)
        return super()._vocode(stream, mel, cache_source)


def _pull_in_thread(t2w, uuid, result: dict) -> threading.Thread:
    def run():
        try:
            result["out"] = t2w.pull(uuid)
        except Exception as exc:  # surfaced by the caller
            result["error"] = exc

    th = threading.Thread(target=run)
    th.start()
    return th


def test_push_does_not_wait_for_a_running_pull(models, fx):
    flow, hift = models
    t2w = Gate(flow, hift)
    t2w.open("g", *prompt(fx), seed=0)
    t2w.push("g", fx["tokens"][:33])
    result: dict = {}
    th = _pull_in_thread(t2w, "g", result)
    assert t2w.entered.wait(30)
    t2w.push("g", fx["tokens"][33:100])  # would deadlock here if push took the compute lock
    t2w.release.set()
    th.join(30)
    assert "error" not in result
    # the running pull saw the new tokens too: chunks of 30 and 50 tokens
    assert [len(o) for o in result["out"]] == [30 * 960 - 3840, 50 * 960]
    assert len(np.concatenate(result["out"] + t2w.pull("g", finished=True))) == 960 * 100


def test_close_during_pull_stops_after_the_current_chunk(models, fx):
    flow, hift = models
    t2w = Gate(flow, hift)
    t2w.open("k", *prompt(fx), seed=0)
    t2w.push("k", fx["tokens"])  # enough for two chunks
    result: dict = {}
    th = _pull_in_thread(t2w, "k", result)
    assert t2w.entered.wait(30)
    closer = threading.Thread(target=t2w.close, args=("k",))
    closer.start()
    while t2w.active_streams():  # close removes the stream at once, then waits for the chunk
        threading.Event().wait(0.01)
    t2w.release.set()
    th.join(30)
    closer.join(30)
    assert "error" not in result and len(result["out"]) == 1 and t2w.calls == 1
    with pytest.raises(KeyError):
        t2w.pull("k")


class RecordingMels(Token2Wav):
    """Records the mel of every job, per stream."""

    def __init__(self, flow, hift):
        super().__init__(flow, hift)
        self.mels: dict = {}

    def _vocode_jobs(self, jobs, mels):
        for job in jobs:
            self.mels.setdefault(job.uuid, []).append(mels[id(job)].clone())
        return super()._vocode_jobs(jobs, mels)


def test_jobs_of_several_streams_run_together_equal_each_stream_alone(models, fx):
    """Streams at different points, with different prompts and seeds: every call runs the next
    chunk of each in one `run` (their flow one 25-token chunk per round for all at once, chunks of
    as many frames in one vocoder call, each delivered when done); every chunk's mel equals the
    stream's solo mel, and its audio length the solo one."""
    flow, hift = models
    rng = np.random.default_rng(3)
    cases = []
    for k, n_prompt in enumerate((20, 14, 20, 8)):
        tokens = rng.integers(0, 6561, size=160 + 20 * k)
        p_tok, p_feat, emb = fx["prompt_token"][:n_prompt], fx["prompt_feat"][: 2 * n_prompt], fx["embedding"]
        cases.append((f"s{k}", tokens, (p_tok, p_feat, emb), 100 + k))
    solo = RecordingMels(flow, hift)
    expected = {}
    for uuid, tokens, p, seed in cases:
        solo.open(uuid, *p, seed=seed)
        solo.push(uuid, tokens)
        expected[uuid] = solo.pull(uuid) + solo.pull(uuid, finished=True)

    batched = RecordingMels(flow, hift)
    got: dict[str, list] = {uuid: [] for uuid, *_ in cases}
    for uuid, tokens, p, seed in cases:
        batched.open(uuid, *p, seed=seed)
        batched.push(uuid, tokens)
    sizes, delivered = [], []
    while batched.active_streams():
        jobs = [batched.next_job(uuid, finished=True) for uuid in batched.active_streams()]
        sizes.append(len(jobs))
        chunks = batched.run(jobs, lambda job, chunk: delivered.append((job.uuid, chunk)))
        for job, chunk in zip(jobs, chunks, strict=True):
            if chunk is not None:
                got[job.uuid].append(chunk)
    assert max(sizes) == len(cases) and batched.active_streams() == []
    assert sum(chunk is not None for _, chunk in delivered) == sum(len(c) for c in got.values())
    for uuid, chunks in expected.items():
        assert [len(c) for c in got[uuid]] == [len(c) for c in chunks], uuid
        assert len(batched.mels[uuid]) == len(solo.mels[uuid])
        for a, b in zip(batched.mels[uuid], solo.mels[uuid], strict=True):
            assert maxdiff(a, b) <= ATOL, uuid


def test_chunks_vocoded_together_equal_each_alone(models):
    """The vocoder on chunks of several streams at once, each with its own noise and source cache:
    given the same mel, each stream's audio and source equal what it gets alone (the excitation is
    computed per stream: integrated from f0, it would turn float round-off into phase drift)."""
    flow, hift = models
    g = torch.Generator().manual_seed(7)
    mels = [torch.randn(1, 80, 108, generator=g) * 2 - 5 for _ in range(3)]
    caches = [torch.randn(1, 1, 3840, generator=g) * 0.1 for _ in range(3)]
    together, _ = hift.inference(torch.cat(mels), torch.cat(caches),
                                 generator=[torch.Generator().manual_seed(k) for k in range(3)])
    for k in range(3):
        alone, _ = hift.inference(mels[k], caches[k], generator=torch.Generator().manual_seed(k))
        assert maxdiff(together[k], alone[0]) <= ATOL
