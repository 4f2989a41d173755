"""Encode cost per 20 ms of audio for every format, and how much audio the resampler holds back.

    OMP_NUM_THREADS=1 python benchmarks/codec_cost.py [--seconds 5]

Input is a speech-like signal (harmonics of a gliding pitch, 4 Hz syllable envelope) at the engine's
rate, fed in 100 ms chunks as an engine would; the cost includes resampling.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from realtime.audio.encoders import CONTAINERS, FORMATS, make_encoder
from realtime.audio.resample import StreamResampler


def speechlike(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 25) if k * 170 < rate / 2)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.2 * voice * envelope).astype(np.float32)


def encode_cost(fmt: str, container: str, rate: int, source_rate: int, x: np.ndarray) -> float:
    """Microseconds of CPU per 20 ms of audio, best of three runs."""
    chunk = source_rate // 10
    best = float("inf")
    for _ in range(3):
        enc = make_encoder(fmt, rate, container, source_rate)
        t0 = time.perf_counter()
        for i in range(0, x.size, chunk):
            enc.encode(x[i : i + chunk])
        enc.finish()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6 / (x.size / source_rate / 0.02)


def resampler_hold(in_rate: int, out_rate: int, quality: str, chunk_ms: int = 20) -> tuple[float, float]:
    """(mean, max) milliseconds of fed audio not yet returned, over a 3 s stream."""
    r = StreamResampler(in_rate, out_rate, quality=quality)
    x = np.random.default_rng(0).standard_normal(in_rate * 3).astype(np.float32) * 0.1
    n = in_rate * chunk_ms // 1000
    fed = got = 0
    held = []
    for i in range(0, x.size, n):
        fed += x[i : i + n].size
        got += r.process(x[i : i + n]).size
        held.append((fed * out_rate / in_rate - got) / out_rate * 1000)
    return float(np.mean(held)), float(np.max(held))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    print("encode cost, µs of CPU per 20 ms of audio (100 ms input chunks, resampling included)")
    print(f"{'format':<10} {'container':<9} " + " ".join(f"{f'{s}->{r}':>12}" for s, r in PAIRS))
    for fmt in FORMATS:
        for container in CONTAINERS[fmt]:
            cells = []
            for source_rate, rate in PAIRS:
                if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
                    cells.append(f"{'-':>12}")
                    continue
                x = speechlike(source_rate, args.seconds)
                cells.append(f"{encode_cost(fmt, container, rate, source_rate, x):>12.1f}")
            print(f"{fmt:<10} {container:<9} " + " ".join(cells))

    print("\nresampler hold (ms of audio fed but not yet returned, 20 ms chunks): mean / max")
    print(f"{'pair':<14} " + " ".join(f"{q:>13}" for q in QUALITIES))
    for in_rate, out_rate in (
        (22050, 48000),
        (22050, 16000),
        (22050, 8000),
        (24000, 48000),
        (24000, 16000),
        (24000, 8000),
    ):
        cells = [resampler_hold(in_rate, out_rate, q) for q in QUALITIES]
        print(f"{f'{in_rate}->{out_rate}':<14} " + " ".join(f"{m:>6.1f}/{x:<6.1f}" for m, x in cells))


PAIRS = ((22050, 22050), (22050, 8000), (22050, 16000), (22050, 48000), (24000, 24000), (24000, 48000))
QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")

if __name__ == "__main__":
    main()
