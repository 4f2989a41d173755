"""The one validation of client JSON: what it lets through unchanged and what it refuses, with a
typed bad_request that says why."""

from __future__ import annotations

import pytest

from realtime.errors import ERROR_CODES, ProtocolError
from realtime.validation import parse_json


@pytest.mark.parametrize(
    "text, value",
    [
        (
            '{"type": "start", "speed": 1.5, "seed": 123456789012345}',
            {"type": "start", "speed": 1.5, "seed": 123456789012345},
        ),
        ('{"text": "caf\\u00e9 \\ud83d\\ude00"}', {"text": "café 😀"}),  # a surrogate *pair* is one character
        ('{"a": [1, [2, [3]]], "b": -0.0}', {"a": [1, [2, [3]]], "b": -0.0}),
        ("[]", []),
        ('"just a string"', "just a string"),
    ],
)
def test_valid_json_passes_unchanged(text, value):
    assert parse_json(text) == value
    assert parse_json(text.encode()) == value


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{", "not valid JSON"),
        ('{"speed": 1' + "0" * 400 + "}", "out of range"),
        ("9" * 5000, "out of range"),
        ('{"speed": 1e999}', "out of range"),
        ('{"speed": 1.' + "0" * 100 + "}", "out of range"),
        ('{"speed": NaN}', "not a number JSON allows"),
        ('{"speed": Infinity}', "not a number JSON allows"),
        ('{"speed": -Infinity}', "not a number JSON allows"),
        ('{"context_id": "\\ud800"}', "surrogate"),
        ('{"\\udc00": 1}', "surrogate"),
        ('["ok", ["\\ud83d"]]', "surrogate"),
        ("[" * 10000 + "]" * 10000, "nested"),
        ("[" * 9 + "]" * 9, "nested more than 8"),
    ],
)
def test_what_the_service_cannot_take_is_a_typed_bad_request(text, needle):
    with pytest.raises(ProtocolError) as err:
        parse_json(text)
    assert err.value.code == "bad_request" and needle in err.value.message


def test_bytes_must_be_utf8():
    with pytest.raises(ProtocolError) as err:
        parse_json(b"\xff{}", what="body")
    assert err.value.message == "body is not valid UTF-8"


def test_every_error_code_has_a_close_code_and_an_http_status():
    for code, spec in ERROR_CODES.items():
        assert 1000 <= spec.close_code < 5000 and 400 <= spec.http_status < 600, code
    with pytest.raises(ValueError):
        ProtocolError("no_such_code", "x")
    e = ProtocolError("overloaded", "busy", retry_after_ms=250)
    assert (
        e.http_status == 503
        and e.close_code == 1013
        and e.body() == {"code": "overloaded", "message": "busy", "retry_after_ms": 250}
    )
