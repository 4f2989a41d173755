"""The GPU suite's pipeline on a CPU (``benchmarks/gpu_suite.sh --device cpu --quick``), so that the
script a GPU machine runs cannot rot: every sub-benchmark runs, the one table is printed with a
row per figure the batching issue asks for, and the concurrency level has no errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def quick_suite(device: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--device", device, "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_a_cpu():
    r = quick_suite("cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout[r.stdout.index("GPU suite on cpu") :]
    for label in (
        "first audio p50 ms",
        "first audio p95 ms",
        "RTF per stream, p50",
        "underruns",
        "decode step ms, eager",
        "decode step ms, fixed shapes (no CUDA: eager)",  # CUDA graphs on a GPU
        "round ms, caches per stream",
        "round ms, estimator slots",
        "round ms, fixed shapes (no CUDA: eager)",
        "mel error of bf16 vs fp32, max / mean",
        "| 2 sessions | as served (graphs, slots where on) | eager, per-stream flow caches, LM steps one at a time |",
        "LM stage tokens/s, steps one at a time",
        "LM stage tokens/s, overlapped",
        "| bf16 |",
    ):
        assert label in table, table
    errors = re.search(r"^\| errors \| (.*) \|$", table, re.M)[1].split(" | ")
    assert errors == ["0", "0"], table
    p50 = [float(x) for x in re.search(r"^\| first audio p50 ms \| (.*) \|$", table, re.M)[1].split(" | ")]
    assert all(0 < x < 30000 for x in p50), table
    fixed = re.search(r"^\| decode step ms, fixed shapes.*? \| (.*) \|$", table, re.M)[1].split(" | ")
    assert len(fixed) == 2 and all(float(x) > 0 for x in fixed), table
    overlapped = re.search(r"^\| LM stage tokens/s, overlapped \| (.*) \|$", table, re.M)[1].split(" | ")
    assert len(overlapped) == 2 and all(float(x) > 0 for x in overlapped), table


@pytest.mark.slow
def test_a_part_that_fails_is_reported_and_the_suite_goes_on():
    """One device session must yield every row it can: a part that fails (here every part, on a
    device this machine lacks) is named, the others still run, and the suite exits non-zero."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    r = quick_suite("cuda")
    assert r.returncode == 1
    for part in ("concurrency.py", "lm_decode.py", "flow_rounds.py"):
        assert f"!! {part} failed" in r.stdout, r.stdout[-3000:]
    assert "failed, rows left out: concurrency.py, concurrency.py, lm_decode.py, flow_rounds.py" in r.stdout
