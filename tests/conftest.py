"""Shared fixtures.  Parity tests read golden data from COSYVOICE_REFERENCE_DIR (default
../shared/reference); a missing file is a failure, never a skip."""

from __future__ import annotations

import os
from pathlib import Path

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
