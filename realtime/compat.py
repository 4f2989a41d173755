"""HTTP routes that other servers' clients already call, over the same synthesis as ours.

- The official CosyVoice FastAPI routes (``/inference_sft`` ...): fields from the query string or
  the form body (urlencoded or multipart) on GET and on POST, as the official client sends them
  (``requests.request("GET", url, data=payload, files=files, stream=True)``), raw int16 PCM at the
  model's rate, streamed.
- The OpenAI speech API (``POST /v1/audio/speech``, ``GET /v1/models``): the ``openai`` SDK,
  Open WebUI and the OpenAI TTS adapters of LiveKit and Pipecat, pointed at this server.
- ``POST /api/tts/stream``, the streaming-WAV route of VoxCPM-style servers.

Fields another API defines but that mean nothing here are accepted and named in an
``X-Ignored-Fields`` response header; anything else unknown is a ``bad_request``, never misread.
"""

from __future__ import annotations

import base64
import json

from starlette.datastructures import FormData, QueryParams, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .audio.encoders import make_encoder
from .engines.base import EngineError, SynthesisOptions
from .errors import ProtocolError
from .protocol import parse_voice_options
from .routes.synthesis import read_body, read_form, read_json_object, synthesis_response
from .service import Service, error_from, service_of
from .validation import check_text

# ---- the official CosyVoice FastAPI server ---------------------------------------------------------

OFFICIAL_MODES = {
    "inference_sft": "sft",
    "inference_zero_shot": "zero_shot",
    "inference_cross_lingual": "cross_lingual",
    "inference_instruct": "instruct",
    "inference_instruct2": "instruct2",
}


async def _fields(request: Request, service: Service) -> tuple[dict[str, str], dict[str, UploadFile]]:
    """Text fields and uploaded files of a request, wherever the client put them: the query
    string, then a urlencoded or multipart body (on GET too, as the official client sends it)."""
    fields = dict(request.query_params.items())
    form: FormData | QueryParams = QueryParams()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await read_form(request, service.config.limits, service.config.body_timeout)
    elif request.method == "POST" or request.headers.get("content-length", "0") not in ("", "0"):
        await read_body(request, service.config.limits.max_frame_bytes, service.config.body_timeout)
    files: dict[str, UploadFile] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[key] = value
        else:
            fields[key] = value
    for key, value in fields.items():
        check_text(value, key)
    return fields, files


async def _upload(files: dict[str, UploadFile], service: Service, name: str) -> bytes | None:
    """The one file a route takes (``name``); any other file field is refused."""
    other = set(files) - {name}
    if other:
        raise ProtocolError("bad_request", f"unexpected file field(s) {sorted(other)}; the prompt is {name}")
    if name not in files:
        return None
    data = await files[name].read()
    if len(data) > service.config.limits.max_prompt_audio_bytes:
        raise ProtocolError("too_large", f"{name} is too large")
    return data


async def official(request: Request) -> Response:
    """``/inference_<mode>``: ``tts_text``, ``spk_id``, ``prompt_text``, ``instruct_text`` and the
    ``prompt_wav`` file; raw int16 PCM at the model's rate, streamed while it is synthesised.
    ``/inference_instruct`` (CosyVoice 1's speaker + instruct text) is spoken as instruct2 with
    that speaker's voice where the engine has instruct2."""
    route = request.url.path.strip("/")
    service = service_of(request)
    service.metrics.http_requests.labels("/" + route).inc()
    config, info = service.config, service.info
    try:
        fields, files = await _fields(request, service)
        prompt_wav = await _upload(files, service, "prompt_wav")
        text = fields.get("tts_text", "")
        if not text.strip():
            raise ProtocolError("bad_request", "tts_text is required")
        if len(text) > config.limits.max_context_chars:
            raise ProtocolError(
                "too_large", f"tts_text may hold at most {config.limits.max_context_chars} characters"
            )
        mode = OFFICIAL_MODES[route]
        if mode == "instruct":
            if "instruct2" not in info.modes:
                raise ProtocolError(
                    "bad_request",
                    f"/inference_instruct needs an engine that follows instructions "
                    f"(instruct2, e.g. cosyvoice2); engine {info.engine_name!r} cannot",
                )
            if not fields.get("instruct_text"):
                raise ProtocolError("bad_request", "instruct_text is required")
            mode = "instruct2"  # CosyVoice 1's speaker + instruction: instruct2 with that speaker's voice
        elif mode != "sft" and prompt_wav is None:
            raise ProtocolError("bad_request", f"/{route} needs the prompt_wav file field")
        requested = {
            "voice": fields.get("spk_id") or info.default_voice,
            "mode": mode,
            "prompt_text": fields.get("prompt_text"),
            "instruct_text": fields.get("instruct_text"),
        }
        voice = parse_voice_options(
            {k: v for k, v in requested.items() if v},
            SynthesisOptions(prompt_audio=prompt_wav),
            info,
            config.limits,
        )
        rate = service.engine.sample_rate
        encoder = make_encoder("pcm_s16le", rate, "raw", rate)
        return await synthesis_response(
            service,
            text,
            voice,
            encoder,
            "application/octet-stream",
            {"X-Sample-Rate": str(rate)},
        )
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)


# ---- OpenAI: POST /v1/audio/speech, GET /v1/models ----------------------------------------------------

# response_format -> (our format, container, sample rate): OpenAI's pcm and wav are 24 kHz 16-bit
OPENAI_FORMATS = {
    "mp3": ("mp3", "raw", 24000),
    "opus": ("opus", "ogg", 48000),
    "aac": ("aac", "raw", 24000),
    "flac": ("flac", "raw", 24000),
    "wav": ("pcm_s16le", "wav", 24000),
    "pcm": ("pcm_s16le", "raw", 24000),
}
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
_SPEECH_KEYS = {"model", "input", "voice", "instructions", "response_format", "speed", "stream_format"}
OPENAI_MAX_INPUT = 4096


def resolve_voice(name: str, service: Service) -> str:
    """Our voice for a requested name: one of ours, a configured alias (``--voice-alias``), or an
    OpenAI voice name (some adapters accept no other), which means the engine's default voice."""
    info = service.info
    if info.has_voice(name):
        return name
    aliases = service.config.voice_aliases
    if name in aliases:
        return aliases[name]
    if name in OPENAI_VOICES and info.default_voice is not None:
        return info.default_voice
    raise ProtocolError(
        "unknown_voice", f"unknown voice {name!r}; see GET /v1/voices (OpenAI's voice names are accepted too)"
    )


class SseAudio:
    """OpenAI's ``stream_format: "sse"``: every piece of encoded audio as a ``speech.audio.delta``
    event, then ``speech.audio.done`` (or an ``error`` event if the synthesis fails midway)."""

    media_type = "text/event-stream"

    def __init__(self, input_chars: int) -> None:
        self.input_chars = input_chars
        self.audio_bytes = 0

    @staticmethod
    def _event(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def frame(self, data: bytes) -> bytes:
        self.audio_bytes += len(data)
        return self._event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

    def done(self) -> bytes:
        # usage in what this server counts (OpenAI's token counts mean nothing here)
        return self._event(
            {
                "type": "speech.audio.done",
                "usage": {"input_characters": self.input_chars, "output_bytes": self.audio_bytes},
            }
        )

    def error(self, code: str, message: str) -> bytes:
        return self._event({"type": "error", "error": {"code": code, "message": message}})


async def speech(request: Request) -> Response:
    """``POST /v1/audio/speech``: JSON ``{model, input, voice, instructions?, response_format?,
    speed?, stream_format?}``; the audio streams from the first chunk."""
    service = service_of(request)
    service.metrics.http_requests.labels("/v1/audio/speech").inc()
    config, info = service.config, service.info
    try:
        body = await read_json_object(request, config, _SPEECH_KEYS)
        text, model, voice = body.get("input"), body.get("model"), body.get("voice")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError("bad_request", "input must be a non-empty string")
        if len(text) > min(OPENAI_MAX_INPUT, config.limits.max_context_chars):
            raise ProtocolError("too_large", f"input may hold at most {OPENAI_MAX_INPUT} characters")
        if not isinstance(model, str) or not model:
            raise ProtocolError("bad_request", "model is required (see GET /v1/models)")
        if isinstance(voice, dict):  # the newer {"id": ...} form
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise ProtocolError("bad_request", "voice is required")
        response_format = body.get("response_format", "mp3")
        if response_format not in OPENAI_FORMATS:
            raise ProtocolError("bad_request", f"response_format must be one of {list(OPENAI_FORMATS)}")
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            raise ProtocolError("bad_request", "stream_format must be 'audio' or 'sse'")
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, int | float):
            raise ProtocolError("bad_request", "speed must be a number")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ProtocolError("bad_request", "instructions must be a string")
        requested: dict = {"voice": resolve_voice(voice, service), "speed": speed}
        ignored = []
        if instructions and instructions.strip():
            if "instruct2" in info.modes:
                requested |= {"mode": "instruct2", "instruct_text": instructions}
            else:
                ignored.append("instructions")
        options = parse_voice_options(requested, SynthesisOptions(), info, config.limits)
        fmt, container, rate = OPENAI_FORMATS[response_format]
        encoder = make_encoder(fmt, rate, container, service.engine.sample_rate)
        headers = {"X-Ignored-Fields": ",".join(ignored)} if ignored else {}
        events = SseAudio(len(text)) if stream_format == "sse" else None
        return await synthesis_response(
            service,
            text,
            options,
            encoder,
            events.media_type if events else encoder.content_type,
            headers,
            events,
        )
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)


async def models(request: Request) -> Response:
    """``GET /v1/models``: the model names the speech route accepts (all speak with this engine)."""
    engine = service_of(request).engine
    names = (engine.name, *OPENAI_MODELS)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "cosyvoice-realtime"}
                for name in names
            ],
        }
    )


# ---- VoxCPM-style: POST /api/tts/stream -------------------------------------------------------------

# that API's tuning fields, which mean nothing to our engines: accepted, reported as ignored
VOXCPM_IGNORED = {
    "cfg_value",
    "inference_timesteps",
    "min_len",
    "max_len",
    "normalize",
    "denoise",
    "retry_badcase",
    "retry_badcase_max_times",
    "retry_badcase_ratio_threshold",
    "do_normalize",
}


async def tts_stream(request: Request) -> Response:
    """``POST /api/tts/stream``: form ``text``, optional ``prompt_audio`` file and ``prompt_text``
    (zero-shot where the engine has it); a 16-bit WAV at the engine's rate that plays while it
    downloads."""
    service = service_of(request)
    service.metrics.http_requests.labels("/api/tts/stream").inc()
    config, info = service.config, service.info
    try:
        fields, files = await _fields(request, service)
        prompt_audio = await _upload(files, service, "prompt_audio")
        unknown = set(fields) - {"text", "prompt_text", "voice"} - VOXCPM_IGNORED
        if unknown:
            raise ProtocolError("bad_request", f"unknown field(s) {sorted(unknown)}")
        text = fields.get("text", "")
        if not text.strip():
            raise ProtocolError("bad_request", "text is required")
        if len(text) > config.limits.max_context_chars:
            raise ProtocolError(
                "too_large", f"text may hold at most {config.limits.max_context_chars} characters"
            )
        requested: dict = {"voice": fields.get("voice") or info.default_voice}
        if prompt_audio is not None:
            if "zero_shot" not in info.modes:
                raise ProtocolError(
                    "bad_request",
                    f"prompt_audio (voice cloning) needs an engine with zero_shot; "
                    f"engine {info.engine_name!r} has {list(info.modes)}",
                )
            if not fields.get("prompt_text"):
                raise ProtocolError(
                    "bad_request",
                    "prompt_text (the words spoken in prompt_audio) is required with prompt_audio",
                )
            requested = {"mode": "zero_shot", "prompt_text": fields["prompt_text"]}
        elif fields.get("prompt_text"):
            raise ProtocolError("bad_request", "prompt_text goes with a prompt_audio file")
        options = parse_voice_options(
            {k: v for k, v in requested.items() if v},
            SynthesisOptions(prompt_audio=prompt_audio),
            info,
            config.limits,
        )
        rate = service.engine.sample_rate
        encoder = make_encoder("pcm_s16le", rate, "wav", rate)
        ignored = sorted(set(fields) & VOXCPM_IGNORED)
        headers = {"X-Ignored-Fields": ",".join(ignored)} if ignored else {}
        return await synthesis_response(service, text, options, encoder, "audio/wav", headers)
    except (ProtocolError, EngineError) as e:
        return error_from(e, service.metrics)


def compat_routes() -> list[Route]:
    return [
        *(Route(f"/{name}", official, methods=["GET", "POST"]) for name in OFFICIAL_MODES),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/api/tts/stream", tts_stream, methods=["POST"]),
    ]
