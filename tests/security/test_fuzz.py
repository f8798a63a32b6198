"""Property-based fuzzing of everything that parses untrusted input: never an unhandled
exception, never a subject outside ``t.<tenant>.``."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import subjects
from contracts.envelope import Envelope, RouterRequest, ToolCall
from contracts.errors import InvalidRequest
from contracts.expressions import ExpressionError, compile_expression, evaluate
from contracts.replies import decode_reply
from contracts.tenants import is_tenant_id
from services.runtime.service import decode_request
from services.toolkit.arguments import TENANT_KEYS, strip_tenant

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
VALID = {"kind": "request", "tenant_id": "acme", "payload": {"input": {"text": "hi"}}}
FIELDS = [
    "id",
    "schema_version",
    "kind",
    "tenant_id",
    "principal",
    "run_id",
    "correlation_id",
    "causation_id",
    "created_at",
    "deadline",
    "trace",
    "idempotency_key",
    "payload",
    "extra",
]


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_to_a_typed_error_or_an_envelope(body):
    with contextlib.suppress(InvalidRequest):
        decode_request(body, Envelope[RouterRequest])


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5))
def test_a_valid_envelope_with_fuzzed_fields_is_refused_cleanly_or_stays_in_its_tenant(changes):
    body = json.dumps({**VALID, **changes}).encode()
    for envelope_type in (Envelope[RouterRequest], Envelope[ToolCall]):
        try:
            envelope = decode_request(body, envelope_type)
        except InvalidRequest:
            continue
        assert is_tenant_id(envelope.tenant_id)
        assert subjects.router_request(envelope.tenant_id, "dev").startswith(f"t.{envelope.tenant_id}.")
        if envelope.run_id is not None:
            assert subjects.events(envelope.tenant_id, envelope.principal, envelope.run_id).count(".") == 4


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_parsing_any_subject_never_escapes_the_tenant_namespace(subject):
    try:
        parsed = subjects.parse(subject)
    except InvalidRequest:
        return
    assert subject.startswith(f"t.{parsed.tenant}.")
    assert is_tenant_id(parsed.tenant)
    assert "*" not in subject.split(".") and ">" not in subject.split(".")


@settings(max_examples=300)
@given(st.text(max_size=70), st.text(max_size=70))
def test_built_subjects_always_parse_back_to_their_tenant(tenant, tool):
    try:
        subject = subjects.tool_call(tenant, tool)
    except InvalidRequest:
        return
    assert subjects.parse(subject).tenant == tenant
    assert subjects.parse(subject).tool == tool


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_replies_decode_to_a_typed_error_or_an_output(body):
    from contracts.errors import CorralError

    with contextlib.suppress(CorralError):
        decode_reply(body)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(sorted(TENANT_KEYS)), json_values, max_size=6))
def test_no_tenant_key_survives_argument_cleaning_at_any_depth(arguments):
    cleaned, _ = strip_tenant(arguments)

    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    assert not set(keys(cleaned)) & TENANT_KEYS


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_expressions_either_compile_safely_or_are_refused(source):
    try:
        compiled = compile_expression(source)
    except ExpressionError:
        return
    evaluate(compiled, {"input": {"a": 1}})  # must not raise


@settings(max_examples=300)
@given(
    principal=st.none() | st.text(max_size=40),
    trace=st.none() | st.text(max_size=40),
    correlation=st.none() | st.text(max_size=40),
)
def test_the_fast_envelope_encoder_writes_exactly_what_the_model_would(principal, trace, correlation):
    from contracts.envelope import FollowEncoder, Kind, Result, deadline_in

    cause = Envelope[RouterRequest](
        kind=Kind.REQUEST,
        tenant_id="acme",
        run_id="r-1",
        principal=principal,
        trace=trace,
        correlation_id=correlation,
        deadline=deadline_in(5),
        payload=RouterRequest(),
    )
    payload = Result(output={"text": principal or "x"})
    model = cause.follow(Kind.RESULT, payload)
    for until in (None, cause.deadline.timestamp()):  # the deadline from the datetime or a timestamp
        fast = Envelope[Result].model_validate_json(FollowEncoder(cause, until).encode(Kind.RESULT, payload))
        assert fast.model_dump(exclude={"id", "created_at"}) == model.model_dump(exclude={"id", "created_at"})


@settings(max_examples=200)
@given(
    run_id=st.none() | st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    target=st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
    text=st.text(max_size=40),
    stream=st.booleans(),
    seconds=st.none() | st.floats(min_value=-5, max_value=3600),
    as_timestamp=st.booleans(),
)
def test_a_new_envelope_written_directly_is_what_the_model_would_write(
    run_id, target, text, stream, seconds, as_timestamp
):
    from contracts.envelope import Kind, deadline_in, new_envelope_json

    payload = RouterRequest(target=target, input={"text": text}, stream=stream)
    deadline = None if seconds is None else deadline_in(seconds)
    given_deadline = deadline.timestamp() if as_timestamp and deadline is not None else deadline
    fast = Envelope[RouterRequest].model_validate_json(
        new_envelope_json(Kind.REQUEST, "acme", payload, run_id=run_id, deadline=given_deadline)
    )
    model = Envelope[RouterRequest](
        kind=Kind.REQUEST, tenant_id="acme", run_id=run_id, deadline=deadline, payload=payload
    )
    assert fast.model_dump(exclude={"id", "created_at"}) == model.model_dump(exclude={"id", "created_at"})


@settings(max_examples=400)
@given(value=st.text(max_size=70) | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}\n?", fullmatch=True))
def test_envelopes_accept_exactly_the_tenant_ids_and_names_the_grammar_accepts(value):
    from pydantic import ValidationError

    from contracts.envelope import Kind, ToolCall
    from contracts.tenants import InvalidIdentifier, is_tenant_id, validate_name

    def accepted(build):
        try:
            build()
        except ValidationError:
            return False
        return True

    assert accepted(lambda: Envelope[RouterRequest](kind=Kind.REQUEST, tenant_id=value, payload=RouterRequest())) == (
        is_tenant_id(value)
    )
    try:
        validate_name(value)
        valid_name = True
    except InvalidIdentifier:
        valid_name = False
    assert accepted(lambda: ToolCall(tool=value)) == valid_name
