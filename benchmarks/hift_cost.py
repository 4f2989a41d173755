"""HiFT vocoder cost per streamed chunk at the REAL size (random weights; cost does not depend on them).

Rows: the official chunk sizes (50 mel frames = the first 1 s chunk; 8 cached + 100 and 8 cached
+ 200 frames for the 50- and 100-token hops). Columns: weight norm recomputed on every call (as the
official module runs) vs folded once (`remove_weight_norm`), and the share of the source module.

    OMP_NUM_THREADS=1 python benchmarks/hift_cost.py [--threads 1] [--repeats 3] [--frames 50,108,208]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cosyvoice.hift import HiFTConfig, HiFTGenerator


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", default="50,108,208")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    frames = [int(f) for f in args.frames.split(",")]

    model = HiFTGenerator(HiFTConfig()).eval().to(device)
    folded = HiFTGenerator(HiFTConfig()).eval().to(device)
    folded.load_state_dict(model.state_dict())
    folded.remove_weight_norm()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(
        f"HiFT REAL config ({sum(p.numel() for p in model.parameters()):,} params), fp32, "
        f"{args.threads} thread(s), device {device}, median of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'mel frames':>10} {'audio s':>8} {'weight-norm s':>14} {'folded s':>9} {'source s':>9} {'RTF folded':>10}"
    )
    for n in frames:
        mel = torch.randn(1, 80, n, device=device)
        gen = torch.Generator(device=device).manual_seed(0)

        def run(m, mel=mel, gen=gen):
            m.inference(mel, generator=gen)
            sync()

        def source(mel=mel, gen=gen):
            with torch.inference_mode():
                folded.source(mel, generator=gen)
            sync()

        t_wn = timed(lambda: run(model), args.repeats)
        t_fold = timed(lambda: run(folded), args.repeats)
        t_src = timed(source, args.repeats)
        audio_s = n * 480 / 24000
        print(f"{n:>10} {audio_s:>8.2f} {t_wn:>14.3f} {t_fold:>9.3f} {t_src:>9.3f} {t_fold / audio_s:>10.2f}")


if __name__ == "__main__":
    main()
