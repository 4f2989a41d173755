"""UpsampleConformerEncoder: parity with the official encoder, REAL key layout, and the incremental
(constant cost per chunk) path against the full streaming recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cosyvoice.checkpoint import CheckpointMismatch, load_strict
from cosyvoice.flow_encoder import (
    EncoderCache,
    EncoderConfig,
    UpsampleConformerEncoder,
    chunk_mask,
    rel_position_table,
)
from tests.conftest import load_json, load_npz, reference_file, tiny_json

torch.set_num_threads(1)


def tiny_config() -> EncoderConfig:
    return EncoderConfig.from_dict(tiny_json()["flow"]["encoder"])


def chunking(enc: UpsampleConformerEncoder) -> tuple[int, int, int]:
    """(chunk tokens, lookahead tokens, frames per token) of an encoder, from its config: the
    incremental tests cut their inputs on these, never on numbers of one fixture set."""
    cfg = enc.cfg
    return cfg.static_chunk_size, cfg.pre_lookahead_len, cfg.up_stride


def small_config() -> EncoderConfig:
    """A random-weight encoder small enough for bookkeeping tests."""
    return EncoderConfig(
        input_size=16,
        output_size=16,
        attention_heads=2,
        linear_units=32,
        num_blocks=1,
        num_up_blocks=1,
        pre_lookahead_channels=16,
    )


def encoder_state(path) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("encoder."): v for k, v in load_file(str(path)).items() if k.startswith("encoder.")
    }


@pytest.fixture(scope="module")
def tiny() -> UpsampleConformerEncoder:
    enc = UpsampleConformerEncoder(tiny_config()).eval()
    load_strict(enc, encoder_state(reference_file("tiny_flow.safetensors")), "tiny flow encoder")
    return enc


@pytest.fixture(scope="module")
def xs_random(tiny) -> torch.Tensor:
    """Random token embeddings at the encoder's input width: 8 chunks and a lookahead's worth."""
    chunk, la, _ = chunking(tiny)
    return torch.randn(1, 8 * chunk + la, tiny.cfg.input_size, generator=torch.Generator().manual_seed(0))


def streaming_reference(enc, xs, end: int, final: bool, left_chunks=None) -> torch.Tensor:
    """What the official chunk loop computes for tokens [0, end): full recompute with the next
    lookahead tokens as context (none on the final chunk)."""
    la = enc.cfg.pre_lookahead_len
    ctx = None if final else xs[:, end : end + la]
    with torch.no_grad():
        h, _ = enc(xs[:, :end], torch.tensor([end]), context=ctx, streaming=True, left_chunks=left_chunks)
    return h


def run_chunks(enc, xs, sizes, left_chunks=None):
    """Feed xs chunk by chunk (true next lookahead tokens as context, none on the last); returns
    the per-chunk outputs and the cache."""
    la = enc.cfg.pre_lookahead_len
    cache = enc.new_cache(left_chunks=left_chunks)
    outs, s = [], 0
    for i, n in enumerate(sizes):
        final = i == len(sizes) - 1
        ctx = None if final else xs[:, s + n : s + n + la]
        outs.append(enc.forward_chunk(xs[:, s : s + n], ctx, cache))
        s += n
    return outs, cache


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_are_the_real_model():
    cfg = EncoderConfig()
    assert (cfg.input_size, cfg.output_size, cfg.attention_heads, cfg.linear_units) == (512, 512, 8, 2048)
    assert (cfg.num_blocks, cfg.num_up_blocks, cfg.static_chunk_size, cfg.pre_lookahead_len) == (6, 4, 25, 3)
    assert (cfg.up_stride, cfg.layer_norm_eps, cfg.embed_norm_eps) == (2, 1e-12, 1e-5)


@pytest.mark.parity
def test_config_from_tiny_dict():
    block = tiny_json()["flow"]["encoder"]
    cfg = tiny_config()
    assert (cfg.input_size, cfg.output_size, cfg.attention_heads, cfg.linear_units, cfg.num_blocks) == (
        block["input_size"],
        block["output_size"],
        block["attention_heads"],
        block["linear_units"],
        block["num_blocks"],
    )
    assert (cfg.num_up_blocks, cfg.static_chunk_size, cfg.up_stride) == (
        block["num_up_blocks"],
        block["static_chunk_size"],
        block["up_stride"],
    )
    assert cfg.pre_lookahead_channels == block["pre_lookahead_channels"]
    assert cfg.layer_norm_eps == block["layer_norm_eps_in_layers"]
    assert cfg.embed_norm_eps == block["layer_norm_eps_embed_and_after_norm"]


def test_config_from_official_yaml_block_is_the_default():
    # The `flow.encoder` arguments of the official cosyvoice2.yaml (FACTS.md section 2).
    block = dict(
        output_size=512, attention_heads=8, linear_units=2048, num_blocks=6, dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True, input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", input_size=512,
        use_cnn_module=False, macaron_style=False, static_chunk_size=25,
    )  # fmt: skip
    assert EncoderConfig.from_dict(block) == EncoderConfig()
    with pytest.raises(ValueError, match="key_bias"):
        EncoderConfig.from_dict({**block, "key_bias": False})


def test_config_rejects_unsupported_and_unknown_options():
    with pytest.raises(ValueError, match="use_cnn_module"):
        EncoderConfig.from_dict({"use_cnn_module": True})
    with pytest.raises(ValueError, match="unknown"):
        EncoderConfig.from_dict({"output_sise": 64})
    assert EncoderConfig.from_dict({"dropout_rate": 0.1, "macaron_style": False}) == EncoderConfig()


# --- layout and parity --------------------------------------------------------------------------


@pytest.mark.parity
def test_real_config_has_flow_pt_encoder_keys_and_shapes():
    shapes = load_json("real_state_dict_shapes.json")["flow.pt"]
    expected = {k.removeprefix("encoder."): tuple(v) for k, v in shapes.items() if k.startswith("encoder.")}
    with torch.device("meta"):
        enc = UpsampleConformerEncoder(EncoderConfig())
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == expected
    # 10 blocks x 19 + embed 4 + pre_lookahead 4 + up_layer 2 + up_embed 4 + after_norm 2
    assert len(ours) == 206


@pytest.mark.parity
def test_tiny_checkpoint_rejects_missing_key():
    state = encoder_state(reference_file("tiny_flow.safetensors"))
    key = f"up_encoders.{tiny_config().num_up_blocks - 1}.self_attn.pos_bias_v"  # the last block's
    del state[key]
    with pytest.raises(CheckpointMismatch, match=key):
        load_strict(UpsampleConformerEncoder(tiny_config()), state, "tiny flow encoder")


@pytest.mark.parity
@pytest.mark.parametrize("mode", ["full", "stream", "stream_ctx"])
def test_taps_match_official(tiny, mode):
    ref = load_npz("flow_encoder.npz")
    xs = torch.from_numpy(ref["xs"]).unsqueeze(0)
    n_tokens = int(ref["token_len"])
    lens = torch.tensor([n_tokens])
    # stream_ctx: the recorded call's last tokens (as many as its context tap has rows) are
    # lookahead context only, xs_lens still counting them (how flow.inference(finalize=False) calls it)
    split = xs.shape[1] - ref["stream_ctx_context_embed_x"].shape[0]
    assert 0 < split < xs.shape[1]
    kwargs = {
        "full": dict(xs=xs),
        "stream": dict(xs=xs, streaming=True),
        "stream_ctx": dict(xs=xs[:, :split], context=xs[:, split:], streaming=True),
    }[mode]
    taps: dict = {}
    with torch.no_grad():
        h, h_lens = tiny(xs_lens=lens, taps=taps, **kwargs)
    names = [
        "embed_x",
        "embed_posemb",
        "pre_lookahead",
        "encoders_out",
        "up_layer_out",
        "up_embed_x",
        "up_embed_posemb",
        "up_encoders_out",
        "h",
    ] + (["context_embed_x"] if mode == "stream_ctx" else [])
    assert sorted(taps) == sorted(names)
    for name in names:
        want = ref[f"{mode}_{name}"]
        got = taps[name][0].numpy()
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)
    stride = tiny.cfg.up_stride
    assert torch.equal(h, taps["h"]) and int(h_lens) == stride * n_tokens
    assert h.shape[1] == stride * kwargs["xs"].shape[1]


@pytest.mark.parity
def test_streaming_differs_from_full_attention():
    ref = load_npz("flow_encoder.npz")
    # The first chunk (25 tokens = 50 frames) sees the same keys either way except the lookahead;
    # later frames see more in full mode. Guards against a mask that is silently ignored.
    assert np.abs(ref["full_h"] - ref["stream_h"]).max() > 1e-2


def test_rel_position_table_rows_are_per_distance():
    table = rel_position_table(torch.arange(40, -41, -1), 64)
    ref_rows = rel_position_table(torch.tensor([40, 0, -7]), 64)
    assert torch.equal(table[[0, 40, 47]], ref_rows)
    assert torch.equal(table[40, 0::2], torch.zeros(32)) and torch.equal(table[40, 1::2], torch.ones(32))


def test_projected_positions_equal_linear_pos_of_the_full_table(tiny):
    attn = tiny.encoders[0].self_attn
    d = tiny.cfg.output_size
    T = 30
    full = attn.linear_pos(rel_position_table(torch.arange(T - 1, -T, -1), d))  # distances 29..-29
    got = attn.projected_positions(29, 29)  # [H, 59, d_k]
    assert got.shape == (tiny.cfg.attention_heads, 59, d // tiny.cfg.attention_heads)
    torch.testing.assert_close(got.transpose(0, 1).reshape(59, d), full, atol=1e-5, rtol=0)
    part = attn.projected_positions(5, 2)  # distances 5..-2
    torch.testing.assert_close(
        part.transpose(0, 1).reshape(8, d), full[T - 1 - 5 : T - 1 + 3], atol=1e-5, rtol=0
    )


def test_projected_positions_grow_and_follow_weight_changes():
    attn = UpsampleConformerEncoder(small_config()).encoders[0].self_attn

    def direct(hi, lo):
        rows = attn.linear_pos(rel_position_table(torch.arange(hi, -lo - 1, -1), 16))
        return rows.view(-1, 2, 8).transpose(0, 1)

    with torch.no_grad():
        for hi, lo in [(3, 1), (300, 2), (10, 40), (700, 260), (0, 0)]:
            torch.testing.assert_close(attn.projected_positions(hi, lo), direct(hi, lo), atol=1e-6, rtol=0)
        attn.load_state_dict({**attn.state_dict(), "linear_pos.weight": torch.randn(16, 16)})
        torch.testing.assert_close(attn.projected_positions(50, 5), direct(50, 5), atol=1e-6, rtol=0)


def test_chunk_mask_rules():
    m = chunk_mask(6, 6, 2)
    assert m.tolist()[2] == [True, True, True, True, False, False]
    left = chunk_mask(2, 6, 2, q_start=4, left_chunks=1)
    assert left.tolist() == [[False, False, True, True, True, True]] * 2


# --- incremental path ---------------------------------------------------------------------------


@pytest.mark.parity
def test_incremental_equals_streaming_recompute(tiny, xs_random):
    chunk, la, stride = chunking(tiny)
    sizes = [chunk, 2 * chunk, 4 * chunk, chunk + la]
    total = sum(sizes)
    assert total == xs_random.shape[1]
    outs, cache = run_chunks(tiny, xs_random, sizes)
    s = 0
    for i, (n, h) in enumerate(zip(sizes, outs, strict=True)):
        assert h.shape == (1, stride * n, tiny.cfg.output_size)
        ref = streaming_reference(tiny, xs_random, s + n, final=i == len(sizes) - 1)
        torch.testing.assert_close(h, ref[:, stride * s :], atol=1e-4, rtol=0)
        s += n
    assert (cache.tokens_done, cache.frames_done, cache.finished) == (total, stride * total, True)
    # With true contexts, the chunks together are the streaming encoding of the whole utterance.
    whole = streaming_reference(tiny, xs_random, total, final=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, atol=1e-4, rtol=0)


@pytest.mark.parity
def test_incremental_final_chunk_can_be_empty_or_short(tiny, xs_random):
    chunk, la, _ = chunking(tiny)
    n = 2 * chunk + la
    xs = xs_random[:, :n]
    outs, cache = run_chunks(tiny, xs, [chunk, chunk, la])
    torch.testing.assert_close(
        torch.cat(outs, dim=1), streaming_reference(tiny, xs, n, final=True), atol=1e-4, rtol=0
    )
    cache = tiny.new_cache()
    first = tiny.forward_chunk(xs[:, :chunk], xs[:, chunk : chunk + la], cache)
    empty = tiny.forward_chunk(xs[:, :0], None, cache)
    assert empty.shape == (1, 0, tiny.cfg.output_size) and cache.finished and cache.tokens_done == chunk
    torch.testing.assert_close(first, streaming_reference(tiny, xs, chunk, final=False), atol=1e-4, rtol=0)


@pytest.mark.parity
def test_left_chunks_only_changes_results_when_the_window_truncates(tiny, xs_random):
    chunk, la, stride = chunking(tiny)
    sizes = [chunk, 2 * chunk, 4 * chunk, chunk + la]
    total = sum(sizes)
    unbounded, _ = run_chunks(tiny, xs_random, sizes)
    unbounded = torch.cat(unbounded, dim=1)
    # n_chunks chunks (9): with n_chunks - 1 left chunks no query ever loses a key.
    n_chunks = -(-total // chunk)
    wide, _ = run_chunks(tiny, xs_random, sizes, left_chunks=n_chunks - 1)
    torch.testing.assert_close(torch.cat(wide, dim=1), unbounded, atol=1e-5, rtol=0)
    # 2 left chunks: the tokens of chunks 0-2 (their frames) see everything, later ones do not.
    seen = 3 * chunk * stride
    narrow, cache = run_chunks(tiny, xs_random, sizes, left_chunks=2)
    narrow = torch.cat(narrow, dim=1)
    torch.testing.assert_close(narrow[:, :seen], unbounded[:, :seen], atol=1e-5, rtol=0)
    assert (narrow[:, seen:] - unbounded[:, seen:]).abs().max() > 1e-3
    # ... and it is exactly the windowed full recompute.
    ref = streaming_reference(tiny, xs_random, total, final=True, left_chunks=2)
    torch.testing.assert_close(narrow, ref, atol=1e-4, rtol=0)
    # Only the window (at most 3 chunks incl. the current one) stays cached.
    assert cache.layers[0].length <= 3 * chunk and cache.up_layers[0].length <= 3 * chunk * stride


@pytest.mark.parity
def test_incremental_with_prompt_sized_first_chunk(tiny, xs_random):
    # FlowStream pushes a whole prompt's complete chunks first (e.g. 3 chunks), then the hops.
    chunk, la, stride = chunking(tiny)
    sizes = [3 * chunk, chunk, 4 * chunk, la]
    outs, _ = run_chunks(tiny, xs_random, sizes)
    s = 0
    for i, (n, h) in enumerate(zip(sizes, outs, strict=True)):
        ref = streaming_reference(tiny, xs_random, s + n, final=i == len(sizes) - 1)
        torch.testing.assert_close(h, ref[:, stride * s :], atol=1e-4, rtol=0)
        s += n


def test_short_context_is_zero_padded_like_forward():
    enc = UpsampleConformerEncoder(small_config()).eval()
    xs = torch.randn(1, 26, 16)
    h = enc.forward_chunk(xs[:, :25], xs[:, 25:26], enc.new_cache())
    with torch.no_grad():
        ref, _ = enc(xs[:, :25], torch.tensor([25]), context=xs[:, 25:26], streaming=True)
        no_ctx, _ = enc(xs[:, :25], torch.tensor([25]), streaming=True)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=0)
    assert (ref - no_ctx).abs().max() > 1e-4  # the one context token is really used


def test_padded_batch_keeps_padding_out_of_earlier_chunks():
    enc = UpsampleConformerEncoder(small_config()).eval()
    xs = torch.randn(2, 60, 16)
    lens = torch.tensor([60, 40])
    with torch.no_grad():
        h, h_lens = enc(xs, lens, streaming=True)
        alone, _ = enc(xs[1:, :40], torch.tensor([40]), streaming=True)
    assert h_lens.tolist() == [120, 80] and h.shape == (2, 120, 16)
    # Tokens 0..24 (frames 0..49) never see padding: chunk-causal attention, lookahead inside the row.
    torch.testing.assert_close(h[1, :50], alone[0, :50], atol=1e-5, rtol=0)


def test_cache_memory_per_token():
    assert EncoderConfig().cache_bytes_per_token() == (6 * 2 * 512 + 4 * 2 * 2 * 512) * 4 == 57344
    cfg = small_config()
    enc = UpsampleConformerEncoder(cfg).eval()
    xs = torch.randn(1, 78, 16)
    _, cache = run_chunks(enc, xs, [25, 50, 3])
    assert cache.live_nbytes() == 78 * cfg.cache_bytes_per_token()
    assert cache.nbytes() >= cache.live_nbytes()


def test_cache_survives_switching_inference_mode():
    cfg = small_config()
    enc = UpsampleConformerEncoder(cfg).eval()
    xs = torch.randn(1, 53, 16)
    cache = enc.new_cache()
    with torch.inference_mode():
        a = enc.forward_chunk(xs[:, :25], xs[:, 25:28], cache)
    b = enc.forward_chunk(xs[:, 25:50], xs[:, 50:53], cache)
    c = enc.forward_chunk(xs[:, 50:], None, cache)
    with torch.no_grad():
        ref, _ = enc(xs, torch.tensor([53]), streaming=True)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), ref, atol=1e-5, rtol=0)


def test_forward_chunk_rejects_bad_input():
    cfg = small_config()
    enc = UpsampleConformerEncoder(cfg).eval()
    xs = torch.randn(1, 60, 16)
    cache = enc.new_cache()
    with pytest.raises(ValueError, match="multiple of 25"):
        enc.forward_chunk(xs[:, :20], xs[:, 20:23], cache)
    with pytest.raises(ValueError, match="one request"):
        enc.forward_chunk(torch.randn(2, 25, 16), None, cache)
    with pytest.raises(ValueError, match="at most 3"):
        enc.forward_chunk(xs[:, :25], xs[:, 25:29], cache)
    enc.forward_chunk(xs[:, :10], None, cache)
    with pytest.raises(RuntimeError, match="finished"):
        enc.forward_chunk(xs[:, 10:35], xs[:, 35:38], cache)
    with pytest.raises(ValueError, match="left_chunks"):
        EncoderCache(left_chunks=-1)


@pytest.mark.parametrize("left_chunks", [None, 1])
def test_requests_encoded_together_equal_each_alone(tiny, left_chunks):
    """forward_chunks: three requests at different points (one at its first chunk, with no left
    lookahead yet; others several chunks in, one with a shorter context) encode a chunk each in
    one call: every request's frames equal its own forward_chunk, and its cache goes on alike."""
    chunk, la, _ = chunking(tiny)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 8 * chunk + la, tiny.cfg.input_size, generator=g) for _ in range(3)]
    done = [0, 2 * chunk, 4 * chunk]  # chunks already encoded
    contexts = [la, la, la - 1]
    alone, together = [], []
    for i in range(3):
        cache = tiny.new_cache(left_chunks=left_chunks)
        for a in range(0, done[i], chunk):  # the chunks it encoded before
            tiny.forward_chunk(xs[i][:, a : a + chunk], xs[i][:, a + chunk : a + chunk + la], cache)
        together.append(cache.clone())
        a = done[i]
        alone.append(
            tiny.forward_chunk(xs[i][:, a : a + chunk], xs[i][:, a + chunk : a + chunk + contexts[i]], cache)
        )
        alone.append(cache)
    batch = torch.cat([x[:, a : a + chunk] for x, a in zip(xs, done, strict=True)])
    ctxs = [x[:, a + chunk : a + chunk + c] for x, a, c in zip(xs, done, contexts, strict=True)]
    out = tiny.forward_chunks(batch, ctxs, together)
    for i in range(3):
        assert torch.abs(out[i : i + 1] - alone[2 * i]).max() <= 1e-5
        mine, ref = together[i], alone[2 * i + 1]
        assert (mine.tokens_done, mine.frames_done) == (ref.tokens_done, ref.frames_done)
        assert torch.equal(mine.lookahead_x, ref.lookahead_x) and torch.allclose(mine.up_state, ref.up_state)
        assert [b.length for b in mine.layers] == [b.length for b in ref.layers]
    with pytest.raises(ValueError, match="same window"):
        tiny.forward_chunks(batch[:2], ctxs[:2], [tiny.new_cache(), tiny.new_cache(left_chunks=1)])
