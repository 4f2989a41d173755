"""Real-time streaming text-to-speech service: LLM text deltas in, audio out."""

__version__ = "0.1.0"
