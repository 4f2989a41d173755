"""Streaming token2wav: the official chunk loop (token2wav_stream.npz), the constant-cost mode, and
the per-UUID lifecycle (hop schedule per request, caches freed, concurrent streams)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.checkpoint import load_state_dict, load_strict
from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig
from cosyvoice.hift import HiFTConfig, HiFTGenerator, load_hift_state_dict
from cosyvoice.token2wav import HopSchedule, Rounds, Token2Wav, fade_in_out, hamming_window
from tests.conftest import load_npz, reference_file, tiny_json

torch.set_num_threads(1)
ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> tuple[CausalMaskedDiffWithXvec, HiFTGenerator]:
    return tiny_models()


def tiny_models() -> tuple[CausalMaskedDiffWithXvec, HiFTGenerator]:
    """The reference set's tiny flow and HiFT."""
    cfg = tiny_json()
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


def tokens_of(fx, n: int) -> np.ndarray:
    """n of the set's speech tokens (repeated if it has fewer): the behaviour tests need token
    counts of their own, whatever the set's length."""
    return np.resize(fx["tokens"], n)


def prompt_sizes(fx) -> tuple[int, int, int, int]:
    """Four prompt lengths cut from the set's prompt (20, 14, 20, 8 for a 20-token prompt): whole,
    not a multiple of the chunk, whole again, short."""
    n = len(fx["prompt_token"])
    return n, max(1, 7 * n // 10), n, max(1, 2 * n // 5)


def official_schedule() -> HopSchedule:
    """The official hop schedule from the set's streaming constants (token_hop_len, doubling by
    stream_scale_factor up to token_max_hop_len)."""
    st = tiny_json()["streaming"]
    return HopSchedule(
        first=st["token_hop_len"], growth=st["stream_scale_factor"], max=st["token_max_hop_len"]
    )


def source_cache_len() -> int:
    """Samples of the vocoder's source cache and cross-fade (3840)."""
    return int(tiny_json()["streaming"]["source_cache_len"])


def samples_per_token(flow, hift) -> int:
    """Audio samples per speech token (960): mel frames per token x samples per frame."""
    return flow.cfg.token_mel_ratio * hift.cfg.upsample_scale


def official_hops(
    n_prompt: int, n_tokens: int, schedule: HopSchedule, lookahead: int
) -> tuple[list[int], int]:
    """The official chunk loop's hops for a request, computed here without Token2Wav: the first
    hop is padded so that prompt + hop is a multiple of ``schedule.first``; a chunk is cut while
    tokens - offset >= hop + lookahead, the hop growing by ``growth`` up to ``max``.  Returns the
    hops and the tokens left for the final call."""
    pad = -(-n_prompt // schedule.first) * schedule.first - n_prompt
    hops: list[int] = []
    offset, base = 0, schedule.first
    while n_tokens - offset >= (hop := base + (0 if hops else pad)) + lookahead:
        hops.append(hop)
        offset += hop
        base = min(schedule.max, base * schedule.growth)
    return hops, n_tokens - offset


def chunk_lengths(hops: list[int], rest: int, per_token: int, cache: int) -> list[int]:
    """Samples of every emitted chunk: a non-final chunk holds back its last ``cache`` samples,
    which the next one starts with (cross-faded)."""
    lengths = [hop * per_token for hop in hops] + [rest * per_token]
    if hops:
        lengths[0] -= cache
        lengths[-1] += cache
    return lengths


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
    n_chunks, n_tokens_all = int(fx["n_chunks"]), len(fx["tokens"])
    assert f"chunk{n_chunks - 1}_out" in fx and f"chunk{n_chunks}_out" not in fx
    # The recorded chunk boundaries are those of the official schedule (checks the helper the
    # behaviour tests below compute their expectations with).
    la = flow.cfg.pre_lookahead_len
    hops, rest = official_hops(len(fx["prompt_token"]), n_tokens_all, official_schedule(), la)
    ends = [sum(hops[: i + 1]) + la for i in range(len(hops))] + [n_tokens_all]
    assert [int(fx[f"chunk{i}_n_tokens"]) for i in range(n_chunks)] == ends
    assert [len(fx[f"chunk{i}_out"]) for i in range(n_chunks)] == chunk_lengths(
        hops, rest, samples_per_token(flow, hift), source_cache_len()
    )
    rec = RecordingFlow(flow)
    sources = [torch.from_numpy(fx[f"chunk{i}_hift_source"]) for i in range(n_chunks)]
    t2w = ReplaySource(rec, hift, sources)
    t2w.open("u1", *prompt(fx), mode="exact", schedule=official_schedule())
    t2w.push("u1", fx["tokens"])
    out = t2w.pull("u1") + t2w.pull("u1", finished=True)
    assert n_chunks == len(out) == len(rec.calls)
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
    assert sum(len(o) for o in out) == samples_per_token(flow, hift) * n_tokens_all
    assert t2w.active_streams() == []


@pytest.mark.parity
def test_non_streaming_matches_official(models, fx):
    flow, hift = models
    rec = RecordingFlow(flow)
    t2w = ReplaySource(rec, hift, [torch.from_numpy(fx["nonstream_hift_source"])])
    audio = t2w.token2wav(fx["tokens"], *prompt(fx))
    assert [(n, s, f) for n, s, f, _ in rec.calls] == [(len(fx["tokens"]), False, True)]
    assert maxdiff(rec.calls[0][3][0], fx["nonstream_flow_mel"]) <= ATOL
    assert maxdiff(audio, fx["nonstream_out"]) <= ATOL


def test_window_and_fade(fx):
    window = hamming_window()
    assert maxdiff(window, fx["speech_window"]) == 0
    n = window.shape[0] // 2  # the cross-fade length
    new, old = torch.ones(1, n + 4160), torch.full((1, n + 1160), 2.0)
    faded = fade_in_out(new, old, window)
    assert torch.allclose(faded[0, :n], window[:n] + 2 * window[n:])
    assert torch.equal(faded[0, n:], new[0, n:])
    assert torch.equal(new, torch.ones(1, n + 4160))  # inputs untouched


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
    # (a 20-token prompt) hops 25 + 5, 100, 200, then the final 70 tokens.
    schedule = HopSchedule(first=25, growth=4, max=200)
    cached = RecordingSource(flow, hift)
    out_cached = _stream(cached, "c", tokens, fx, "cached", seed=11, schedule=schedule)
    recompute = ReplaySource(flow, hift, [source for _, source in cached.fed])
    out_recompute = _stream(recompute, "r", tokens, fx, "recompute", seed=11, schedule=schedule)
    per_token = samples_per_token(flow, hift)
    hops, rest = official_hops(len(fx["prompt_token"]), len(tokens), schedule, flow.cfg.pre_lookahead_len)
    assert len(hops) >= 3
    expected = chunk_lengths(hops, rest, per_token, source_cache_len())
    assert [len(o) for o in out_cached] == [len(o) for o in out_recompute] == expected
    assert sum(len(o) for o in out_cached) == per_token * 400
    for (mel_c, _), (mel_r, *_) in zip(cached.fed, recompute.fed, strict=True):
        assert maxdiff(mel_c, mel_r) <= ATOL
    for a, b in zip(out_cached, out_recompute, strict=True):
        assert maxdiff(a, b) <= ATOL
    assert cached.active_streams() == recompute.active_streams() == []


def test_same_seed_same_audio_and_seed_matters(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    tokens = tokens_of(fx, 40)
    a = np.concatenate(_stream(t2w, "a", tokens, fx, "cached", seed=5))
    b = np.concatenate(_stream(t2w, "b", tokens, fx, "cached", seed=5))
    c = np.concatenate(_stream(t2w, "c", tokens, fx, "cached", seed=6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hop_schedule_is_per_request(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    n_prompt, la = len(fx["prompt_token"]), flow.cfg.pre_lookahead_len
    per_token, cache = samples_per_token(flow, hift), source_cache_len()
    default = HopSchedule()
    pad = default.prompt_pad(n_prompt)
    n = max(100, pad + 3 * default.first + la + 1)  # two hops and a rest, whatever the prompt
    tokens = tokens_of(fx, n)
    first = [len(o) for o in _stream(t2w, "x", tokens, fx, "cached", seed=1)]
    second = [len(o) for o in _stream(t2w, "y", tokens, fx, "cached", seed=1)]
    # (prompt 20 -> pad 5) hops 30, 50, then the rest (20 tokens < 100 + 3) in the final flush
    hops, rest = official_hops(n_prompt, n, default, la)
    assert len(hops) == 2 and rest > 0
    assert first == second == chunk_lengths(hops, rest, per_token, cache)
    # (first 50 -> pad 30 -> hop 80; then 20 tokens < 50 + 3 remain for the flush)
    custom_schedule = HopSchedule(first=50, growth=1, max=50)
    custom = [len(o) for o in _stream(t2w, "z", tokens, fx, "exact", seed=1, schedule=custom_schedule)]
    assert custom == chunk_lengths(*official_hops(n_prompt, n, custom_schedule, la), per_token, cache)


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
    tokens = tokens_of(fx, 60)
    piecewise = _stream(t2w, "p", tokens, fx, "cached", seed=2, piece=3)
    at_once = _stream(t2w, "q", tokens, fx, "cached", seed=2, piece=len(tokens))
    assert len(piecewise) == len(at_once)
    assert all(np.array_equal(a, b) for a, b in zip(piecewise, at_once, strict=True))


def test_caches_freed_on_finish_and_on_cancel(models, fx):
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    la = flow.cfg.pre_lookahead_len
    hops, _ = official_hops(len(fx["prompt_token"]), 10**6, HopSchedule(), la)
    tokens = tokens_of(fx, hops[0] + la + 7)  # one chunk and a few tokens (40 for a 20-token prompt)
    t2w.open("done", *prompt(fx), seed=0)
    t2w.open("cancel", *prompt(fx), seed=0)
    assert sorted(t2w.active_streams()) == ["cancel", "done"]
    for uuid in ("done", "cancel"):
        t2w.push(uuid, tokens)
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
    tokens = {"s1": tokens_of(fx, 40), "s2": tokens_of(fx, 145)[100:]}
    alone = {
        u: np.concatenate(_stream(Token2Wav(flow, hift), u, t, fx, "cached", seed=9))
        for u, t in tokens.items()
    }
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
    tokens = tokens_of(fx, 20)
    normal = t2w.token2wav(tokens, *prompt(fx), seed=0)
    fast = t2w.token2wav(tokens, *prompt(fx), speed=1.5, seed=0)
    slow = t2w.token2wav(tokens, *prompt(fx), speed=0.7, seed=0)
    frames, scale = flow.cfg.token_mel_ratio * 20, hift.cfg.upsample_scale  # 40 mel frames, 480 samples each
    assert len(normal) == samples_per_token(flow, hift) * 20 == scale * frames
    assert len(fast) == scale * int(frames / 1.5) and len(slow) == scale * int(frames / 0.7)
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


def two_chunks(flow, fx) -> tuple[int, int, list[int]]:
    """Tokens for exactly one chunk (33 for a 20-token prompt), for exactly two (83), and the
    first two hops (30, 50) of the default schedule."""
    la = flow.cfg.pre_lookahead_len
    hops, _ = official_hops(len(fx["prompt_token"]), 10**6, HopSchedule(), la)
    return hops[0] + la, hops[0] + hops[1] + la, hops[:2]


def test_push_does_not_wait_for_a_running_pull(models, fx):
    flow, hift = models
    one, two, hops = two_chunks(flow, fx)
    tokens = tokens_of(fx, two)
    per_token = samples_per_token(flow, hift)
    t2w = Gate(flow, hift)
    t2w.open("g", *prompt(fx), seed=0)
    t2w.push("g", tokens[:one])
    result: dict = {}
    th = _pull_in_thread(t2w, "g", result)
    assert t2w.entered.wait(30)
    t2w.push("g", tokens[one:])  # would deadlock here if push took the compute lock
    t2w.release.set()
    th.join(30)
    assert "error" not in result
    # the running pull saw the new tokens too: chunks of the first two hops (30 and 50 tokens)
    assert [len(o) for o in result["out"]] == [hops[0] * per_token - source_cache_len(), hops[1] * per_token]
    assert len(np.concatenate(result["out"] + t2w.pull("g", finished=True))) == per_token * two


def test_close_during_pull_stops_after_the_current_chunk(models, fx):
    flow, hift = models
    t2w = Gate(flow, hift)
    t2w.open("k", *prompt(fx), seed=0)
    t2w.push("k", tokens_of(fx, two_chunks(flow, fx)[1]))  # enough for two chunks
    result: dict = {}
    th = _pull_in_thread(t2w, "k", result)
    assert t2w.entered.wait(30)
    stream = t2w._get("k")
    closer = threading.Thread(target=t2w.close, args=("k",))
    closer.start()
    while not stream.cancelled:  # close cancels at once, then waits for the chunk
        threading.Event().wait(0.01)
    assert t2w.active_streams() == ["k"]  # its place is held until its state is freed
    t2w.release.set()
    th.join(30)
    closer.join(30)
    assert "error" not in result and len(result["out"]) == 1 and t2w.calls == 1
    assert t2w.active_streams() == []
    with pytest.raises(KeyError):
        t2w.pull("k")


class RecordingMels(Token2Wav):
    """Records the mel of every job, per stream."""

    def __init__(self, flow, hift, **kwargs):
        super().__init__(flow, hift, **kwargs)
        self.mels: dict = {}

    def _vocode_jobs(self, jobs, mels, on_group=None):
        for job in jobs:
            self.mels.setdefault(job.uuid, []).append(mels[id(job)].clone())
        return super()._vocode_jobs(jobs, mels, on_group)


def test_jobs_of_several_streams_run_together_equal_each_stream_alone(models, fx):
    """Streams at different points, with different prompts and seeds: every call runs the next
    chunk of each in one `run` (their flow one 25-token chunk per round for all at once, chunks of
    as many frames in one vocoder call, each delivered when done); every chunk's mel equals the
    stream's solo mel, and its audio length the solo one."""
    flow, hift = models
    rng = np.random.default_rng(3)
    cases = []
    for k, n_prompt in enumerate(prompt_sizes(fx)):
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


def test_vocode_hands_out_each_call_in_the_order_given_as_soon_as_it_is_made(models, fx):
    """Chunks of different sizes are vocoded in one call per size, in the order of their first
    job: ``on_group`` gets each call's audio before the next call starts (the LM stage's vocoder
    puts first chunks first, so they need not wait behind other streams' long hops)."""
    flow, hift = models
    t2w = Token2Wav(flow, hift)
    rng = np.random.default_rng(5)
    for uuid in ("a", "b", "c"):
        t2w.open(uuid, *prompt(fx), seed=1)
        t2w.push(uuid, rng.integers(0, 6561, size=160))
    t2w.run([t2w.next_job("a")])  # "a" is past its first hop: its next chunk is longer
    jobs = [t2w.next_job(uuid) for uuid in ("b", "a", "c")]
    rounds = Rounds(t2w)
    for job in jobs:
        rounds.add(job)
    done = []
    while rounds:
        done += rounds.advance()
    done.sort(key=lambda item: ["b", "a", "c"].index(item[0].uuid))
    calls: list[list[str]] = []
    out = t2w.vocode(done, on_group=lambda group: calls.append([job.uuid for job, _ in group]))
    assert calls == [["b", "c"], ["a"]]
    assert [job.uuid for job, _ in out] == ["b", "a", "c"] and all(len(chunk) for _, chunk in out)
    for uuid in ("a", "b", "c"):
        t2w.close(uuid)


def test_chunks_vocoded_together_equal_each_alone(models):
    """The vocoder on chunks of several streams at once, each with its own noise and source cache:
    given the same mel, each stream's audio and source equal what it gets alone (the excitation is
    computed per stream: integrated from f0, it would turn float round-off into phase drift)."""
    flow, hift = models
    g = torch.Generator().manual_seed(7)
    mels = [torch.randn(1, hift.cfg.in_channels, 108, generator=g) * 2 - 5 for _ in range(3)]
    caches = [torch.randn(1, 1, source_cache_len(), generator=g) * 0.1 for _ in range(3)]
    together, _ = hift.inference(
        torch.cat(mels), torch.cat(caches), generator=[torch.Generator().manual_seed(k) for k in range(3)]
    )
    for k in range(3):
        alone, _ = hift.inference(mels[k], caches[k], generator=torch.Generator().manual_seed(k))
        assert maxdiff(together[k], alone[0]) <= ATOL
