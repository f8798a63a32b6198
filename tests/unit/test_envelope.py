"""The envelope: validated on arrival, unknown fields refused, errors typed."""

import pytest

from contracts.envelope import Envelope, ErrorInfo, Kind, Result, RouterRequest, ToolCall, deadline_in
from contracts.errors import DeadlineExceeded, ErrorCode, InvalidRequest, NotFound, error_for
from contracts.replies import decode_reply
from services.runtime.service import decode_request

RequestEnvelope = Envelope[RouterRequest]


def request(**changes):
    fields = {"kind": Kind.REQUEST, "tenant_id": "acme", "payload": RouterRequest(input={"text": "hi"})}
    fields.update(changes)
    return RequestEnvelope(**fields)


def test_an_envelope_survives_the_wire():
    original = request(run_id="run1", deadline=deadline_in(5))
    decoded = decode_request(original.model_dump_json().encode(), RequestEnvelope)
    assert decoded == original


def test_follow_keeps_tenant_run_and_deadline_and_links_causation():
    original = request(run_id="run1", deadline=deadline_in(5), principal="alice")
    child = original.follow(Kind.TOOL_CALL, ToolCall(tool="x"))
    assert (child.tenant_id, child.run_id, child.deadline, child.principal) == (
        "acme",
        "run1",
        original.deadline,
        "alice",
    )
    assert child.causation_id == original.id and child.correlation_id == original.id


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"kind": "request", "tenant_id": "acme", "payload": {}, "sneaky": 1}',
        b'{"kind": "request", "tenant_id": "ACME", "payload": {}}',
        b'{"kind": "request", "tenant_id": "acme", "schema_version": 99, "payload": {}}',
        b'{"kind": "request", "tenant_id": "acme", "payload": {"target": "a.b"}}',
        b'{"kind": "request", "tenant_id": "acme", "payload": {"input": "not an object"}}',
        b'{"kind": "request", "tenant_id": "acme", "run_id": "x.>", "payload": {}}',
    ],
)
def test_bad_bodies_are_invalid_requests(body):
    with pytest.raises(InvalidRequest):
        decode_request(body, RequestEnvelope)


def test_oversized_bodies_are_refused_before_parsing():
    with pytest.raises(InvalidRequest, match="over the"):
        decode_request(b" " * (1024 * 1024 + 1), RequestEnvelope)


def test_deep_nesting_is_refused_cleanly():
    body = b'{"kind": "request", "tenant_id": "acme", "payload": {"input": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}}"
    with pytest.raises(InvalidRequest):
        decode_request(body, RequestEnvelope)


def test_an_error_reply_raises_its_typed_error():
    reply = request().follow(Kind.ERROR, ErrorInfo.of(NotFound("unknown target 'x'")))
    with pytest.raises(NotFound, match="unknown target") as caught:
        decode_reply(reply.model_dump_json().encode())
    assert caught.value.remote


def test_a_result_reply_returns_its_output():
    reply = request().follow(Kind.RESULT, Result(output={"answer": 42}))
    assert decode_reply(reply.model_dump_json().encode()) == {"answer": 42}


def test_remaining_is_negative_after_the_deadline():
    assert request(deadline=deadline_in(-1)).remaining(10) < 0
    assert request().remaining(10) == 10


def test_unknown_error_codes_become_internal():
    assert error_for("no_such_code", "x").code is ErrorCode.INTERNAL
    assert isinstance(error_for("deadline_exceeded", "x"), DeadlineExceeded)


def test_created_at_is_the_current_utc_time_with_microseconds():
    from datetime import UTC, datetime, timedelta

    from contracts.envelope import now_iso

    before = datetime.now(UTC)
    text = now_iso()
    after = datetime.now(UTC)
    stamp = datetime.fromisoformat(text)
    assert stamp.utcoffset() == timedelta(0) and len(text.split(".")[1]) == len("000000+00:00")
    # Rounded to the nearest microsecond.
    assert before - timedelta(microseconds=1) <= stamp <= after + timedelta(microseconds=1)


def tool_request():
    """A request as the runtime builds it for a tool call of acme."""
    from contracts import subjects
    from services.runtime.service import Request, Service
    from services.runtime.settings import Settings
    from services.tools.manifest import MANIFEST

    cause = Envelope[ToolCall](kind=Kind.TOOL_CALL, tenant_id="acme", run_id="r-1", payload=ToolCall(tool="t"))
    return Request(cause, "acme", subjects.parse("t.acme.tool.t.call"), Service(MANIFEST, Settings()))


@pytest.mark.parametrize("output", [{"a": [1, "x", None]}, "text", 3.5, None, Result(output={"b": True})])
def test_a_handler_output_becomes_a_result_reply(output):
    from services.runtime.request import encode_result as _encode_result

    expected = output.output if isinstance(output, Result) else output
    assert decode_reply(_encode_result(tool_request(), output)) == expected


def test_a_handler_output_that_is_not_json_is_an_internal_error_not_a_crash():
    from contracts.errors import Internal
    from services.runtime.request import encode_result as _encode_result

    with pytest.raises(Internal, match="not JSON"):
        _encode_result(tool_request(), {"value": object()})
