"""Per-chunk cost of streaming flow matching: constant-cost FlowStream vs the official full-prefix recompute.

For the chunk ending at token N (N = 25, 100, 200, 400; no prompt, 25-token hops, 3 lookahead):
- recompute: `flow.inference(tokens[:N+3], streaming=True, finalize=False)`, what the official loop
  runs for that chunk (encoder + 10 Euler steps with CFG over the whole prefix);
- ours: `FlowStream.emit(25)` after all earlier chunks were streamed (encoder chunk + 10 estimator
  chunk evaluations against per-step caches).

Also: one estimator evaluation (one Euler step, CFG batch 2, 50 new frames) at the REAL size, cached
state per second of audio (with and without a left-context window), and on the TINY model (golden
weights) the accuracy cost of a window and the distance of `finish()` (chunk-causal final chunk)
from the official final full-attention pass.

Usage: python benchmarks/flow_chunk_cost.py [--config reduced|real] [--threads 1] [--skip-accuracy]
The default (reduced) configuration runs in well under 2 minutes on 2 cores; `--config real` takes
several minutes (the recompute at token 400 alone was measured at ~154 s with the official code).
Weights are random except in the TINY accuracy section. Last line: `ratio_400_25 ours=<x> recompute=<y>`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig, FlowStream, cfm_noise  # noqa: E402
from cosyvoice.flow_encoder import EncoderConfig  # noqa: E402
from cosyvoice.flow_estimator import CausalConditionalDecoder, EstimatorCache, EstimatorConfig  # noqa: E402

POINTS = (25, 100, 200, 400)
HOP = 25
LOOKAHEAD = 3
REFERENCE = Path(REPO.parent / "shared" / "reference")


def reduced_config() -> FlowConfig:
    """Same structure as the real model (8 instead of 56 transformer blocks, half the widths)."""
    return FlowConfig(
        input_size=256,
        encoder=EncoderConfig(
            input_size=256,
            output_size=256,
            attention_heads=4,
            linear_units=1024,
            num_blocks=2,
            pre_lookahead_channels=256,
        ),
        estimator=EstimatorConfig(
            channels=(128,), attention_head_dim=32, num_heads=4, n_blocks=1, num_mid_blocks=6
        ),
    )


def build(cfg: FlowConfig) -> CausalMaskedDiffWithXvec:
    torch.manual_seed(0)
    return CausalMaskedDiffWithXvec(cfg).eval()


def inputs(n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (1, n_tokens), generator=g)
    prompt = torch.zeros(1, 0, dtype=torch.long)
    prompt_feat = torch.zeros(1, 0, 80)
    emb = torch.randn(1, 192, generator=g)
    return tokens, prompt, prompt_feat, emb


def recompute(flow, tokens, prompt, prompt_feat, emb, streaming=True, finalize=False, left_chunks=None):
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
        left_chunks=left_chunks,
    )


def _timed_emit(stream: FlowStream, hop: int, repeats: int) -> float:
    """Fastest of `repeats` emits of the same chunk (from copies of the stream's state): on a shared
    machine the minimum is the least noisy estimate of the work itself."""
    memo = {id(m): m for m in stream.flow.modules()}
    times = []
    for _ in range(repeats - 1):
        clone = copy.deepcopy(stream, memo=dict(memo))
        t0 = time.perf_counter()
        clone.emit(hop)
        times.append(time.perf_counter() - t0)
        clone.close()
    t0 = time.perf_counter()
    stream.emit(hop)
    times.append(time.perf_counter() - t0)
    return min(times)


def time_ours(flow, repeats: int, left_chunks=None) -> tuple[dict[int, float], dict[int, int]]:
    """Stream 25-token hops up to the last point; time the chunks ending at POINTS; cached bytes."""
    tokens, prompt, prompt_feat, emb = inputs(POINTS[-1] + LOOKAHEAD)
    stream = FlowStream(flow, prompt, prompt_feat, emb, left_chunks=left_chunks)
    stream.push(tokens[0])
    times, nbytes = {}, {}
    for end in range(HOP, POINTS[-1] + 1, HOP):
        if end in POINTS:
            times[end] = _timed_emit(stream, HOP, repeats)
        else:
            stream.emit(HOP)
        nbytes[end] = stream.live_nbytes()
    stream.close()
    return times, nbytes


def time_recompute(flow, repeats: int):
    tokens, prompt, prompt_feat, emb = inputs(POINTS[-1] + LOOKAHEAD)
    out = {}
    for n in POINTS:
        ts = []
        for _ in range(repeats if n <= 100 else 1):
            t0 = time.perf_counter()
            recompute(flow, tokens[:, : n + LOOKAHEAD], prompt, prompt_feat, emb)
            ts.append(time.perf_counter() - t0)
        out[n] = min(ts)
    return out


def estimator_cache_bytes_per_second(cfg: FlowConfig, n_timesteps: int = 10, bytes_per_el: int = 4) -> int:
    """Keys + values of every transformer block, both CFG rows, every Euler step, 50 frames/s."""
    est = cfg.estimator
    blocks = est.n_blocks * (2 + est.num_mid_blocks)
    per_frame = blocks * 2 * est.num_heads * est.attention_head_dim * 2 * n_timesteps * bytes_per_el
    return per_frame * 50


def encoder_cache_bytes_per_second(cfg: FlowConfig, bytes_per_el: int = 4) -> int:
    enc = cfg.encoder
    return (enc.num_blocks * 25 + enc.num_up_blocks * 50) * 2 * enc.output_size * bytes_per_el


@torch.no_grad()
def estimator_real(repeats: int = 2, with_full: bool = False) -> tuple[float, float, float]:
    """One Euler step (CFG batch 2, 50 new frames) of the REAL estimator: first chunk, the chunk
    ending at frame 800 (token 400) with an unbounded cache, and full-prefix (800 frames) streaming."""
    torch.manual_seed(0)
    est = CausalConditionalDecoder(EstimatorConfig()).eval()
    g = torch.Generator().manual_seed(0)
    T = 2 * POINTS[-1]
    x, mu, cond = (torch.randn(2, 80, T, generator=g) for _ in range(3))
    spks, t = torch.randn(2, 80, generator=g), torch.full((2,), 0.5)

    def chunk(cache, a):
        return est.forward_chunk(
            x[..., a : a + 50], mu[..., a : a + 50], t, spks, cond[..., a : a + 50], cache
        )

    first = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        chunk(EstimatorCache(), 0)
        first.append(time.perf_counter() - t0)
    # a cache as it stands before frame 750: attention cost depends only on its shapes
    cache = EstimatorCache()
    chunk(cache, 0)
    cache.frames = T - 50
    for buf in cache.kv.values():
        k = buf.k[:, :, :1].expand(-1, -1, T - 50, -1)
        buf.k = buf.v = None
        buf.start = buf.end = 0
        buf.append(torch.randn_like(k), torch.randn_like(k))
    last = []
    for _ in range(repeats):
        c = copy.deepcopy(cache, memo={id(m): m for m in est.modules()})
        t0 = time.perf_counter()
        chunk(c, T - 50)
        last.append(time.perf_counter() - t0)
    full = float("nan")
    if with_full:
        t0 = time.perf_counter()
        est(x, torch.ones(2, 1, T), mu, t, spks, cond, streaming=True)
        full = time.perf_counter() - t0
    return min(first), min(last), full


class _StreamingEstimator(torch.nn.Module):
    def __init__(self, est: CausalConditionalDecoder):
        super().__init__()
        self.est = est

    def forward(self, x, mask, mu, t, spks, cond):
        return self.est(x, mask, mu, t, spks, cond, streaming=True)


@torch.no_grad()
def estimator_onnx(threads: int, T: int = 50, repeats: int = 3) -> tuple[float, float, float]:
    """onnxruntime vs torch for one streaming evaluation of the REAL estimator on T frames (the
    whole-sequence estimator, as the official runtime exports it; random weights)."""
    import tempfile

    import onnxruntime as ort

    torch.manual_seed(0)
    est = CausalConditionalDecoder(EstimatorConfig()).eval()
    g = torch.Generator().manual_seed(0)
    names = ["x", "mask", "mu", "t", "spks", "cond"]
    args = (
        torch.randn(2, 80, T, generator=g),
        torch.ones(2, 1, T),
        torch.randn(2, 80, T, generator=g),
        torch.full((2,), 0.5),
        torch.randn(2, 80, generator=g),
        torch.randn(2, 80, T, generator=g),
    )
    timed = {"torch": [], "onnxruntime": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/estimator.onnx"
        dyn = {n: {2: "T"} for n in ("x", "mask", "mu", "cond", "out")}
        torch.onnx.export(
            _StreamingEstimator(est),
            args,
            path,
            input_names=names,
            output_names=["out"],
            dynamic_axes=dyn,
            opset_version=18,
            dynamo=False,
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
        ref = est(*args, streaming=True)
        out = torch.from_numpy(sess.run(None, feed)[0])
        for _ in range(repeats):
            t0 = time.perf_counter()
            est(*args, streaming=True)
            timed["torch"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sess.run(None, feed)
            timed["onnxruntime"].append(time.perf_counter() - t0)
    return min(timed["torch"]), min(timed["onnxruntime"]), (out - ref).abs().max().item()


@torch.no_grad()
def tiny_accuracy(windows=(1, 2, 4)) -> list[str]:
    """Golden TINY weights: window cost and finish() vs the official final full-attention pass."""
    from cosyvoice.checkpoint import load_state_dict, load_strict

    cfg = FlowConfig.from_dict(json.loads((REFERENCE / "config_tiny.json").read_text())["flow"])
    flow = CausalMaskedDiffWithXvec(cfg).eval()
    load_strict(flow, load_state_dict(REFERENCE / "tiny_flow.safetensors"), "tiny flow")
    g = torch.Generator().manual_seed(1)
    n_tok, n_prompt = 400, 20
    tokens = torch.randint(0, 6561, (1, n_tok), generator=g)
    prompt = torch.randint(0, 6561, (1, n_prompt), generator=g)
    prompt_feat = torch.randn(1, 2 * n_prompt, 80, generator=g) * 2 - 5
    emb = torch.randn(1, 192, generator=g)
    hops = [30, 50] + [100] * 3  # official schedule for a 20-token prompt: 25+5, 50, 100, ...

    def run(left_chunks, kv_dtype=None):
        s = FlowStream(flow, prompt, prompt_feat, emb, left_chunks=left_chunks, kv_dtype=kv_dtype)
        s.push(tokens[0])
        mels = [s.emit(h) for h in hops]
        peak = s.live_nbytes()
        mels.append(s.finish())
        return torch.cat(mels, -1), mels[-1], peak

    base, base_last, base_bytes = run(None)
    offset = sum(hops)
    lines = [
        f"tiny model, {n_tok} tokens + {n_prompt}-token prompt, hops {hops}, mel range "
        f"[{base.min():.2f}, {base.max():.2f}], mel std {base.std():.3f}"
    ]
    official = recompute(flow, tokens, prompt, prompt_feat, emb, streaming=False, finalize=True)
    tail = official[:, :, 2 * offset :]
    d = (base_last - tail).abs()
    lines.append(
        f"finish() vs official final full-attention pass (last {n_tok - offset} tokens): "
        f"max abs {d.max():.4f}, mean abs {d.mean():.4f}, rms {d.pow(2).mean().sqrt():.4f}"
    )
    full_d = (base - official).abs()
    lines.append(
        f"  (whole utterance, chunk-causal vs one full-attention pass: max abs {full_d.max():.4f}, "
        f"mean abs {full_d.mean():.4f})"
    )
    lines.append(f"cached state at the end, unbounded: {base_bytes / 1e6:.2f} MB")
    for lc in windows:
        mel, _, nbytes = run(lc)
        d = (mel - base).abs()
        lines.append(
            f"left_chunks={lc}: max abs {d.max():.4f}, mean abs {d.mean():.5f} vs unbounded; "
            f"cached state {nbytes / 1e6:.2f} MB"
        )
    mel, _, nbytes = run(None, torch.float16)
    d = (mel - base).abs()
    lines.append(
        f"kv_dtype=float16 (no window): max abs {d.max():.5f}, mean abs {d.mean():.6f} vs float32 cache; "
        f"cached state {nbytes / 1e6:.2f} MB"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["reduced", "real"], default="reduced")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--repeats", type=int, default=3, help="timings per point (minimum); recompute at 200/400 once"
    )
    ap.add_argument("--window", type=int, default=4, help="left_chunks for the windowed run")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="also time the REAL estimator in onnxruntime (exports ~300 MB to a temp dir)",
    )
    ap.add_argument(
        "--skip-recompute", action="store_true", help="ours only (the real-size recompute takes minutes)"
    )
    ap.add_argument("--skip-estimator-real", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfm_noise()

    cfg = reduced_config() if args.config == "reduced" else FlowConfig()
    flow = build(cfg)
    print(
        f"config={args.config} threads={args.threads} torch={torch.__version__} float32, hop {HOP} tokens, no prompt"
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        ours, nbytes = time_ours(flow, args.repeats)
        ours_w, nbytes_w = time_ours(flow, args.repeats, left_chunks=args.window)
        if args.skip_recompute:
            rec = dict.fromkeys(POINTS, float("nan"))
        else:
            rec = time_recompute(flow, args.repeats if args.config == "reduced" else 1)
    print(f"timing section: {time.perf_counter() - t0:.1f} s", flush=True)
    print(
        f"{'chunk ends at token':>20} {'ours (s)':>10} {f'ours lc={args.window}':>12} {'recompute (s)':>14} {'speed-up':>9}"
    )
    for n in POINTS:
        print(f"{n:>20} {ours[n]:>10.3f} {ours_w[n]:>12.3f} {rec[n]:>14.3f} {rec[n] / ours[n]:>8.1f}x")
    audio_s = POINTS[-1] / 25
    print(
        f"cached state after {POINTS[-1]} tokens ({audio_s:.0f} s audio): unbounded {nbytes[POINTS[-1]] / 1e6:.1f} MB "
        f"({nbytes[POINTS[-1]] / audio_s / 1e6:.2f} MB per s of audio); left_chunks={args.window}: "
        f"{nbytes_w[POINTS[-1]] / 1e6:.1f} MB (bounded)"
    )
    real = FlowConfig()
    print(
        f"REAL config, analytic cached state per second of audio (fp32): estimator "
        f"{estimator_cache_bytes_per_second(real) / 1e6:.0f} MB (10 steps x 56 blocks x K,V x 2 CFG rows), "
        f"encoder {encoder_cache_bytes_per_second(real) / 1e6:.2f} MB; with left_chunks=L the estimator keeps "
        f"at most L+1 seconds of it",
        flush=True,
    )

    if not args.skip_estimator_real:
        first, last, full = estimator_real(with_full=args.config == "real")
        print(
            f"REAL estimator, one Euler step (CFG batch 2): 50 new frames, first chunk {first:.3f} s; "
            f"chunk ending at frame 800 with cache {last:.3f} s; full streaming pass over 800 frames "
            f"{full:.2f} s  (x10 steps per chunk)",
            flush=True,
        )
    if args.onnx:
        t_torch, t_ort, err = estimator_onnx(args.threads)
        print(
            f"REAL estimator, one streaming evaluation of 50 frames (CFG batch 2): torch {t_torch:.3f} s, "
            f"onnxruntime {t_ort:.3f} s (max abs diff {err:.1e})",
            flush=True,
        )
    if not args.skip_accuracy:
        for line in tiny_accuracy():
            print(line)
    print(f"ratio_400_25 (left_chunks={args.window}) ours={ours_w[400] / ours_w[25]:.2f}")
    print(f"ratio_400_25 ours={ours[400] / ours[25]:.2f} recompute={rec[400] / rec[25]:.2f}")


if __name__ == "__main__":
    main()
