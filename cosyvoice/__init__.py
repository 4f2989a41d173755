"""Our CosyVoice2 inference: bistream speech-token LM, chunk-aware flow matching, HiFT vocoder."""
