"""Speed of the embedded default voice (Piper joe on onnxruntime, one thread per call).

    OMP_NUM_THREADS=1 python benchmarks/default_voice.py [--repeats 3]

Prints three tables:
* real-time factor (compute seconds / audio seconds, lower is better) per text length, through the
  whole engine path: segmenter, normaliser, G2P, model;
* where one clause's time goes: normaliser, G2P, model call;
* time to first audio: from the moment the first clause is complete (its terminating whitespace
  pushed) to the first audio chunk, with the rest of the text still unsent, with the clause spoken
  whole and with the engine's lead-sized pieces (a short first piece while nothing is queued).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from realtime.engines.base import AudioChunk, QueueSink, SynthesisOptions  # noqa: E402
from realtime.engines.piper import LeadConfig, PiperEngine, phoneme_ids, phonemize  # noqa: E402
from realtime.text import normalize  # noqa: E402

TEXTS = {
    "short": "Hello there, how can I help you today?",
    "medium": (
        "The weather in Paris is mild this week, with highs around 18°C. "
        "Expect light rain on Tuesday, so take an umbrella if you go out."
    ),
    "long": (
        "Here is a quick summary of your account. You spent $1,234.56 last month, which is 12% "
        "more than in March. The largest item was a flight on May 3rd at 7:45 am. "
        "Your next statement is due on 2024-06-15, and the minimum payment is $35. "
        "If you have any questions, just ask, and I will do my best to help."
    ),
}


def rtf(engine: PiperEngine, text: str) -> tuple[float, float]:
    sink = QueueSink()
    t0 = time.perf_counter()
    stream = engine.open(SynthesisOptions(), sink)
    stream.push(text)
    stream.end()
    samples = sum(len(e.samples) for e in sink.items(120) if isinstance(e, AudioChunk))
    compute = time.perf_counter() - t0
    audio = samples / engine.sample_rate
    return compute / audio, audio


def breakdown(engine: PiperEngine, text: str) -> tuple[float, float, float, float]:
    """Seconds in normaliser, G2P and model for one call on ``text``, and the audio seconds."""
    t0 = time.perf_counter()
    norm = normalize(text)
    t1 = time.perf_counter()
    ipa = phonemize(norm)
    t2 = time.perf_counter()
    audio = engine.run_ids(phoneme_ids(ipa, engine.config.phoneme_id_map), 1.0)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, len(audio) / engine.sample_rate


def first_audio(engine: PiperEngine, first: str, rest: str) -> float:
    sink = QueueSink()
    stream = engine.open(SynthesisOptions(), sink)
    stream.push(first.rstrip())
    time.sleep(0.05)  # the engine is now waiting for the boundary to be confirmed
    t0 = time.perf_counter()
    stream.push(" ")  # the first clause is complete from here
    t_first = None
    for ev in sink.items(60):
        if isinstance(ev, AudioChunk) and len(ev.samples) and t_first is None:
            t_first = time.perf_counter()
            stream.push(rest)
            stream.end()
    return t_first - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    engine = PiperEngine()
    print(f"engine load + warm-up: {time.perf_counter() - t0:.2f} s   (cpu count {os.cpu_count()})\n")

    print(f"{'text':<8} {'audio s':>8} {'RTF median':>11} {'RTF min':>8} {'x real time':>12}")
    for name, text in TEXTS.items():
        runs = [rtf(engine, text) for _ in range(args.repeats)]
        factors = [r for r, _ in runs]
        med = statistics.median(factors)
        print(f"{name:<8} {runs[0][1]:>8.2f} {med:>11.3f} {min(factors):>8.3f} {1 / med:>12.1f}")

    print(f"\n{'clause':<44} {'norm ms':>8} {'G2P ms':>7} {'model ms':>9} {'audio s':>8}")
    for clause in [
        "Sure!",
        "I checked your calendar:",
        "which leaves every twenty minutes from the station.",
    ]:
        runs = sorted((breakdown(engine, clause) for _ in range(args.repeats)), key=lambda r: r[2])
        n, g, m, a = runs[len(runs) // 2]
        print(f"{clause[:40]!r:<44} {n * 1e3:>8.1f} {g * 1e3:>7.1f} {m * 1e3:>9.0f} {a:>8.2f}")

    print(f"\n{'first clause':<34} {'whole ms (median)':>18} {'pieces ms (median)':>19}")
    for first, rest in [
        ("Sure.", "Here is the plan for today."),
        ("Hello there, how are you?", "I hope you are well."),
        ("Sure, here is what I found,", "three results in total."),
        ("Your order has shipped and should arrive on Thursday;", "the tracking number is in your email."),
    ]:
        medians = []
        for lead in (LeadConfig(enabled=False), LeadConfig()):
            engine.lead = lead
            medians.append(
                statistics.median(first_audio(engine, first, rest) * 1000 for _ in range(args.repeats))
            )
        print(f"{first[:34]!r:<34} {medians[0]:>18.0f} {medians[1]:>19.0f}")


if __name__ == "__main__":
    main()
