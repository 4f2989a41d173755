"""What operators and browsers fetch: health and readiness probes, Prometheus metrics, and the
browser client's static files.
"""

from __future__ import annotations

import importlib.resources

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..metrics import CONTENT_TYPE
from ..service import error_response, service_of


# ---- service routes ---------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    service = service_of(request)
    admission = service.runtime.admission
    return JSONResponse(
        {
            "status": "draining" if service.lifecycle.draining else "ok",
            "engine": service.engine.name,
            "sample_rate": service.engine.sample_rate,
            "sessions": service.sessions,
            "streams": admission.active,
            "capacity": admission.capacity,
            "waiting": admission.waiting,
            "load": service.load,
        }
    )


async def health_live(request: Request) -> Response:
    """Liveness: the process answers (a draining replica is alive)."""
    return JSONResponse({"status": "alive"})


async def health_ready(request: Request) -> Response:
    """Readiness: the model is loaded (the app exists only once it is), the replica is not
    draining, and it has a free place; 503 otherwise, so the balancer sends new clients elsewhere."""
    service = service_of(request)
    admission = service.runtime.admission
    reason = (
        "draining"
        if service.lifecycle.draining
        else "at capacity"
        if admission.active >= admission.capacity
        else None
    )
    body = {"status": "ready" if reason is None else "not ready", "load": service.load}
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE)


# ---- static web client ----------------------------------------------------------------------------
_STATIC_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def is_static(path: str) -> bool:
    if path in ("/", "/index.html"):
        return True
    name = path.rsplit("/", 1)[-1]
    return (path.startswith("/static/") or path.count("/") == 1) and any(
        name.endswith(s) for s in _STATIC_TYPES
    )


async def static_file(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    if "/" in name or name.startswith(".") or not any(name.endswith(s) for s in _STATIC_TYPES):
        return error_response("not_found", f"{request.url.path} not found")
    path = importlib.resources.files("realtime.web") / name
    if not path.is_file():
        return error_response("not_found", f"{name} not found")
    suffix = name[name.rfind(".") :]
    return FileResponse(str(path), media_type=_STATIC_TYPES[suffix], headers={"Cache-Control": "no-cache"})
