"""The REAL HiFT config builds exactly the key set and shapes of the official hift.pt."""

from __future__ import annotations

import json

import torch

from cosyvoice.hift import HiFTConfig, HiFTGenerator
from tests.conftest import reference_file


def test_real_hift_matches_hift_pt_shapes():
    with open(reference_file("real_state_dict_shapes.json")) as f:
        expected = {k: list(v) for k, v in json.load(f)["hift.pt"].items()}
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == 20_821_295
