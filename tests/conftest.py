"""Shared fixtures.  Parity tests read golden data from COSYVOICE_REFERENCE_DIR (default
../shared/reference); a missing file is a failure, never a skip.

Any set in the format of the reference README is a valid input: tests take every shape, length,
split and count from the files (``tests/fixture_set.py`` writes a second set to prove it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    return Path(os.environ.get("COSYVOICE_REFERENCE_DIR", REPO.parent / "shared" / "reference")).resolve()


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    return reference_dir()


def load_npz(name: str) -> dict[str, np.ndarray]:
    path = reference_dir() / name
    if not path.is_file():
        pytest.fail(f"golden fixture missing: {path} (set COSYVOICE_REFERENCE_DIR)")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def reference_file(name: str) -> Path:
    path = reference_dir() / name
    if not path.is_file():
        pytest.fail(f"golden fixture missing: {path} (set COSYVOICE_REFERENCE_DIR)")
    return path


def load_json(name: str) -> dict[str, Any]:
    """A JSON fixture (``config_tiny.json``, ``real_state_dict_shapes.json``) as a dict."""
    return json.loads(reference_file(name).read_text())


def tiny_json() -> dict[str, Any]:
    """``config_tiny.json``: the hyper-parameters every width, depth and streaming constant of the
    TINY models is read from (never assumed)."""
    return load_json("config_tiny.json")


def tiny_lm():
    """The fixture set's TINY speech LM (``tiny_llm.safetensors``), float32 on the CPU."""
    from cosyvoice.checkpoint import load_state_dict
    from cosyvoice.config import LLMConfig
    from cosyvoice.llm import Qwen2LM

    config = LLMConfig.from_tiny_json(tiny_json())
    return Qwen2LM.from_state_dict(config, load_state_dict(reference_file("tiny_llm.safetensors")))
