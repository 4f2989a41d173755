"""The GPU suite: what a machine with a CUDA GPU measures of the batched CosyVoice2 serving, as one table.

It runs, each in its own process: ``concurrency.py`` on a REAL-size directory with random weights
(sessions 1/4/8/16/32 over the WebSocket, text at 30 tokens/s: first audio, per-stream RTF,
underruns, audio throughput; 8 sessions again with ``--cuda-graphs off --flow-slots off
--lm-overlap off``), ``lm_decode.py`` (the LM's batched decode step per batch size, eager and as
CUDA graphs; the LM stage's tokens per second with steps taken one at a time and overlapped;
fp16 and bf16 logits against fp32) and ``flow_rounds.py`` (a token2wav flow round per
number of streams).  Then it prints one table and the GPU goals (first audio
p50 <= 150 ms and p95 <= 300 ms at 8 sessions, no underrun at 16).  Meant to finish in under 8
minutes on one H100-class GPU.  A part that fails or overruns its time (killed with its server)
is named and its rows left out; the others still run and print, and the suite exits 1.

    bash benchmarks/gpu_suite.sh                       # the GPU
    bash benchmarks/gpu_suite.sh --device cpu --quick  # the same pipeline on a CPU: TINY, small levels

The LM step is measured eager and as CUDA graphs (:mod:`cosyvoice.lm_graphs`), and a flow round
of 1-32 streams with per-stream caches, estimator slots and CUDA graphs (``flow_rounds.py``,
:mod:`cosyvoice.flow_graphs`); on a CPU the same fixed shapes run eagerly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


FAILED: list[str] = []  # the parts that did not finish: their rows are left out, the rest printed


def run(script: str, *script_args: str, timeout: float) -> None:
    """One part of the suite in its own process; a failure or a part over ``timeout`` seconds is
    reported and the suite goes on (one device session must yield every row it can)."""
    cmd = [sys.executable, str(HERE / script), *script_args]
    print("$", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: its server goes with it
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = f"over {timeout:.0f} s"
    if rc != 0:
        print(f"!! {script} failed ({rc}): its rows are left out", flush=True)
        FAILED.append(script)


def load(path: Path, key: str | None = None):
    """A part's rows, or None where it failed."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if key is None else data[key]


def fmt(value: float, scale: float = 1.0, digits: int = 0) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value * scale:.{digits}f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="TINY directory, 1 and 2 sessions, a short LM run")
    p.add_argument(
        "--model-dir", default=None, help="an existing directory instead of writing a random REAL one"
    )
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    t0 = time.perf_counter()
    sessions = ["1", "2"] if args.quick else ["1", "4", "8", "16", "32"]
    batches = ["1", "4"] if args.quick else ["1", "4", "8", "16", "32"]
    variants = "fp32,bf16" if args.device == "cpu" else "fp32,fp16,bf16"
    size = ["--model-dir", args.model_dir] if args.model_dir else ["--size", "tiny" if args.quick else "real"]

    def sessions_run(levels: list[str], json_name: str, *more: str, timeout: float) -> None:
        run(
            "concurrency.py",
            *size,
            "--short",
            "--modes",
            "batched",
            "--device",
            args.device,
            "--utterances",
            "1" if args.quick else "2",
            "--sessions",
            *levels,
            *more,
            "--json",
            str(out / json_name),
            timeout=timeout,
        )

    sessions_run(sessions, "sessions.json", timeout=240)
    # the same level without CUDA graphs and estimator slots: what they buy, side by side
    sessions_run(
        ["2" if args.quick else "8"],
        "eager.json",
        "--server-args",
        "--cuda-graphs off --flow-slots off --lm-overlap off",
        timeout=90,
    )
    run(
        "lm_decode.py",
        "--device",
        args.device,
        "--variants",
        variants,
        "--batches",
        *batches,
        *(["--quick"] if args.quick else []),
        "--json",
        str(out / "lm.json"),
        timeout=120,
    )

    run(
        "flow_rounds.py",
        "--device",
        args.device,
        "--size",
        "reduced" if args.quick else "real",
        "--batches",
        *batches,
        "--half",
        *(["bf16"] if args.device == "cpu" else ["fp16", "bf16"]),
        "--json",
        str(out / "flow.json"),
        timeout=110,
    )

    levels = load(out / "sessions.json", "batched")
    eager = load(out / "eager.json", "batched")
    lm = load(out / "lm.json")
    flow = load(out / "flow.json", "rounds")
    fixed = "CUDA graphs" if args.device.startswith("cuda") else "fixed shapes (no CUDA: eager)"
    print(
        f"\nGPU suite on {args.device}{' (quick)' if args.quick else ''}: {time.perf_counter() - t0:.0f} s"
        + (f"; failed, rows left out: {', '.join(FAILED)}" if FAILED else "")
    )
    rows = [
        ("first audio p50 ms", "p50", 1000, 0),
        ("first audio p95 ms", "p95", 1000, 0),
        ("RTF per stream, p50", "rtf", 1, 2),
        ("underruns", "underruns", 1, 0),
        ("audio s per wall s", "throughput", 1, 2),
        ("LM requests per step", "per_call", 1, 1),
        ("token2wav chunks per round", "chunks_per_call", 1, 1),
        ("errors", "errors", 1, 0),
    ]
    if levels:
        print("\n| sessions | " + " | ".join(str(r["n"]) for r in levels) + " |")
        print("|---|" + "---|" * len(levels))
        for label, key, scale, digits in rows:
            print(f"| {label} | " + " | ".join(fmt(r[key], scale, digits) for r in levels) + " |")
    if levels and eager:
        served = next((r for r in levels if r["n"] == eager[0]["n"]), None)
        if served is not None:
            print(
                f"\n| {served['n']} sessions | as served (graphs, slots where on) "
                "| eager, per-stream flow caches, LM steps one at a time |"
            )
            print("|---|---|---|")
            for label, key, scale, digits in rows[:5]:
                print(
                    f"| {label} | {fmt(served[key], scale, digits)} | {fmt(eager[0][key], scale, digits)} |"
                )
    if lm:
        print_lm(lm, fixed)
    if flow:
        print_flow(flow, fixed)
    if levels:
        by_n = {r["n"]: r for r in levels}
        if 8 in by_n and 16 in by_n:
            at8, at16 = by_n[8], by_n[16]
            ok = at8["p50"] <= 0.150 and at8["p95"] <= 0.300 and at16["underruns"] == 0
            print(
                f"\nGPU goals (p50 <= 150 ms, p95 <= 300 ms at 8 sessions; no underrun at 16): "
                f"p50 {at8['p50'] * 1000:.0f} ms, p95 {at8['p95'] * 1000:.0f} ms, underruns at 16: "
                f"{at16['underruns']} -> {'met' if ok else 'NOT met'}"
            )
    if FAILED:
        sys.exit(1)


def print_lm(lm: dict, fixed: str) -> None:
    batches = lm["batches"]
    if batches:
        print("\n| LM batch | " + " | ".join(str(b["batch"]) for b in batches) + " |")
        print("|---|" + "---|" * len(batches))
        for label, key, digits in (
            ("decode step ms, eager", "ms_per_step", 1),
            (f"decode step ms, {fixed}", "ms_per_step_fixed", 1),
            ("speech tokens/s", "tokens_s", 0),
            ("LM stage tokens/s, steps one at a time", "stage_tokens_s", 0),
            ("LM stage tokens/s, overlapped", "stage_tokens_s_overlap", 0),
        ):
            print(f"| {label} | " + " | ".join(fmt(b[key], 1, digits) for b in batches) + " |")
        syncs = " | ".join(
            "-" if b["stage_syncs_overlap"] is None else str(b["stage_syncs_overlap"]) for b in batches
        )
        print(f"| LM stage, overlapped: waits for the device besides each step's tokens | {syncs} |")
    print("\n| LM precision | logit error vs fp32, max / mean | top-1 agreement | decode ms/token |")
    print("|---|---|---|---|")
    for v in lm["variants"]:
        print(
            f"| {v['variant']} | {v['logit_err_max']:.3g} / {v['logit_err_mean']:.3g} | {v['top1']:.0%} "
            f"| {v['step_s'] * 1000:.1f} |"
        )


def print_flow(flow: list[dict], fixed: str) -> None:
    print("\n| flow streams per round | " + " | ".join(str(r["batch"]) for r in flow) + " |")
    print("|---|" + "---|" * len(flow))
    for label, key in (
        ("round ms, caches per stream", "caches_ms"),
        ("round ms, estimator slots", "slots_ms"),
        (f"round ms, {fixed}", "fixed_ms"),
    ):
        print(f"| {label} | " + " | ".join(fmt(r[key], 1, 1) for r in flow) + " |")
    if flow[0].get("syncs", {}).get("fixed") is not None:
        for mode in flow[0]["syncs"]:
            print(
                f"| round's waits for the device, {mode} | "
                + " | ".join(str(r["syncs"][mode]) for r in flow)
                + " |"
            )
    for name in ("fp16", "bf16"):
        if f"fixed_{name}_ms" in flow[0]:
            print(
                f"| round ms, {fixed}, {name} | "
                + " | ".join(fmt(r[f"fixed_{name}_ms"], 1, 1) for r in flow)
                + " |"
            )
            errors = " | ".join(f"{r[f'{name}_err_max']:.3g} / {r[f'{name}_err_mean']:.3g}" for r in flow)
            print(f"| mel error of {name} vs fp32, max / mean | {errors} |")


if __name__ == "__main__":
    main()
