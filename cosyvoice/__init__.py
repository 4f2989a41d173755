"""Our CosyVoice2 inference: bistream speech-token LM, chunk-aware flow matching, HiFT vocoder."""

from typing import Any

__all__ = ["CosyVoice2"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light submodule (cosyvoice.config, cosyvoice.text) does not load
    # torch, transformers and onnxruntime through the API module.
    if name == "CosyVoice2":
        from .api import CosyVoice2

        return CosyVoice2
    raise AttributeError(f"module 'cosyvoice' has no attribute {name!r}")
