"""Checkpoint loading for CosyVoice2 model directories.

A model directory is data: weights are read with ``weights_only=True`` (or safetensors) so that
loading one never unpickles arbitrary objects, and keys are matched strictly so that a wrong or
truncated checkpoint fails loudly instead of leaving randomly initialised layers behind.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointMismatch", "load_state_dict", "load_strict", "describe_mismatch"]


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not match the module built from the config."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{path}: expected a flat dict of tensors (a state_dict)")
    return state


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


def describe_mismatch(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable problems (missing, unexpected, wrong shape); empty when they match."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k])})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append("missing keys " + _listing(missing))
    if unexpected:
        problems.append("unexpected keys " + _listing(unexpected))
    if wrong:
        problems.append("shape mismatches " + _listing(wrong))
    return problems


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Load ``state`` into ``module`` only if keys and shapes match exactly.

    By default values are copied into the module's existing parameters, so the module keeps its
    dtype and device (cast the module first, then load).  ``assign=True`` makes the checkpoint
    tensors the parameters instead, which is how a module built on the ``meta`` device is
    materialised without allocating (and randomly initialising) it first.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    problems = describe_mismatch(expected, state)
    if problems:
        raise CheckpointMismatch(f"{what}: checkpoint does not match the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=assign)
