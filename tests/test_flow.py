"""Flow matching: estimator, CFM solver, CausalMaskedDiffWithXvec and the constant-cost FlowStream.

Parity against the official fixtures (TINY config), plus the property the streaming design rests
on: evaluating only new frames against caches gives the chunk-causal full recompute."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cosyvoice.checkpoint import load_state_dict, load_strict
from cosyvoice.flow import (
    CausalMaskedDiffWithXvec,
    FlowConfig,
    FlowStream,
    PromptStates,
    advance_together,
    cfm_noise,
    euler_schedule,
)
from cosyvoice.flow_estimator import CausalConditionalDecoder, EstimatorCache, EstimatorConfig
from tests.conftest import load_npz, reference_file, tiny_json

torch.set_num_threads(1)
TOL = 1e-4
NOISE_SHA256 = "584a26e6eaad944407a96c5999aaa5cd0a6a359309a841eade68bf805c072322"


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def maxdiff(a: torch.Tensor, b) -> float:
    return (a.detach().float() - (t(b) if isinstance(b, np.ndarray) else b)).abs().max().item()


@pytest.fixture(scope="module")
def tiny_cfg() -> FlowConfig:
    return FlowConfig.from_dict(tiny_json()["flow"])


@pytest.fixture(scope="module")
def flow(tiny_cfg) -> CausalMaskedDiffWithXvec:
    model = CausalMaskedDiffWithXvec(tiny_cfg).eval()
    load_strict(model, load_state_dict(reference_file("tiny_flow.safetensors")), "tiny flow")
    return model


@pytest.fixture(scope="module")
def estimator(flow) -> CausalConditionalDecoder:
    return flow.decoder.estimator


@pytest.fixture(scope="module")
def est_fx() -> dict[str, torch.Tensor]:
    return {k: t(v) for k, v in load_npz("flow_estimator.npz").items()}


# --- noise ------------------------------------------------------------------------------------


@pytest.mark.parity
def test_noise_matches_official_seed0_tensor_without_touching_global_rng():
    fx = load_npz("flow_inference.npz")
    cfm_noise.cache_clear()
    rng_before = torch.get_rng_state()
    noise = cfm_noise()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert noise.shape == (1, 80, 15000) and noise.dtype == torch.float32
    assert hashlib.sha256(noise.numpy().tobytes()).hexdigest() == NOISE_SHA256
    assert torch.equal(noise[0, :, :1024], t(fx["rand_noise_head"]))


def test_euler_schedule_is_cosine_grid():
    steps = euler_schedule(10)
    assert len(steps) == 10
    ts = torch.stack([s[0] for s in steps])
    grid = 1 - torch.cos(torch.linspace(0, 1, 11) * 0.5 * torch.pi)
    assert torch.allclose(ts, grid[:10], atol=1e-7)
    assert abs(sum(float(dt) for _, dt in steps) - 1.0) < 1e-6
    with pytest.raises(ValueError):
        euler_schedule(0)


# --- estimator --------------------------------------------------------------------------------


@pytest.mark.parity
def test_estimator_time_embedding(estimator, est_fx):
    with torch.no_grad():
        assert maxdiff(estimator.time_embeddings(est_fx["t"]), est_fx["sinusoidal_t"]) <= TOL
        assert maxdiff(estimator.time_embedding(est_fx["t"]), est_fx["time_emb"]) <= TOL


@pytest.mark.parity
@pytest.mark.parametrize(
    "key,mask,streaming",
    [
        ("out_nonstream", "mask", False),
        ("out_stream", "mask", True),
        ("out_padded_nonstream", "mask_padded", False),
    ],
)
def test_estimator_parity(estimator, est_fx, key, mask, streaming):
    f = est_fx
    with torch.no_grad():
        out = estimator(f["x"], f[mask], f["mu"], f["t"], f["spks"], f["cond"], streaming=streaming)
    assert maxdiff(out, f[key]) <= TOL


def test_estimator_streaming_differs_from_full_attention(estimator, est_fx):
    """Guards the parity cases above against a mask that is silently ignored."""
    assert maxdiff(est_fx["out_stream"], est_fx["out_nonstream"]) > 1e-3


def _random_inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 80, T, generator=g)
    mu = torch.randn(2, 80, T, generator=g)
    cond = torch.randn(2, 80, T, generator=g)
    spks = torch.randn(2, 80, generator=g)
    mu[1] = 0
    cond[1] = 0
    spks[1] = 0
    return x, mu, spks, cond, torch.tensor([0.42, 0.42])


@pytest.mark.parametrize(
    "splits,left_chunks", [([50, 26], None), ([100, 50, 17], None), ([150, 50, 33], 1), ([50, 50, 50, 10], 0)]
)
def test_estimator_forward_chunk_equals_full_streaming(estimator, splits, left_chunks):
    T = sum(splits)
    x, mu, spks, cond, tt = _random_inputs(T)
    with torch.no_grad():
        full = estimator(x, torch.ones(2, 1, T), mu, tt, spks, cond, streaming=True, left_chunks=left_chunks)
        cache = EstimatorCache(left_chunks)
        outs, a = [], 0
        for n in splits:
            outs.append(
                estimator.forward_chunk(
                    x[..., a : a + n], mu[..., a : a + n], tt, spks, cond[..., a : a + n], cache
                )
            )
            a += n
    assert maxdiff(torch.cat(outs, -1), full) <= TOL
    if left_chunks is not None:
        # the window bounds what is kept: at most left_chunks chunks of keys survive
        buf, *_ = cache.kv.values()
        assert buf.length <= (left_chunks + 1) * 50


def test_estimator_window_changes_output_only_beyond_window(estimator):
    T = 200
    x, mu, spks, cond, tt = _random_inputs(T, seed=1)
    ones = torch.ones(2, 1, T)
    with torch.no_grad():
        full = estimator(x, ones, mu, tt, spks, cond, streaming=True)
        win = estimator(x, ones, mu, tt, spks, cond, streaming=True, left_chunks=1)
    assert maxdiff(win[..., :100], full[..., :100]) <= TOL  # chunks 0 and 1 see everything anyway
    assert maxdiff(win[..., 100:], full[..., 100:]) > 1e-4


def test_estimator_cache_bad_paths(estimator):
    x, mu, spks, cond, tt = _random_inputs(60)
    with pytest.raises(ValueError):
        EstimatorCache(left_chunks=-1)
    cache = EstimatorCache()
    with torch.no_grad():
        estimator.forward_chunk(
            x[..., :30], mu[..., :30], tt, spks, cond[..., :30], cache
        )  # partial: last call
        assert cache.closed and cache.nbytes() > 0
        with pytest.raises(RuntimeError):
            estimator.forward_chunk(x[..., 30:], mu[..., 30:], tt, spks, cond[..., 30:], cache)
    cache.clear()
    assert cache.nbytes() == 0


def test_estimator_config_from_dict_and_rejects_unknown_layouts():
    cfg = EstimatorConfig.from_dict(
        {"channels": [64], "num_heads": 2, "attention_head_dim": 16, "dropout": 0.0}
    )
    assert cfg.channels == (64,) and cfg.num_heads == 2 and cfg.n_blocks == 4
    with pytest.raises(ValueError):
        CausalConditionalDecoder(EstimatorConfig(channels=(64, 64)))
    with pytest.raises(ValueError):
        CausalConditionalDecoder(EstimatorConfig(channels=(64,), act_fn="snakebeta"))


# --- CFM solver and full inference ------------------------------------------------------------


def _solver_inputs(flow, mu_np: np.ndarray):
    """The solver's inputs for the encoder output ``mu_np`` [2T, 80]: the prompt mel goes into the
    first ``n_prompt`` frames of cond, n_prompt being the recorded prompt_feat's frame count."""
    fx = load_npz("flow_inference.npz")
    mu = t(mu_np).T.unsqueeze(0)
    T = mu.shape[2]
    n_prompt = fx["prompt_feat"].shape[0]
    cond = torch.zeros(1, mu.shape[1], T)
    cond[:, :, :n_prompt] = t(fx["prompt_feat"]).T
    with torch.no_grad():
        spks = flow.speaker(t(fx["embedding"])[None])
    return fx, mu, torch.ones(1, 1, T), spks, cond, n_prompt


@pytest.mark.parity
def test_cfm_solver_every_euler_step(flow, tiny_cfg):
    """Fed the encoder output recorded in flow_encoder.npz (same tokens), so this isolates the solver."""
    enc = load_npz("flow_encoder.npz")
    fx, mu, mask, spks, cond, n_prompt = _solver_inputs(flow, enc["full_h_proj"])
    assert maxdiff(spks[0], fx["spk_proj"]) <= TOL
    steps = tiny_cfg.n_timesteps
    assert len(fx["nonstream_final_step_t"]) == steps  # every step was recorded
    trace: list = []
    with torch.no_grad():
        mel = flow.decoder(mu, mask, spks, cond, n_timesteps=steps, streaming=False, trace=trace)
    assert len(trace) == steps
    for k, (x, tk, out) in enumerate(trace):
        assert maxdiff(x[0], fx["nonstream_final_step_x"][k]) <= TOL, k
        assert abs(float(tk) - float(fx["nonstream_final_step_t"][k])) <= 1e-7, k
        assert maxdiff(out, fx["nonstream_final_step_est_out"][k]) <= TOL, k
    assert maxdiff(mel[0, :, n_prompt:], fx["nonstream_final_mel"]) <= TOL


@pytest.mark.parity
@pytest.mark.parametrize(
    "key,enc_key", [("stream_final_mel", "stream_h_proj"), ("stream_chunk_mel", "stream_ctx_h_proj")]
)
def test_cfm_solver_streaming(flow, tiny_cfg, key, enc_key):
    fx, mu, mask, spks, cond, n_prompt = _solver_inputs(flow, load_npz("flow_encoder.npz")[enc_key])
    with torch.no_grad():
        mel = flow.decoder(mu, mask, spks, cond, n_timesteps=tiny_cfg.n_timesteps, streaming=True)
    assert maxdiff(mel[0, :, n_prompt:], fx[key]) <= TOL


def _inference(flow, fx, streaming, finalize, token=None, n_timesteps=None):
    token = t(fx["token"])[None] if token is None else token
    prompt = t(fx["prompt_token"])[None]
    return flow.inference(
        token,
        torch.tensor([token.shape[1]]),
        prompt,
        torch.tensor([prompt.shape[1]]),
        t(fx["prompt_feat"])[None],
        torch.tensor([fx["prompt_feat"].shape[0]]),
        t(fx["embedding"])[None],
        streaming=streaming,
        finalize=finalize,
        n_timesteps=n_timesteps,
    )


@pytest.mark.parity
@pytest.mark.parametrize(
    "key,streaming,finalize",
    [
        ("nonstream_final_mel", False, True),
        ("stream_final_mel", True, True),
        ("stream_chunk_mel", True, False),
    ],
)
def test_flow_inference_parity(flow, key, streaming, finalize):
    fx = load_npz("flow_inference.npz")
    mel = _inference(flow, fx, streaming, finalize)
    assert mel.shape == (1, *fx[key].shape)
    assert maxdiff(mel[0], fx[key]) <= TOL


def test_flow_inference_fewer_steps_is_a_different_but_close_solution(flow):
    fx = load_npz("flow_inference.npz")
    ref = _inference(flow, fx, False, True)
    few = _inference(flow, fx, False, True, n_timesteps=5)
    assert few.shape == ref.shape
    assert 1e-3 < maxdiff(few, ref)
    with pytest.raises(ValueError):
        _inference(flow, fx, False, True, n_timesteps=0)


# --- FlowStream --------------------------------------------------------------------------------


def _official_hops(n_prompt: int, n_tokens: int, first: int = 25, max_hop: int = 100, lookahead: int = 3):
    """The official chunk schedule: (hop per emitted chunk, tokens left for the final call)."""
    pad = -(-n_prompt // 25) * 25 - n_prompt
    hops, offset, hop = [], 0, first
    while n_tokens - offset >= (hop if hops else hop + pad) + lookahead:
        hops.append(hop if hops else hop + pad)
        offset += hops[-1]
        hop = min(max_hop, hop * 2)
    return hops, n_tokens - offset


def _stream_case(n_tokens: int, seed: int, n_prompt: int = 10):
    fx = load_npz("flow_inference.npz")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, n_tokens), generator=g)
    prompt = torch.randint(0, 6561, (1, n_prompt), generator=g)
    prompt_feat = torch.randn(1, 2 * n_prompt, 80, generator=g) * 2 - 5
    emb = t(fx["embedding"])[None]
    return tokens, prompt, prompt_feat, emb


def _recompute(
    flow, tokens, prompt, prompt_feat, emb, streaming, finalize, n_timesteps=None, left_chunks=None
):
    return flow.inference(
        tokens,
        torch.tensor([tokens.shape[1]]),
        prompt,
        torch.tensor([prompt.shape[1]]),
        prompt_feat,
        torch.tensor([prompt_feat.shape[1]]),
        emb,
        streaming=streaming,
        finalize=finalize,
        n_timesteps=n_timesteps,
        left_chunks=left_chunks,
    )


def _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, push_step=7, **kw):
    stream = FlowStream(flow, prompt, prompt_feat, emb, **kw)
    mels, pushed = [], 0
    for hop in hops:
        while not stream.ready(hop):
            stream.push(tokens[0, pushed : pushed + push_step])
            pushed += push_step
        mels.append(stream.emit(hop))
        assert mels[-1].shape == (1, 80, 2 * hop)
    stream.push(tokens[0, pushed:])
    mels.append(stream.finish())
    return stream, mels


@pytest.mark.parametrize("n_tokens,n_prompt", [(400, 10), (140, 75)])
def test_flow_stream_equals_chunk_causal_recompute(flow, n_tokens, n_prompt):
    """The issue's proof: constant-cost streaming == official-style prefix recompute with streaming
    attention, chunk by chunk (final chunk: streaming=True, finalize=True)."""
    tokens, prompt, prompt_feat, emb = _stream_case(n_tokens, seed=n_tokens, n_prompt=n_prompt)
    hops, _ = _official_hops(n_prompt, n_tokens)
    assert len(hops) >= 2
    stream, mels = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops)
    offset = 0
    for hop, mel in zip(hops, mels, strict=False):
        ref = _recompute(flow, tokens[:, : offset + hop + 3], prompt, prompt_feat, emb, True, False)
        assert maxdiff(mel, ref[:, :, 2 * offset :]) <= TOL
        offset += hop
    ref = _recompute(flow, tokens, prompt, prompt_feat, emb, True, True)
    assert mels[-1].shape[2] == 2 * (n_tokens - offset)
    assert maxdiff(mels[-1], ref[:, :, 2 * offset :]) <= TOL
    assert sum(m.shape[2] for m in mels) == 2 * n_tokens
    assert stream.closed and stream.nbytes() == 0


def _together(items):
    """Run (stream, pieces) advances in rounds, one flow chunk per stream per round, the streams
    of a round with alike chunks in one advance_together; returns each stream's advances' mels."""
    plans = [(stream, list(pieces), []) for stream, pieces in items]
    rounds = 0
    while any(pieces for _, pieces, _ in plans):
        groups = {}
        for plan in plans:
            if plan[1]:
                groups.setdefault(plan[1][0][1], []).append(plan)
        for count, group in groups.items():
            mels = advance_together([(stream, pieces[0][0], count) for stream, pieces, _ in group])
            for (_, pieces, outs), mel in zip(group, mels, strict=True):
                pieces.pop(0)
                outs.append(mel)
        rounds += 1
    return [outs for _, _, outs in plans], rounds


def test_streams_advanced_together_equal_each_stream_alone(flow):
    """Several streams, at different points of different utterances with different prompts,
    speakers and hops, advanced one flow chunk per round, all of them in one batched call per
    Euler step: each gets exactly its solo mel (the model is chunk-causal, and each stream keeps its
    own caches)."""
    cases = [_stream_case(160, seed=s, n_prompt=p) for s, p in ((11, 10), (12, 35), (13, 60))]
    hop_lists = [_official_hops(p.shape[1], tok.shape[1])[0] for tok, p, _, _ in cases]
    solo = [_run_stream(flow, *case, hops)[1] for case, hops in zip(cases, hop_lists, strict=True)]

    streams = [FlowStream(flow, prompt, feat, emb) for _, prompt, feat, emb in cases]
    for stream, (tokens, *_rest) in zip(streams, cases, strict=True):
        stream.push(tokens[0])
    got = [[] for _ in streams]
    for step in range(max(len(h) for h in hop_lists)):  # hop k of every stream that has one, together
        active = [(i, hops[step]) for i, hops in enumerate(hop_lists) if step < len(hops)]
        outs, rounds = _together([(streams[i], streams[i].plan_emit(hop)) for i, hop in active])
        assert rounds == max(hop for _, hop in active) // 25 + (step == 0)  # first hops: prompt pad
        for (i, hop), mels in zip(active, outs, strict=True):
            got[i].append(streams[i].complete_emit(hop, mels))
    outs, _ = _together([(stream, stream.plan_finish()) for stream in streams])  # ends of any length
    for i, mels in enumerate(outs):
        got[i].append(streams[i].complete_finish(mels))
    for mine, ref in zip(got, solo, strict=True):
        assert len(mine) == len(ref)
        for a, b in zip(mine, ref, strict=True):
            assert a.shape == b.shape and maxdiff(a, b) <= TOL
    assert all(stream.closed for stream in streams)
    a, b = (FlowStream(flow, prompt, feat, emb) for _, prompt, feat, emb in cases[:2])
    with pytest.raises(ValueError, match="as many tokens"):
        advance_together([(a, None, 10), (b, None, 20)])


def test_flow_stream_final_chunk_vs_official_full_attention_final_pass(flow):
    """finish() is chunk-causal to the end; the official final call uses full attention. They are
    different computations: record that the difference exists and stays bounded (it is measured and
    reported by benchmarks/flow_chunk_cost.py)."""
    tokens, prompt, prompt_feat, emb = _stream_case(160, seed=3)
    hops, _ = _official_hops(10, 160)
    _, mels = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops)
    offset = sum(hops)
    official = _recompute(flow, tokens, prompt, prompt_feat, emb, False, True)[:, :, 2 * offset :]
    diff = maxdiff(mels[-1], official)
    assert 1e-4 < diff < 10 * official.abs().max().item()


def test_flow_stream_prompt_precompute_is_equivalent(flow):
    tokens, prompt, prompt_feat, emb = _stream_case(90, seed=5, n_prompt=60)
    hops, _ = _official_hops(60, 90)
    _, a = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, precompute_prompt=True)
    _, b = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, precompute_prompt=False)
    assert maxdiff(torch.cat(a, -1), torch.cat(b, -1)) <= TOL


def test_prompt_states_give_every_stream_of_a_voice_the_fresh_result(flow):
    """A voice's prompt runs through the flow once: later streams of that voice start from a copy
    and produce exactly the mel of a stream that computed its prompt itself, also after an earlier
    stream of the voice has run to its end (the kept state is never written through a copy)."""
    tokens, prompt, prompt_feat, emb = _stream_case(90, seed=5, n_prompt=60)
    hops, _ = _official_hops(60, 90)
    _, fresh = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops)
    states = PromptStates()
    for n in range(3):
        stream, mels = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, prompts=states)
        assert torch.equal(torch.cat(mels, -1), torch.cat(fresh, -1))
        assert stream.closed
        assert (states.misses, states.hits) == (1, n)
    assert len(states) == 1 and states.nbytes() > 0

    # another voice (another speaker embedding) is another entry, with its own result
    other_emb = emb.flip(-1)
    _, other = _run_stream(flow, tokens, prompt, prompt_feat, other_emb, hops)
    _, again = _run_stream(flow, tokens, prompt, prompt_feat, other_emb, hops, prompts=states)
    assert torch.equal(torch.cat(again, -1), torch.cat(other, -1))
    assert len(states) == 2 and states.misses == 2

    # a prompt shorter than one chunk plus lookahead has nothing to keep
    short = _stream_case(40, seed=6, n_prompt=20)
    _run_stream(flow, *short, _official_hops(20, 40)[0], prompts=states)
    assert len(states) == 2 and states.misses == 2

    # bounded in bytes: the least recently used voice goes first
    small = PromptStates(max_bytes=states.nbytes() * 3 // 4)
    _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, prompts=small)
    _run_stream(flow, tokens, prompt, prompt_feat, other_emb, hops, prompts=small)
    assert len(small) == 1 and small.nbytes() <= small.max_bytes
    _run_stream(flow, tokens, prompt, prompt_feat, other_emb, hops, prompts=small)
    assert small.hits == 1


def test_flow_stream_window_equals_windowed_recompute_and_bounds_memory(flow):
    tokens, prompt, prompt_feat, emb = _stream_case(130, seed=7)
    hops = [15, 25, 25, 25, 25]
    sizes, mels = {}, {}
    for lc in (None, 1):
        stream = FlowStream(flow, prompt, prompt_feat, emb, left_chunks=lc)
        stream.push(tokens[0])
        sizes[lc], mels[lc] = [], []
        for hop in hops:
            mels[lc].append(stream.emit(hop))
            sizes[lc].append(stream.live_nbytes())
            assert stream.nbytes() >= sizes[lc][-1]
        mels[lc].append(stream.finish())
    offset = 0
    for hop, mel in zip(hops, mels[1], strict=False):
        ref = _recompute(
            flow, tokens[:, : offset + hop + 3], prompt, prompt_feat, emb, True, False, left_chunks=1
        )
        assert maxdiff(mel, ref[:, :, 2 * offset :]) <= TOL
        offset += hop
    ref = _recompute(flow, tokens, prompt, prompt_feat, emb, True, True, left_chunks=1)
    assert maxdiff(mels[1][-1], ref[:, :, 2 * offset :]) <= TOL
    # the window changes the model (beyond the first two chunks) ...
    assert maxdiff(torch.cat(mels[1], -1), torch.cat(mels[None], -1)) > 1e-3
    # ... and bounds what is kept: unbounded grows with the utterance, windowed stops growing
    grow = {lc: s[-1] - s[-3] for lc, s in sizes.items()}
    assert grow[None] > 0
    assert sizes[1][-1] < sizes[None][-1] and grow[1] == 0


def test_flow_stream_n_timesteps_matches_recompute_with_same_steps(flow):
    tokens, prompt, prompt_feat, emb = _stream_case(60, seed=9)
    stream = FlowStream(flow, prompt, prompt_feat, emb, n_timesteps=4)
    stream.push(tokens[0])
    mel = torch.cat([stream.emit(15), stream.finish()], -1)
    ref = _recompute(flow, tokens, prompt, prompt_feat, emb, True, True, n_timesteps=4)
    assert maxdiff(mel, ref) <= TOL


def test_flow_stream_bad_paths(flow):
    tokens, prompt, prompt_feat, emb = _stream_case(60, seed=11)
    with pytest.raises(ValueError):
        FlowStream(flow, prompt, prompt_feat[:, :-1], emb)  # prompt mel must be 2 frames per token
    with pytest.raises(ValueError):
        FlowStream(flow, prompt[0], prompt_feat, emb)
    stream = FlowStream(flow, prompt, prompt_feat, emb)
    stream.push(tokens[0, :17])
    assert not stream.ready(15)  # 15 + 3 lookahead > 17
    with pytest.raises(RuntimeError):
        stream.emit(15)
    stream.push(tokens[0, 17:])
    assert stream.ready(15)
    with pytest.raises(ValueError):
        stream.emit(20)  # 10 prompt + 20 is not on a 25-token chunk boundary
    with pytest.raises(ValueError):
        stream.emit(0)
    stream.emit(15)
    stream.close()
    with pytest.raises(RuntimeError):
        stream.push([1, 2, 3])
    with pytest.raises(RuntimeError):
        stream.finish()


def test_flow_stream_survives_switching_inference_mode(flow):
    """A stream opened inside torch.inference_mode (e.g. by a serving thread) and continued outside
    it must keep working and give the same mel."""
    tokens, prompt, prompt_feat, emb = _stream_case(80, seed=13, n_prompt=35)
    ref = FlowStream(flow, prompt, prompt_feat, emb)
    ref.push(tokens[0])
    expected = torch.cat([ref.emit(15), ref.emit(25), ref.finish()], -1)
    with torch.inference_mode():
        stream = FlowStream(flow, prompt, prompt_feat, emb)
        stream.push(tokens[0])
        first = stream.emit(15)
    rest = [stream.emit(25), stream.finish()]
    assert maxdiff(torch.cat([first, *rest], -1), expected) <= TOL


def test_flow_stream_float16_kv_cache_halves_memory_at_small_error(flow):
    tokens, prompt, prompt_feat, emb = _stream_case(80, seed=17)
    out, live = {}, {}
    for dt in (None, torch.float16):
        stream = FlowStream(flow, prompt, prompt_feat, emb, kv_dtype=dt)
        stream.push(tokens[0])
        mels = [stream.emit(15), stream.emit(25), stream.emit(25)]
        live[dt] = sum(c.live_nbytes() for c in stream.est_caches)
        out[dt] = torch.cat([*mels, stream.finish()], -1)
    assert live[torch.float16] < 0.6 * live[None]  # keys/values halve; conv tails stay float32
    err = maxdiff(out[torch.float16], out[None])
    assert 0 < err < 0.05 * out[None].abs().max().item()


def test_our_mish_is_torchs_within_float_rounding_over_the_whole_range():
    """The one-exp Mish the estimator uses: within 1e-6 (relative above 1) of ``F.mish`` from
    -100 to 100, x itself where tanh(softplus(x)) rounds to 1, 0 far below, NaN kept."""
    from cosyvoice.flow_estimator import Mish

    x = torch.cat([torch.linspace(-100, 100, 200_001), torch.tensor([float("nan"), 1e30, -1e30])])
    ours, ref = Mish()(x), torch.nn.functional.mish(x)
    finite = x.abs() <= 100
    assert (((ours - ref).abs() / ref.abs().clamp(min=1))[finite]).max() <= 1e-6
    assert torch.isnan(ours[-3]) and ours[-2] == 1e30 and ours[-1] == 0


@pytest.mark.parametrize("left_chunks", [None, 0, 2])
def test_flow_stream_max_nbytes_bounds_every_stream_and_is_tight_under_a_window(flow, left_chunks):
    """Admission reserves ``max_nbytes`` per stream, so no stream may ever hold more; a long prompt
    is computed chunk by chunk, so that under a window it never holds more than the window either;
    and the bound is not loose (a windowed stream reaches nearly all of it)."""
    tokens, prompt, prompt_feat, emb = _stream_case(330, seed=11, n_prompt=160)
    bound = FlowStream.max_nbytes(flow, left_chunks)
    stream = FlowStream(flow, prompt, prompt_feat, emb, left_chunks=left_chunks)
    peak = stream.nbytes()
    stream.push(tokens[0])
    for hop in [15] + [25] * 12:
        stream.emit(hop)
        peak = max(peak, stream.nbytes())
    stream.finish()
    assert peak <= bound
    if left_chunks is not None:
        assert peak >= 0.9 * bound
    else:  # unbounded: the bound is that of a 300 s utterance, far beyond this one
        assert bound > 10 * peak
    assert FlowStream.max_nbytes(flow, 0) < FlowStream.max_nbytes(flow, 2) < FlowStream.max_nbytes(flow, None)


def test_a_lazy_prompt_is_computed_by_the_first_emit_and_kept_for_the_voice(flow):
    """``precompute_prompt="lazy"`` computes nothing at construction: the first emit's chunks
    compute the prompt (so that a batching caller interleaves them with other streams'), with the
    same result as a precompute, and the state right after the prompt is kept for the voice."""
    tokens, prompt, prompt_feat, emb = _stream_case(90, seed=5, n_prompt=60)
    hops, _ = _official_hops(60, 90)
    _, eager = _run_stream(flow, tokens, prompt, prompt_feat, emb, hops)
    states = PromptStates()
    lazy = FlowStream(flow, prompt, prompt_feat, emb, precompute_prompt="lazy", prompts=states)
    assert lazy.done_tokens == 0 and len(states) == 0
    lazy.close()
    for n in (1, 2):  # a miss computes and keeps it; the next stream of the voice restores it
        _, mels = _run_stream(
            flow, tokens, prompt, prompt_feat, emb, hops, precompute_prompt="lazy", prompts=states
        )
        assert maxdiff(torch.cat(mels, -1), torch.cat(eager, -1)) <= TOL
        assert (states.misses, states.hits, len(states)) == (2, n - 1, 1)  # (the closed one missed too)
    # the kept state is what a precompute keeps
    precomputed = PromptStates()
    FlowStream(flow, prompt, prompt_feat, emb, prompts=precomputed).close()
    (kept,), (made,) = states._states.values(), precomputed._states.values()
    assert kept.done_tokens == made.done_tokens == 50 and kept.nbytes() == made.nbytes()


@pytest.mark.parametrize("left_chunks", [0, 1, 3])
def test_estimator_slots_equal_each_streams_own_cache_at_any_position(estimator, left_chunks):
    """Streams at different chunks (one still in its first window, others past it), their slots
    in a ring of left_chunks + 1 chunks, one round padded with the spare slot, a slot reused
    after another stream: each chunk's output equals that stream alone with its own cache, and
    the last, partial chunk too."""
    from cosyvoice.flow_estimator import EstimatorSlots

    chunk = estimator.cfg.static_chunk_size
    lengths = [6 * chunk, 2 * chunk + 14, 4 * chunk + 20]
    starts = [0, 1, 3]  # round at which each stream joins
    inputs = [_random_inputs(n, seed=10 + i) for i, n in enumerate(lengths)]
    store = EstimatorSlots(estimator, 1, slots=3, left_chunks=left_chunks)
    used = store.acquire()  # a slot someone used before: stale state must not leak
    with torch.no_grad():
        x, mu, spks, cond, tt = _random_inputs(2 * chunk, seed=99)
        stale = store.batch([used], [0], chunk)
        estimator.forward_chunk(x[..., :chunk], mu[..., :chunk], tt, spks, cond[..., :chunk], stale)
    store.release(used)

    alone = []
    with torch.no_grad():
        for (x, mu, spks, cond, tt), n in zip(inputs, lengths, strict=True):
            cache, outs = EstimatorCache(left_chunks), []
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                outs.append(
                    estimator.forward_chunk(x[..., a:b], mu[..., a:b], tt, spks, cond[..., a:b], cache)
                )
            alone.append(torch.cat(outs, -1))

    slots = [store.acquire() for _ in lengths]
    done = [0] * len(lengths)
    got: list[list[torch.Tensor]] = [[] for _ in lengths]
    for r in range(12):  # a round: the joined streams with frames left, grouped by the frames they add
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            if r >= starts[i] and done[i] < n:
                groups.setdefault(min(chunk, n - done[i]), []).append(i)
        for size, group in groups.items():
            batch = store.batch([slots[i] for i in group], [done[i] for i in group], size, pad_to=4)
            pad = 4 - len(group)  # padding rows: zeros, in the spare slot

            def rows(k: int, group=group, size=size, pad=pad) -> torch.Tensor:
                parts = [inputs[i][k][..., done[i] : done[i] + size] for i in group]
                return torch.cat(parts + [torch.zeros_like(parts[0])] * pad)

            spk = torch.cat([inputs[i][2] for i in group] + [torch.zeros_like(inputs[0][2])] * pad)
            tt = torch.full((2 * (len(group) + pad),), 0.42)
            with torch.no_grad():
                out = estimator.forward_chunk(rows(0), rows(1), tt, spk, rows(3), batch)
            for k, i in enumerate(group):
                got[i].append(out[2 * k : 2 * k + 2])
                done[i] += size
    assert done == lengths
    for i in range(len(lengths)):
        assert maxdiff(torch.cat(got[i], -1), alone[i]) <= TOL, i
    assert store.free == 0 and store.nbytes() == 4 * EstimatorSlots.slot_nbytes(estimator, 1, left_chunks)


@pytest.mark.parametrize("left_chunks,fixed", [(1, False), (2, False), (2, True)])
def test_streams_in_estimator_slots_equal_streams_with_caches_of_their_own(flow, left_chunks, fixed):
    """Streams whose estimator state lives in slots of one EstimatorSlots (rings of the window's
    chunks), advanced together in rounds, with prompts computed lazily in the rounds, precomputed,
    or restored from a voice's kept state: each gets its solo mel (own caches, same window), and
    every slot is free again once the streams end.  ``fixed``: rounds of whole chunks run at
    fixed shapes, padded to a bucket (what a CUDA graph replays; eager here)."""
    from cosyvoice.flow_estimator import EstimatorSlots
    from cosyvoice.flow_graphs import FlowGraphs

    cases = [_stream_case(160, seed=s, n_prompt=p) for s, p in ((11, 10), (12, 35), (13, 60))]
    cases.append(cases[2])  # the same voice again: its prompt state comes from the kept one
    hop_lists = [_official_hops(p.shape[1], tok.shape[1])[0] for tok, p, _, _ in cases]
    solo = [
        _run_stream(flow, *case, hops, left_chunks=left_chunks)[1]
        for case, hops in zip(cases, hop_lists, strict=True)
    ]
    store = EstimatorSlots(flow.decoder.estimator, flow.cfg.n_timesteps, slots=4, left_chunks=left_chunks)
    if fixed:
        store.graphs = FlowGraphs(flow, store)
        assert store.graphs.buckets == [1, 2, 4] and not store.graphs.capture
    states = PromptStates()
    modes = [True, "lazy", True, "lazy"]
    streams = []
    for (tokens, prompt, feat, emb), mode in zip(cases, modes, strict=True):
        stream = FlowStream(
            flow,
            prompt,
            feat,
            emb,
            left_chunks=left_chunks,
            slots=store,
            prompts=states,
            precompute_prompt=mode,
        )
        stream.push(tokens[0])
        streams.append(stream)
    assert store.free == 0 and states.hits == 1  # the fourth stream restored the third's prompt
    got = [[] for _ in streams]
    for step in range(max(len(h) for h in hop_lists)):
        active = [(i, hops[step]) for i, hops in enumerate(hop_lists) if step < len(hops)]
        outs, _ = _together([(streams[i], streams[i].plan_emit(hop)) for i, hop in active])
        for (i, hop), mels in zip(active, outs, strict=True):
            got[i].append(streams[i].complete_emit(hop, mels))
    outs, _ = _together([(stream, stream.plan_finish()) for stream in streams])
    for i, mels in enumerate(outs):
        got[i].append(streams[i].complete_finish(mels))
    for mine, ref in zip(got, solo, strict=True):
        for a, b in zip(mine, ref, strict=True):
            assert a.shape == b.shape and maxdiff(a, b) <= TOL
    assert all(s.closed for s in streams) and store.free == 4
    if fixed:  # rounds of 1-4 whole chunks ran at fixed shapes (3 streams: padded to 4)
        assert store.graphs.rounds > 0 and store.graphs.replays == 0
    with pytest.raises(ValueError, match="another window"):
        FlowStream(flow, *cases[0][1:], left_chunks=left_chunks + 1, slots=store)
    held = [FlowStream(flow, *cases[0][1:], left_chunks=left_chunks, slots=store) for _ in range(4)]
    with pytest.raises(RuntimeError, match="slots is taken"):
        FlowStream(flow, *cases[0][1:], left_chunks=left_chunks, slots=store)
    held[0].close()
    assert store.free == 1


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.02), (torch.float16, 0.005)])
def test_a_half_precision_estimator_stays_close_to_float32(flow, dtype, bound):
    """compute_dtype runs the estimator under autocast (the Euler state stays float32): the mel
    moves, but by a small part of its range (TINY: bf16 0.6 %, fp16 0.08 %), per-stream caches
    and estimator slots at fixed shapes alike."""
    from cosyvoice.flow_estimator import EstimatorSlots
    from cosyvoice.flow_graphs import FlowGraphs

    tokens, prompt, prompt_feat, emb = _stream_case(200, seed=5, n_prompt=60)
    hops, _ = _official_hops(60, 200)
    ref = torch.cat(_run_stream(flow, tokens, prompt, prompt_feat, emb, hops, left_chunks=2)[1], -1)
    half = torch.cat(
        _run_stream(flow, tokens, prompt, prompt_feat, emb, hops, left_chunks=2, compute_dtype=dtype)[1], -1
    )
    store = EstimatorSlots(flow.decoder.estimator, flow.cfg.n_timesteps, slots=1, left_chunks=2)
    store.graphs = FlowGraphs(flow, store, compute_dtype=dtype)
    fixed = torch.cat(
        _run_stream(
            flow, tokens, prompt, prompt_feat, emb, hops, left_chunks=2, compute_dtype=dtype, slots=store
        )[1],
        -1,
    )
    assert store.graphs.rounds > 0
    scale = ref.abs().max().item()
    for got in (half, fixed):
        assert half.dtype == torch.float32 and 0 < maxdiff(got, ref) < bound * scale
