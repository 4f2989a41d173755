"""The REAL CosyVoice2 flow config builds exactly the key set and shapes of the official flow.pt."""

from __future__ import annotations

import json

import torch

from cosyvoice.flow import CausalMaskedDiffWithXvec, FlowConfig
from cosyvoice.flow_estimator import CausalConditionalDecoder, EstimatorConfig
from tests.conftest import reference_file


def _expected() -> dict[str, list[int]]:
    with open(reference_file("real_state_dict_shapes.json")) as f:
        return {k: list(v) for k, v in json.load(f)["flow.pt"].items()}


def _diff(ours: dict[str, list[int]], expected: dict[str, list[int]]):
    return (
        sorted(set(ours) - set(expected)),
        sorted(set(expected) - set(ours)),
        {k: (v, expected[k]) for k, v in ours.items() if k in expected and expected[k] != v},
    )


def test_real_flow_matches_flow_pt_keys_and_shapes():
    expected = _expected()
    with torch.device("meta"):
        model = CausalMaskedDiffWithXvec(FlowConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert _diff(ours, expected) == ([], [], {})
    assert len(ours) == 1121
    assert sum(p.numel() for p in model.parameters()) == 112_549_360


def test_real_estimator_alone_matches_decoder_estimator_keys():
    expected = {
        k[len("decoder.estimator.") :]: v
        for k, v in _expected().items()
        if k.startswith("decoder.estimator.")
    }
    with torch.device("meta"):
        est = CausalConditionalDecoder(EstimatorConfig())
    ours = {k: list(v.shape) for k, v in est.state_dict().items()}
    assert _diff(ours, expected) == ([], [], {})


def test_no_noise_or_positional_tables_in_state_dict():
    """rand_noise and the relative positional tables are recomputed, never stored (as in flow.pt)."""
    with torch.device("meta"):
        model = CausalMaskedDiffWithXvec(FlowConfig())
    assert not any("noise" in k or "pe" == k.split(".")[-1] for k in model.state_dict())
