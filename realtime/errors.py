"""The service's error codes, and what each becomes on the wire.

One table, so that a code means the same on the WebSocket (error frame, close code when fatal) and
over HTTP (status, JSON body): a client that handles ``overloaded`` from one handles it from both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    close_code: int  # WebSocket close code when the error is fatal
    http_status: int


ERROR_CODES: dict[str, ErrorCode] = {
    "bad_request": ErrorCode(1008, 400),
    "unauthorized": ErrorCode(1008, 401),
    "not_found": ErrorCode(1008, 404),
    "method_not_allowed": ErrorCode(1008, 405),
    "unknown_voice": ErrorCode(1008, 404),
    "conflict": ErrorCode(1008, 409),
    "unsupported_language": ErrorCode(1008, 422),  # nothing of the text is in the voice's languages
    "too_large": ErrorCode(1009, 413),
    "timeout": ErrorCode(1008, 408),  # the client left the service waiting (no text, no read)
    "overloaded": ErrorCode(1013, 503),
    "going_away": ErrorCode(1001, 503),  # draining for a shutdown: reconnect, another replica answers
    "internal": ErrorCode(1011, 500),
}


class ProtocolError(Exception):
    """A request refused with a typed error.  ``retry_after_ms`` goes with ``overloaded``: when
    trying again is likely to succeed."""

    def __init__(
        self,
        code: str,
        message: str,
        context_id: str | None = None,
        fatal: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.message = message
        self.context_id = context_id
        self.fatal = fatal
        self.retry_after_ms = retry_after_ms

    @property
    def http_status(self) -> int:
        return ERROR_CODES[self.code].http_status

    @property
    def close_code(self) -> int:
        return ERROR_CODES[self.code].close_code

    def body(self) -> dict[str, object]:
        """The ``error`` object of an HTTP error response."""
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.retry_after_ms is not None:
            body["retry_after_ms"] = self.retry_after_ms
        return body
