"""Engines turn one utterance's text stream into audio (see :mod:`realtime.engines.base`).

``create_engine`` is the one place that maps a name to an engine, so the CLI, the tests and the
benchmarks build them the same way; heavy imports happen only for the engine asked for.
"""

from __future__ import annotations

from .base import Engine

ENGINES = ("piper", "cosyvoice2", "tone")


def create_engine(name: str = "piper", model_dir: str | None = None, **kwargs: object) -> Engine:
    if name == "piper":
        from .piper import PiperEngine

        return PiperEngine(**kwargs)
    if name == "tone":
        from .tone import ToneEngine

        return ToneEngine(**kwargs)
    if name == "cosyvoice2":
        if not model_dir:
            raise ValueError(
                "the cosyvoice2 engine needs --model-dir (an official CosyVoice2-0.5B directory)"
            )
        from .cosyvoice2 import CosyVoice2Engine

        return CosyVoice2Engine(model_dir, **kwargs)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
