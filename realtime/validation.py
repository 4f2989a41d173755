"""One validation of client JSON for every route: the WebSocket protocol and the HTTP bodies.

``json.loads`` alone accepts things the rest of the service cannot take: integers of thousands of
digits (slow to convert, then an ``OverflowError`` in ``float()``), ``NaN`` and ``Infinity``,
lone UTF-16 surrogates from ``\\ud800`` escapes (a str that cannot be encoded back to UTF-8, so
even the error frame echoing it fails), and nesting deep enough to exhaust the recursion limit
of whatever walks it next.  :func:`parse_json` refuses all of them with a typed ``bad_request``
before any other code sees the value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .errors import ProtocolError

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int = 8  # our messages are flat objects; a little room for nested settings
    max_int_digits: int = 15  # well inside a double's exact range (2**53 has 16 digits)
    max_number_chars: int = 32  # a float literal longer than this is not a setting


DEFAULT_JSON_LIMITS = JsonLimits()


class _Refused(Exception):
    """Raised inside the decoder's hooks; carries the reason out of ``json.loads``."""


def parse_json(data: str | bytes, limits: JsonLimits = DEFAULT_JSON_LIMITS, what: str = "message") -> object:
    """Decode ``data`` (a str, or UTF-8 bytes) and check every value in it; raises
    :class:`ProtocolError` (``bad_request``) with a message that says what is wrong."""
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_request", f"{what} is not valid UTF-8") from None

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > limits.max_int_digits:
            raise _Refused(f"integer {s[:20]}… is out of range")
        return int(s)

    def parse_float(s: str) -> float:
        value = float(s) if len(s) <= limits.max_number_chars else math.inf
        if not math.isfinite(value):
            raise _Refused(f"number {s[:20]} is out of range")
        return value

    def parse_constant(s: str) -> float:
        raise _Refused(f"{s} is not a number JSON allows")

    try:
        value = json.loads(data, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except _Refused as e:
        raise ProtocolError("bad_request", f"{what}: {e}") from None
    except RecursionError:
        raise ProtocolError("bad_request", f"{what} is nested too deeply") from None
    except ValueError:  # JSONDecodeError
        raise ProtocolError("bad_request", f"{what} is not valid JSON") from None
    check_value(value, limits, what)
    return value


def check_value(value: object, limits: JsonLimits = DEFAULT_JSON_LIMITS, what: str = "message") -> None:
    """Depth and Unicode checks over a decoded value (iterative: depth is what is being bounded)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, what)
        elif isinstance(item, dict | list):
            if depth > limits.max_depth:
                raise ProtocolError(
                    "bad_request", f"{what} is nested more than {limits.max_depth} levels deep"
                )
            if isinstance(item, dict):
                for k, v in item.items():
                    check_text(k, what)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)


def check_text(s: str, what: str = "message") -> None:
    """A string from a client must be encodable as UTF-8: no lone surrogates."""
    if _SURROGATE.search(s):
        raise ProtocolError("bad_request", f"{what} holds an unpaired UTF-16 surrogate (invalid Unicode)")
