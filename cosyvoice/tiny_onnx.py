"""Small random stand-ins for campplus.onnx and speech_tokenizer_v2.onnx.

The real models are not ours to ship; these have the same input/output signature (names, ranks,
dtypes, dynamic time axis, token range) so that the whole frontend path runs on a TINY model
directory. Their outputs are deterministic functions of the input, not meaningful features.
Exporting needs the `onnx` package (dev extra).

Names: campplus takes `input` [B, frames, 80] -> `output` [B, 192]; the speech tokenizer takes
`feats` [B, 128, frames] float32 and `feats_length` [B] int32 -> `indices` [B, frames // 4] int64.
The frontend reads the names from the model, so real files with other names work too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

CAMPPLUS_INPUT, CAMPPLUS_OUTPUT = "input", "output"
TOKENIZER_INPUTS, TOKENIZER_OUTPUT = ("feats", "feats_length"), "indices"
SPEECH_TOKEN_LEVELS, SPEECH_TOKEN_DIMS = 3, 8  # 3**8 = 6561 tokens, as the real FSQ codebook


class TinyCampPlus(nn.Module):
    def __init__(self, n_mels: int = 80, dim: int = 192):
        super().__init__()
        self.proj = nn.Linear(n_mels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 80] -> [B, 192]
        return torch.tanh(self.proj(x)).mean(dim=1)


class TinySpeechTokenizer(nn.Module):
    """Mean-pools 4 mel frames (25 Hz), projects to 8 dims and rounds each to {-1, 0, 1}."""

    def __init__(self, n_mels: int = 128):
        super().__init__()
        self.proj = nn.Linear(n_mels, SPEECH_TOKEN_DIMS)
        powers = SPEECH_TOKEN_LEVELS ** torch.arange(SPEECH_TOKEN_DIMS)
        self.register_buffer("powers", powers.to(torch.float32), persistent=False)

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool1d(feats, kernel_size=4, stride=4)  # [B, 128, T // 4]
        z = torch.round(torch.tanh(self.proj(pooled.transpose(1, 2)) * 4.0))  # [B, T // 4, 8] in {-1, 0, 1}
        codes = ((z + 1.0) * self.powers).sum(dim=-1)  # [B, T // 4] in [0, 6560]
        valid = torch.arange(codes.shape[1])[None, :] < (feats_length[:, None] // 4)
        return (codes * valid).to(torch.int64)


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_quietly(module, args, path, inputs, outputs, dynamic_axes)
    return path


def _export_quietly(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes: dict) -> None:
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_axes=dynamic_axes,
        opset_version=17,
        dynamo=False,
    )


def export_tiny_campplus(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with torch.no_grad():
        return _export(
            TinyCampPlus(),
            (torch.randn(1, 50, 80),),
            Path(path),
            [CAMPPLUS_INPUT],
            [CAMPPLUS_OUTPUT],
            {CAMPPLUS_INPUT: {0: "batch", 1: "frames"}, CAMPPLUS_OUTPUT: {0: "batch"}},
        )


def export_tiny_speech_tokenizer(path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    with torch.no_grad():
        return _export(
            TinySpeechTokenizer(),
            (torch.randn(1, 128, 64), torch.tensor([64], dtype=torch.int32)),
            Path(path),
            TOKENIZER_INPUTS,
            [TOKENIZER_OUTPUT],
            {
                TOKENIZER_INPUTS[0]: {0: "batch", 2: "frames"},
                TOKENIZER_INPUTS[1]: {0: "batch"},
                TOKENIZER_OUTPUT: {0: "batch", 1: "tokens"},
            },
        )
