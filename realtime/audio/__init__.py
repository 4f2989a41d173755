"""Audio encoding (PCM, G.711, Opus/Ogg via PyAV) and resampling (soxr)."""
