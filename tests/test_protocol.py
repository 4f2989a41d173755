"""The sans-I/O protocol core, driven without a server: every message kind, every bad input, and
property-based runs over arbitrary message sequences."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.protocol import (
    CancelContext,
    Close,
    EndContext,
    FlushContext,
    Limits,
    OpenContext,
    Protocol,
    PushText,
    Send,
    SessionInfo,
)


def make(limits: Limits | None = None, modes=("sft",)) -> Protocol:
    def output_check(out, native):
        rate = out.sample_rate
        if rate is not None and rate not in (8000, 16000, 24000, 48000, native):
            return f"sample_rate {rate} is not supported"
        return None

    info = SessionInfo(
        native_rate=22050,
        default_voice="a",
        voices=frozenset({"a", "b"}),
        modes=modes,
        output_check=output_check,
        engine_name="test",
    )
    return Protocol(info, limits or Limits())


def send(p: Protocol, **msg) -> list:
    return p.receive_text(json.dumps(msg))


def frames(events) -> list[dict]:
    return [json.loads(e.data) for e in events if isinstance(e, Send) and isinstance(e.data, str)]


def only_error(events) -> dict:
    errs = [f for f in frames(events) if f["type"] == "error"]
    assert len(errs) == 1, events
    return errs[0]


def test_start_sends_ready_with_session_defaults():
    p = make()
    ev = send(p, type="start", voice="b", format="opus")
    (ready,) = frames(ev)
    assert ready["type"] == "ready" and ready["voice"] == "b" and ready["format"] == "opus"
    assert ready["sample_rate"] == 48000 and ready["session_id"] == p.session_id
    assert p.sample_rate == 48000


def test_first_text_without_start_opens_context_with_defaults_and_ready():
    p = make()
    ev = send(p, type="text", text="Hello ")
    assert frames(ev)[0]["type"] == "ready"
    opened = [e for e in ev if isinstance(e, OpenContext)]
    assert len(opened) == 1 and opened[0].options.voice == "a"
    cid = opened[0].context_id
    assert [e for e in ev if isinstance(e, PushText)] == [PushText(cid, "Hello ")]
    # id-less messages go to the current context
    assert send(p, type="text", text="world") == [PushText(cid, "world")]
    assert send(p, type="flush") == [FlushContext(cid)]
    assert send(p, type="end") == [EndContext(cid)]


def test_pcm_defaults_to_native_rate_and_mulaw_to_8k():
    p = make()
    send(p, type="start")
    assert p.sample_rate == 22050
    p = make()
    send(p, type="start", format="mulaw")
    assert p.sample_rate == 8000


def test_text_after_end_is_rejected_and_next_idless_text_opens_new_context():
    p = make()
    send(p, type="text", text="a", context_id="c1")
    send(p, type="end", context_id="c1")
    err = only_error(send(p, type="text", text="more", context_id="c1"))
    assert err["code"] == "bad_request" and err["context_id"] == "c1" and not err["fatal"]
    ev = send(p, type="text", text="next")
    opened = [e for e in ev if isinstance(e, OpenContext)]
    assert len(opened) == 1 and opened[0].context_id != "c1"


def test_done_finishes_context_and_reuse_of_finished_id_is_an_error():
    p = make()
    send(p, type="text", text="a", context_id="c1")
    send(p, type="end", context_id="c1")
    assert p.audio("c1", b"xx") == b"xx"
    done = json.loads(p.done("c1", {"audio_ms": 1}))
    assert done == {"type": "done", "context_id": "c1", "stats": {"audio_ms": 1}}
    assert p.open_contexts() == []
    assert only_error(send(p, type="text", text="b", context_id="c1"))["code"] == "bad_request"
    # a cancel racing with done is harmless
    assert send(p, type="cancel", context_id="c1") == []


def test_cancel_blocks_further_audio_and_acknowledges():
    p = make()
    send(p, type="text", text="a", context_id="c1")
    assert send(p, type="cancel", context_id="c1") == [CancelContext("c1")]
    assert p.audio("c1", b"late") is None
    assert p.mark("c1", 1, 10.0) is None
    assert p.done("c1", {}) is None
    assert json.loads(p.cancelled("c1")) == {"type": "cancelled", "context_id": "c1"}
    assert p.cancelled("c1") is None  # once only
    # cancelling twice before the ack is not two cancels
    send(p, type="text", text="a", context_id="c2")
    assert send(p, type="cancel", context_id="c2") == [CancelContext("c2")]
    assert send(p, type="cancel", context_id="c2") == []


def test_idless_cancel_is_barge_in_on_every_context():
    p = make(Limits(max_open_contexts=4))
    for c in ("x", "y", "z"):
        send(p, type="text", text="a", context_id=c)
    send(p, type="end", context_id="x")
    ev = send(p, type="cancel")
    assert sorted(e.context_id for e in ev) == ["x", "y", "z"]


def test_cancel_unknown_context_is_an_error():
    p = make()
    assert only_error(send(p, type="cancel", context_id="nope"))["code"] == "bad_request"


def test_json_transport_wraps_audio_with_seq():
    p = make()
    send(p, type="start", audio_transport="json")
    send(p, type="text", text="a", context_id="c")
    f1 = json.loads(p.audio("c", b"\x00\x01"))
    f2 = json.loads(p.audio("c", b"\x02"))
    assert f1["type"] == "audio" and f1["context_id"] == "c" and (f1["seq"], f2["seq"]) == (1, 2)
    assert base64.b64decode(f1["data"]) == b"\x00\x01"


def test_flushed_only_answers_a_requested_flush():
    p = make()
    send(p, type="text", text="a", context_id="c")
    assert p.flushed("c") is None
    send(p, type="flush", context_id="c")
    assert json.loads(p.flushed("c"))["type"] == "flushed"
    assert p.flushed("c") is None


@pytest.mark.parametrize(
    "raw, code",
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"text"', "bad_request"),
        ('{"type": "speak"}', "bad_request"),
        ('{"text": "no type"}', "bad_request"),
        ('{"type": "text", "text": "x", "colour": "blue"}', "bad_request"),
        ('{"type": "text", "text": 5}', "bad_request"),
        ('{"type": "text"}', "bad_request"),
        ('{"type": "text", "text": "x", "context_id": 7}', "bad_request"),
        ('{"type": "text", "text": "x", "context_id": ""}', "bad_request"),
        ('{"type": "start", "speed": "fast"}', "bad_request"),
        ('{"type": "start", "speed": true}', "bad_request"),
        ('{"type": "start", "speed": 9}', "bad_request"),
        ('{"type": "start", "format": "mp3"}', "bad_request"),
        ('{"type": "start", "format": "opus", "container": "wav"}', "bad_request"),
        ('{"type": "start", "sample_rate": 44100}', "bad_request"),
        ('{"type": "start", "sample_rate": "8000"}', "bad_request"),
        ('{"type": "start", "pacing": "slow"}', "bad_request"),
        ('{"type": "start", "audio_transport": "carrier pigeon"}', "bad_request"),
        ('{"type": "start", "voice": "nobody"}', "unknown_voice"),
        ('{"type": "start", "mode": "zero_shot"}', "bad_request"),
        ('{"type": "start", "mode": "telepathy"}', "bad_request"),
        ('{"type": "flush"}', "bad_request"),
        ('{"type": "end"}', "bad_request"),
        ('{"type": "start", "prompt_audio": "***"}', "bad_request"),
    ],
)
def test_malformed_messages_get_typed_nonfatal_errors(raw, code):
    p = make()
    events = p.receive_text(raw)
    err = only_error(events)
    assert err["code"] == code and err["fatal"] is False and err["message"]
    assert not any(isinstance(e, Close) for e in events)
    # and the socket keeps working
    assert any(isinstance(e, OpenContext) for e in send(p, type="text", text="ok"))


def test_deep_json_nesting_is_a_bad_request_not_a_crash():
    p = make()
    err = only_error(p.receive_text("[" * 100000 + "]" * 100000))
    assert err["code"] in ("bad_request", "too_large")


def test_oversize_frame_is_fatal_too_large_with_1009():
    p = make(Limits(max_frame_bytes=1000))
    events = send(p, type="text", text="x" * 2000)
    err = only_error(events)
    assert err["code"] == "too_large" and err["fatal"] is True
    assert Close(1009, err["message"][:120]) in events
    assert p.receive_text('{"type": "text", "text": "x"}') == []  # closed


def test_binary_frame_from_client_is_rejected():
    p = make()
    err = only_error(p.receive_bytes(b"\x00\x01"))
    assert err["code"] == "bad_request" and "binary" in err["message"]


def test_text_limits_per_delta_and_per_context():
    p = make(Limits(max_text_frame_chars=10, max_context_chars=15))
    assert only_error(send(p, type="text", text="x" * 11))["code"] == "too_large"
    send(p, type="text", text="x" * 10, context_id="c")
    err = only_error(send(p, type="text", text="x" * 6, context_id="c"))
    assert err["code"] == "too_large" and not err["fatal"]
    assert send(p, type="text", text="x" * 5, context_id="c") == [PushText("c", "x" * 5)]


def test_contexts_per_socket_are_bounded():
    p = make(Limits(max_open_contexts=2))
    send(p, type="text", text="a", context_id="1")
    send(p, type="text", text="a", context_id="2")
    err = only_error(send(p, type="text", text="a", context_id="3"))
    assert err["code"] == "overloaded" and not err["fatal"]
    p.cancelled("1")
    assert any(isinstance(e, OpenContext) for e in send(p, type="text", text="a", context_id="3"))


def test_start_twice_or_late_is_an_error():
    p = make()
    send(p, type="start")
    assert only_error(send(p, type="start"))["code"] == "bad_request"
    p = make()
    send(p, type="text", text="a")
    assert only_error(send(p, type="start"))["code"] == "bad_request"


def test_failed_start_can_be_retried():
    p = make()
    assert only_error(send(p, type="start", voice="zz"))["code"] == "unknown_voice"
    assert frames(send(p, type="start", voice="b"))[0]["type"] == "ready"


def test_per_context_voice_override_only_on_first_message():
    p = make()
    send(p, type="start", voice="a")
    ev = send(p, type="text", text="x", context_id="c", voice="b")
    assert [e for e in ev if isinstance(e, OpenContext)][0].options.voice == "b"
    assert only_error(send(p, type="text", text="y", context_id="c", voice="a"))["code"] == "bad_request"
    assert only_error(send(p, type="text", text="y", context_id="d", format="opus"))["code"] == "bad_request"


def test_bad_voice_options_on_a_named_context_name_it_and_spend_its_id():
    """A client that names its context hears which one was refused, and a later message to that
    id is refused too, instead of silently opening an empty context with the defaults."""
    p = make()
    send(p, type="start")
    err = only_error(send(p, type="text", text="hi", context_id="t1", voice="nobody"))
    assert (err["code"], err["context_id"], err["fatal"]) == ("unknown_voice", "t1", False)
    assert "t1" not in p.open_contexts()
    later = only_error(send(p, type="end", context_id="t1"))
    assert later["code"] == "bad_request" and later["context_id"] == "t1"
    # without a context id nothing was opened, so the error names none
    assert "context_id" not in only_error(send(p, type="text", text="hi", voice="nobody"))
    assert any(isinstance(e, OpenContext) for e in send(p, type="text", text="ok", context_id="t2"))


def test_zero_shot_needs_prompt_text_and_decodes_prompt_audio():
    p = make(modes=("sft", "zero_shot", "instruct2"))
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    assert only_error(send(p, type="start", mode="zero_shot", prompt_audio=wav))["code"] == "bad_request"
    ev = send(p, type="text", text="hi", mode="zero_shot", prompt_audio=wav, prompt_text="words")
    opts = [e for e in ev if isinstance(e, OpenContext)][0].options
    assert opts.prompt_audio == b"RIFF....WAVE" and opts.mode == "zero_shot"
    assert (
        only_error(send(p, type="text", text="hi", context_id="i", mode="instruct2", prompt_audio=wav))[
            "code"
        ]
        == "bad_request"
    )


def test_mode_not_supported_by_engine():
    p = make(modes=("sft",))
    err = only_error(send(p, type="start", mode="instruct2", instruct_text="x"))
    assert err["code"] == "bad_request" and "not supported" in err["message"]


def test_engine_failure_reports_and_finishes_context():
    p = make()
    send(p, type="text", text="a", context_id="c")
    err = json.loads(p.failed("c", "internal", "boom"))
    assert err == {"type": "error", "code": "internal", "message": "boom", "fatal": False, "context_id": "c"}
    assert p.open_contexts() == []


# ---- property-based: arbitrary sequences never break the invariants -------------------------
_ids = st.sampled_from([None, "c1", "c2", "c3"])
_messages = st.one_of(
    st.builds(
        lambda t, c: {"type": "text", "text": t, **({"context_id": c} if c else {})},
        st.text(max_size=12),
        _ids,
    ),
    st.builds(lambda c: {"type": "flush", **({"context_id": c} if c else {})}, _ids),
    st.builds(lambda c: {"type": "end", **({"context_id": c} if c else {})}, _ids),
    st.builds(lambda c: {"type": "cancel", **({"context_id": c} if c else {})}, _ids),
    st.builds(lambda v: {"type": "start", "voice": v}, st.sampled_from(["a", "b", "zz"])),
    st.just({"type": "bogus"}),
    st.builds(lambda k: {"type": "text", "text": "x", k: 1}, st.sampled_from(["extra", "sample_rate"])),
)
_engine_actions = st.sampled_from(["audio", "done", "cancelled", "flushed"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(_messages.map(lambda m: ("msg", m)), _engine_actions.map(lambda a: ("engine", a))),
        max_size=40,
    )
)
def test_any_message_sequence_keeps_invariants(steps):
    p = make(Limits(max_open_contexts=3, max_context_chars=30))
    opened: set[str] = set()
    live: set[str] = set()  # opened and not finished
    ended: set[str] = set()
    cancelling: set[str] = set()
    finished: set[str] = set()
    for kind, item in steps:
        if kind == "msg":
            events = p.receive_text(json.dumps(item))
            for e in events:
                # every event is well-formed and refers to a context in a legal state
                if isinstance(e, OpenContext):
                    assert e.context_id not in opened or e.context_id not in live
                    assert e.context_id not in finished
                    opened.add(e.context_id)
                    live.add(e.context_id)
                elif isinstance(e, (PushText, FlushContext)):
                    assert (
                        e.context_id in live and e.context_id not in ended and e.context_id not in cancelling
                    )
                elif isinstance(e, EndContext):
                    assert e.context_id in live and e.context_id not in ended
                    ended.add(e.context_id)
                elif isinstance(e, CancelContext):
                    assert e.context_id in live and e.context_id not in cancelling
                    cancelling.add(e.context_id)
                elif isinstance(e, Send):
                    f = json.loads(e.data)
                    assert f["type"] in ("ready", "error")
                    if f["type"] == "error":
                        assert f["code"] in ("bad_request", "unknown_voice", "too_large", "overloaded")
                        assert f["fatal"] is False
                else:
                    pytest.fail(f"unexpected event {e!r}")
            assert len(live) <= 3
        else:
            for cid in sorted(live):
                if item == "audio":
                    out = p.audio(cid, b"a")
                    assert (out is None) == (cid in cancelling)
                elif item == "done" and cid in ended and cid not in cancelling:
                    assert p.done(cid, {}) is not None
                    live.discard(cid)
                    finished.add(cid)
                elif item == "cancelled" and cid in cancelling:
                    assert p.cancelled(cid) is not None
                    live.discard(cid)
                    finished.add(cid)
                elif item == "flushed":
                    p.flushed(cid)
        assert set(p.open_contexts()) == live
