"""Token2wav flow rounds: B streams advancing one whole chunk together, three ways.

What the token2wav stage runs every round, timed per batch size (random weights, no prompt, a
window of ``--window`` chunks, streams already two chunks in):
- caches: each stream's estimator state in buffers of its own (attention and convolution state
  read and written stream by stream: the launches grow with the streams);
- slots: the state in EstimatorSlots (one gather and one scatter per layer for the round);
- fixed: slots, the round padded to a bucket at fixed shapes: a CUDA graph of the ten Euler
  steps on a GPU (recorded before timing), the same function run eagerly elsewhere;
- with ``--half fp16 bf16``: fixed, the estimator under autocast, and its mel's error against
  the fp32 round's (the same inputs).

    python benchmarks/flow_rounds.py --device cuda                  # REAL size
    python benchmarks/flow_rounds.py --size reduced --batches 1 2   # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import count_syncs  # noqa: E402
from flow_chunk_cost import inputs, reduced_config  # noqa: E402

from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig, FlowStream, advance_together  # noqa: E402
from cosyvoice.flow_estimator import EstimatorSlots  # noqa: E402
from cosyvoice.flow_graphs import FlowGraphs  # noqa: E402

MODES = ("caches", "slots", "fixed")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_round(streams: list[FlowStream], hop: int) -> Tensor:
    """Every stream one whole chunk further; their mels [B, 80, 2 hop]."""
    plans = [s.plan_emit(hop) for s in streams]
    assert all(len(p) == 1 for p in plans)  # one whole chunk each
    mels = advance_together([(s, *p[0]) for s, p in zip(streams, plans, strict=True)])
    return torch.cat([s.complete_emit(hop, [mel]) for s, mel in zip(streams, mels, strict=True)])


def time_rounds(
    flow: CausalMaskedDiffWithXvec,
    mode: str,
    batch: int,
    window: int,
    rounds: int,
    dtype: torch.dtype | None = None,
) -> tuple[float, Tensor, int | None]:
    """Median seconds of one round of ``batch`` streams (after two warm-up rounds), the mels of
    the last round (the same inputs every time: to compare precisions), and how many times that
    round waited for the device (on CUDA)."""
    device = flow.input_embedding.weight.device
    hop = flow.cfg.chunk_tokens
    slots = None
    if mode != "caches":
        slots = EstimatorSlots(flow.decoder.estimator, flow.cfg.n_timesteps, batch, window)
        if mode == "fixed":
            slots.graphs = FlowGraphs(flow, slots, compute_dtype=dtype)
            slots.graphs.capture_all()
    streams = []
    for k in range(batch):
        tokens, prompt, prompt_feat, emb = inputs(hop * (rounds + 3) + 3, seed=k)
        stream = FlowStream(
            flow, prompt, prompt_feat, emb, left_chunks=window, slots=slots, compute_dtype=dtype
        )
        stream.push(tokens[0])
        streams.append(stream)
    times = []
    with torch.inference_mode():
        for r in range(rounds + 2):
            sync(device)
            t0 = time.perf_counter()
            mels, syncs = count_syncs(device, lambda: one_round(streams, hop))
            sync(device)
            if r >= 2:
                times.append(time.perf_counter() - t0)
    for stream in streams:
        stream.close()
    if mode == "fixed":
        assert slots.graphs.rounds >= rounds
    return statistics.median(times), mels.float().cpu(), syncs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=("real", "reduced"), default="real")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--window", type=int, default=2, help="the flow window in chunks (slots need one)")
    p.add_argument("--rounds", type=int, default=3, help="rounds timed per measurement (median)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--half",
        nargs="*",
        choices=("fp16", "bf16"),
        default=[],
        help="also time fixed-shape rounds with the estimator in these precisions, and their mel error",
    )
    p.add_argument("--json", default=None, help="also write the rows to this file (the GPU suite reads it)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    flow = (
        CausalMaskedDiffWithXvec(FlowConfig() if args.size == "real" else reduced_config()).eval().to(device)
    )
    graphs = "CUDA graphs" if device.type == "cuda" else "fixed shapes, eager"
    print(f"flow {args.size} on {device}, window {args.window} chunks, median of {args.rounds} rounds")
    half = [(name, {"fp16": torch.float16, "bf16": torch.bfloat16}[name]) for name in args.half]
    head = "".join(f" {graphs} {name} ms/round (mel error, max / mean) |" for name, _ in half)
    print(
        f"| streams | caches ms/round | slots ms/round | {graphs} ms/round |{head} ms per stream chunk, best |"
    )
    print("|---|---|---|---|" + "---|" * len(half) + "---|")
    rows = []
    for batch in args.batches:
        ms, mels, syncs = {}, {}, {}
        for mode in args.modes:
            seconds, mels[mode], syncs[mode] = time_rounds(flow, mode, batch, args.window, args.rounds)
            ms[mode] = 1000 * seconds
        row = {"batch": batch, **{f"{m}_ms": v for m, v in ms.items()}, "syncs": syncs}
        cells = [f"{ms[m]:.1f}" if m in ms else "-" for m in MODES]
        for name, dtype in half:
            seconds, mel, _ = time_rounds(flow, "fixed", batch, args.window, args.rounds, dtype)
            ref = mels.get("fixed", next(iter(mels.values())))
            err = (mel - ref).abs()
            row.update({f"fixed_{name}_ms": 1000 * seconds, f"{name}_err_max": err.max().item()})
            row[f"{name}_err_mean"] = err.mean().item()
            cells.append(f"{1000 * seconds:.1f} ({err.max().item():.3g} / {err.mean().item():.3g})")
        rows.append(row)
        best = min(v for k, v in row.items() if k.endswith("_ms"))
        print(f"| {batch} | {' | '.join(cells)} | {best / batch:.1f} |", flush=True)
    if device.type == "cuda":
        print("\nwaits for the device in one round (torch's sync debug mode; none are needed):")
        for row in rows:
            print(f"  {row['batch']} streams: " + ", ".join(f"{m} {n}" for m, n in row["syncs"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
