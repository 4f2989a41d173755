"""``/v1/voices``: list the engine's voices (with their languages, modes and formats) and
register zero-shot voices.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..audio.formats import allowed_sample_rates
from ..engines.base import EngineError
from ..errors import ProtocolError
from ..protocol import (
    FORMATS,
)
from ..service import error_from, error_response, service_of
from .synthesis import read_form


async def register_voice(request: Request) -> Response:
    """POST /v1/voices (multipart: voice_id, prompt_text, prompt_wav): a zero-shot voice, for
    engines that can register one (``engine.register_voice``)."""
    service = service_of(request)
    service.metrics.http_requests.labels("/v1/voices").inc()
    register = getattr(service.engine, "register_voice", None)
    if register is None:
        return error_response(
            "not_found", f"engine {service.engine.name!r} cannot register voices", metrics=service.metrics
        )
    try:
        form = await read_form(request, service.config.limits, service.config.body_timeout)
        voice_id, prompt_text, upload = form.get("voice_id"), form.get("prompt_text"), form.get("prompt_wav")
        if (
            not isinstance(voice_id, str)
            or not isinstance(prompt_text, str)
            or not isinstance(upload, UploadFile)
        ):
            raise ProtocolError(
                "bad_request", "multipart fields voice_id, prompt_text and prompt_wav (a file) are required"
            )
        wav = await upload.read()
        if len(wav) > service.config.limits.max_prompt_audio_bytes:
            raise ProtocolError("too_large", "prompt_wav is too large")
        voice = await asyncio.to_thread(register, voice_id, wav, prompt_text)
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)
    return JSONResponse({"voice": voice.__dict__}, status_code=201)


async def voices(request: Request) -> Response:
    engine = service_of(request).engine
    return JSONResponse(
        {
            "engine": engine.name,
            "sample_rate": engine.sample_rate,
            "default_voice": engine.default_voice,
            "modes": list(engine.modes),
            "voices": [v.__dict__ for v in engine.voices()],
            "formats": list(FORMATS),
            "sample_rates": sorted({r for f in FORMATS for r in allowed_sample_rates(f, engine.sample_rate)}),
            "sample_rates_by_format": {f: list(allowed_sample_rates(f, engine.sample_rate)) for f in FORMATS},
        }
    )
