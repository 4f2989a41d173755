"""What a client may ask for: formats, containers and sample rates, and their defaults.

Pure data and checks, shared by the protocol (which validates a client's options) and the encoders
(which produce them), so that both always agree.
"""

from __future__ import annotations

FORMATS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw", "opus")
CONTAINERS = {
    "pcm_s16le": ("raw", "wav"),
    "pcm_f32le": ("raw", "wav"),
    "mulaw": ("raw", "wav"),
    "alaw": ("raw", "wav"),
    "opus": ("raw", "ogg"),
}
SAMPLE_BYTES = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}  # bytes per sample (Opus: none)
COMMON_RATES = (8000, 16000, 24000, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libopus encodes at


def allowed_sample_rates(format: str, native_rate: int) -> tuple[int, ...]:
    """Output rates a client may ask for with this format, given the engine's native rate."""
    if format == "opus":
        return OPUS_RATES
    return tuple(sorted(set(COMMON_RATES) | {int(native_rate)}))


def default_sample_rate(format: str, native_rate: int) -> int:
    """Rate used when the client names none: native for PCM, 48 kHz for Opus, 8 kHz for G.711."""
    if format == "opus":
        return 48000
    if format in ("mulaw", "alaw"):
        return 8000
    return int(native_rate)


def validate_audio_format(
    format: str, sample_rate: int | None, container: str, native_rate: int
) -> str | None:
    """Error message for a client's audio options, or None when they are usable.

    ``sample_rate`` None is valid (the caller applies :func:`default_sample_rate`).
    """
    if not isinstance(format, str) or format not in CONTAINERS:  # options come from client JSON
        return f"unknown format {format!r}; expected one of {', '.join(FORMATS)}"
    if not isinstance(container, str) or container not in CONTAINERS[format]:
        return f"container {container!r} is not available for {format}; expected one of {', '.join(CONTAINERS[format])}"
    if sample_rate is None:
        return None
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        return f"sample_rate must be an integer, got {sample_rate!r}"
    rates = allowed_sample_rates(format, native_rate)
    if sample_rate not in rates:
        return f"sample_rate {sample_rate} is not supported for {format}; expected one of {', '.join(map(str, rates))}"
    return None
