"""Word timing error of the default voice against its own durations, end to end.

    python benchmarks/word_timing.py [--delta-chars 4] [--tps 30]

Serves the embedded default voice in this process and speaks a few sentences, streamed in deltas
of a few characters as an LLM writes them, through two routes: ``/v1/tts/stream`` with
``timestamps: "words"`` (the ``words`` messages) and the ElevenLabs-compatible ``stream-input``
(each word's time read from its characters' alignment: its first character's start, its last
character's end; read three ways: each message's times added to the audio before it, added to the
sum of the earlier alignments' spans as Pipecat does, and as they come, as LiveKit's plugin does).  Every chunk the engine makes
is recorded with its model call, and each word's time is read again from that alone (the phoneme
ids decoded, the durations the graph exposes times hop, the trim and the chunks before it: see
tests/word_timing_util.py).  Prints the error of every word start and end, mean and max, in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics

from common import ROOT  # noqa: F401  (puts the repository on sys.path)
from websockets.asyncio.client import connect

from realtime.engines.piper import PiperEngine
from tests.serving import serve, ws_url
from tests.word_timing_util import recording_chunks, reference_words

SENTENCES = [
    "Sure, the weather in Paris is mild this week.",
    "Your meeting is at 3:45 with the design team.",
    "The total comes to $12.50, including the tip.",
    "Call me back at 555-0123 tomorrow morning, please.",
    "We measured every word against the model itself.",
]


async def words_route(base: str, text: str, step: int, pause: float) -> list[tuple[int, int, float, float]]:
    async with connect(ws_url(base), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "timestamps": "words", "audio_transport": "json"}))
        for i in range(0, len(text), step):
            await ws.send(json.dumps({"type": "text", "text": text[i : i + step]}))
            await asyncio.sleep(pause)
        await ws.send(json.dumps({"type": "end"}))
        out = []
        while (m := json.loads(await ws.recv()))["type"] != "done":
            out += [(w["start"], w["end"], w["start_ms"], w["end_ms"]) for w in m.get("words", [])]
        return out


async def elevenlabs_route(
    base: str, text: str, step: int, rate: int, pause: float
) -> dict[str, list[tuple[float, float]]]:
    """(start ms, end ms) of every character, read three ways (see the module's docstring)."""
    url = base.replace("http://", "ws://") + f"/v1/text-to-speech/joe/stream-input?output_format=pcm_{rate}"
    chars: dict[str, list[tuple[float, float]]] = {
        "on the audio clock": [],
        "as Pipecat": [],
        "as LiveKit": [],
    }
    elapsed, summed = 0.0, 0.0
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"text": " "}))
        for i in range(0, len(text), step):
            await ws.send(json.dumps({"text": text[i : i + step]}))
            await asyncio.sleep(pause)
        await ws.send(json.dumps({"text": ""}))
        while not (m := json.loads(await ws.recv())).get("isFinal"):
            if a := m.get("alignment"):
                times = list(zip(a["charStartTimesMs"], a["charDurationsMs"], strict=True))
                for reading, origin in (
                    ("on the audio clock", elapsed),
                    ("as Pipecat", summed),
                    ("as LiveKit", 0.0),
                ):
                    chars[reading] += [(origin + s, origin + s + d) for s, d in times]
                summed += times[-1][0] + times[-1][1]
            if m.get("audio"):
                elapsed += len(base64.b64decode(m["audio"])) / 2 / rate * 1000
    return chars


def errors(got: list[tuple[int, int, float, float]], expected: list[tuple[int, int, float, float]]):
    assert [g[:2] for g in got] == [e[:2] for e in expected], (got, expected)
    return [abs(g[k] - e[k]) for g, e in zip(got, expected, strict=True) for k in (2, 3)]


async def main(step: int, tps: float) -> None:
    engine = PiperEngine()
    rate, id_map = engine.sample_rate, engine.config.phoneme_id_map
    pause = 1 / tps if tps > 0 else 0.0
    table: dict[str, list[float]] = {"/v1/tts/stream words": []}
    with serve(engine) as base:
        for text in SENTENCES:
            with recording_chunks() as made:
                got = await words_route(base, text, step, pause)
            table["/v1/tts/stream words"] += errors(got, reference_words(made, text, id_map, rate))
            with recording_chunks() as made:
                readings = await elevenlabs_route(base, text, step, rate, pause)
            expected = reference_words(made, text, id_map, rate)
            for reading, chars in readings.items():
                got = [(a, b, chars[a][0], chars[b - 1][1]) for a, b, _, _ in expected]
                table.setdefault(f"ElevenLabs alignment, {reading}", []).extend(errors(got, expected))
    print(f"{len(SENTENCES)} sentences, deltas of {step} characters at {tps:g}/s, the default voice (joe)")
    print("| route | word times | mean error ms | max error ms |")
    print("| --- | --- | --- | --- |")
    for route, e in table.items():
        print(f"| {route} | {len(e)} | {statistics.mean(e):.2f} | {max(e):.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delta-chars", type=int, default=4)
    parser.add_argument(
        "--tps", type=float, default=30.0, help="deltas per second, as an LLM streams (0: at once)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.delta_chars, args.tps))
