"""The REAL CosyVoice2-0.5B LM, built on the meta device (no memory), has exactly the state_dict
keys and shapes of the released llm.pt (listed in real_state_dict_shapes.json)."""

from __future__ import annotations

import json

import pytest
import torch

from cosyvoice.checkpoint import CheckpointMismatch
from cosyvoice.config import LLMConfig
from cosyvoice.llm import LM_HEAD_KEY, Qwen2LM
from tests.conftest import reference_file


@pytest.fixture(scope="module")
def real_llm_shapes() -> dict[str, list[int]]:
    return json.loads(reference_file("real_state_dict_shapes.json").read_text())["llm.pt"]


@pytest.fixture(scope="module")
def meta_lm() -> Qwen2LM:
    with torch.device("meta"):
        return Qwen2LM(LLMConfig())


@pytest.mark.parity
def test_real_config_matches_llm_pt_keys_and_shapes(meta_lm, real_llm_shapes):
    ours = {k: list(v.shape) for k, v in meta_lm.state_dict().items()}
    assert len(real_llm_shapes) == 295  # the REAL release's llm.pt (FACTS 3.1), the same in every set
    # The only difference: the tied, unused Qwen lm_head, which load_checkpoint drops.
    assert set(real_llm_shapes) - set(ours) == {LM_HEAD_KEY}
    assert set(ours) - set(real_llm_shapes) == set()
    assert {k: real_llm_shapes[k] for k in ours} == ours
    assert real_llm_shapes[LM_HEAD_KEY] == real_llm_shapes["llm.model.model.embed_tokens.weight"]


@pytest.mark.parity
def test_real_checkpoint_layout_loads_strictly(real_llm_shapes):
    state = {k: torch.empty(shape, device="meta") for k, shape in real_llm_shapes.items()}
    with torch.device("meta"):
        model = Qwen2LM(LLMConfig())
    model.load_checkpoint(state, assign=True)  # accepted, lm_head dropped
    rows, width = real_llm_shapes["llm_decoder.weight"]  # 6564 x 896
    assert model.llm_decoder.weight.shape == (rows, width)

    wrong = dict(state)
    wrong["llm_decoder.weight"] = torch.empty(rows - 1, width, device="meta")
    with pytest.raises(CheckpointMismatch, match=rf"llm_decoder.weight \(checkpoint \({rows - 1}, {width}\)"):
        model.load_checkpoint(wrong, assign=True)
