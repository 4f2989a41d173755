"""The parity suite is not tied to one data set: it passes on a second set in the documented
format, with another TINY shape, other lengths and other weights (written by tests/fixture_set.py).

The values of that set come from our own implementation, so this proves nothing about numerical
parity (the public set does that); it proves that every test takes its shapes, lengths, splits and
counts from the files.  It runs every test of every test file that reads the fixture set (not only
the ``parity``-marked ones), in a subprocess with COSYVOICE_REFERENCE_DIR pointing at the new set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, load_npz, tiny_json

TESTS = REPO / "tests"
# A test file reads the fixture set iff it uses one of conftest's readers.
READERS = re.compile(r"\b(load_npz|reference_file|reference_dir|ref_dir|tiny_json|load_json)\b")


def fixture_test_files() -> list[Path]:
    """Every test file that reads the fixture set, this one excepted."""
    return sorted(
        p
        for p in TESTS.glob("test_*.py")
        if p.name != Path(__file__).name and READERS.search(p.read_text(encoding="utf-8"))
    )


def test_every_parity_test_reads_through_conftest():
    """Each file with parity tests is among those the set is tried on (a parity test that read
    the fixtures some other way would escape the check below)."""
    parity = {
        p
        for p in TESTS.glob("test_*.py")
        if p.name != Path(__file__).name and "@pytest.mark.parity" in p.read_text(encoding="utf-8")
    }
    assert parity and parity <= set(fixture_test_files())


@pytest.mark.slow
def test_parity_suite_passes_on_a_second_fixture_set(tmp_path):
    out = tmp_path / "second-set"
    gen = subprocess.run(
        [sys.executable, "-m", "tests.fixture_set", str(out), "--seed", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr

    # It differs from the set the suite runs on wherever the tests used to assume a value.
    ours, theirs = json.loads((out / "config_tiny.json").read_text()), tiny_json()
    for path in (
        ("qwen2_config", "hidden_size"),
        ("qwen2_config", "num_hidden_layers"),
        ("qwen2_config", "num_attention_heads"),
        ("flow", "input_size"),
        ("flow", "encoder", "output_size"),
        ("flow", "encoder", "num_blocks"),
        ("flow", "decoder", "estimator", "channels"),
        ("hift", "base_channels"),
    ):
        a, b = ours, theirs
        for key in path:
            a, b = a[key], b[key]
        assert a != b, f"{'.'.join(path)} is {a} in both sets: nothing would be proved"
    with (
        np.load(out / "token2wav_stream.npz") as t2w,
        np.load(out / "lm_forward.npz") as fwd,
        np.load(out / "flow_inference.npz") as flow,
    ):
        assert int(t2w["n_chunks"]) != int(load_npz("token2wav_stream.npz")["n_chunks"])
        assert fwd["lm_input"].shape != load_npz("lm_forward.npz")["lm_input"].shape
        assert flow["prompt_feat"].shape != load_npz("flow_inference.npz")["prompt_feat"].shape

    files = [str(p.relative_to(REPO)) for p in fixture_test_files()]
    env = {**os.environ, "COSYVOICE_REFERENCE_DIR": str(out)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), tail
