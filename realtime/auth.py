"""Token check shared by every route.  Three carriers, because each kind of client can set a
different one: ``Authorization: Bearer`` (most clients), ``X-API-TOKEN`` (what the official
CosyVoice deployments send), and ``?token=`` (browsers cannot set headers on a WebSocket)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def presented_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token a request carries, without surrounding whitespace: HTTP excludes it from a
    header's value, and some HTTP parsers strip it while others do not, so we strip it everywhere
    (one rule for the WebSocket and for HTTP)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for value in (headers.get("x-api-token"), query.get("token")):
        if value and value.strip():
            return value.strip()
    return None


def check_token(expected: str | None, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """None when the request may pass; otherwise ``"missing"`` or ``"invalid"``."""
    if not expected:
        return None
    got = presented_token(headers, query)
    if got is None:
        return "missing"
    if not hmac.compare_digest(got.encode(), expected.encode()):
        return "invalid"
    return None
