"""The envelope's ``trace``: a W3C traceparent, kept when valid, dropped (never an error) otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from contracts import traceparent
from contracts.envelope import Envelope, FollowEncoder, Kind, Result, RouterRequest, envelope_of, new_envelope_json
from services.runtime import tracing

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def request_with(trace: object) -> bytes:
    body = json.loads(new_envelope_json(Kind.REQUEST, "acme", RouterRequest()))
    body["trace"] = trace
    return json.dumps(body).encode()


def test_a_valid_traceparent_is_parsed_into_trace_id_span_id_and_flags():
    assert traceparent.parse(VALID) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")


@pytest.mark.parametrize(
    "value",
    [
        VALID.upper(),  # the spec's hex is lowercase
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # only version 00 is read
        VALID + "-extra",
        VALID[:-1],
        VALID + "\n",
        '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n{"level":"error"}',
        "x" * 100_000,  # oversized
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        42,
        ["00", "4bf9"],
        None,
    ],
)
def test_anything_else_is_not_a_traceparent(value):
    assert traceparent.parse(value) is None
    assert traceparent.valid_or_none(value) is None


@pytest.mark.parametrize("value", [VALID.upper(), "x" * 100_000, "evil\n\x1b[31m", 7, {"a": 1}])
def test_an_envelope_with_a_malformed_trace_is_accepted_without_it(value):
    envelope = envelope_of(RouterRequest).model_validate_json(request_with(value))
    assert envelope.trace is None


def test_an_envelope_keeps_a_valid_trace():
    assert envelope_of(RouterRequest).model_validate_json(request_with(VALID)).trace == VALID


def test_new_traceparents_are_valid_sampled_and_distinct():
    made = {traceparent.new_traceparent() for _ in range(1000)}
    assert len(made) == 1000
    assert len({traceparent.trace_id_of(t) for t in made}) == 1000
    for value in made:
        assert traceparent.parse(value) is not None
        assert value.endswith("-01")


def test_a_child_keeps_the_trace_id_and_flags_with_its_own_span_id():
    span = traceparent.new_span_id()
    child = traceparent.child(VALID, span)
    assert traceparent.parse(child) == ("4bf92f3577b34da6a3ce929d0e0e4736", span, "01")


def test_a_new_envelope_carries_the_trace_it_is_given():
    body = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(), trace=VALID)
    assert json.loads(body)["trace"] == VALID
    assert json.loads(new_envelope_json(Kind.REQUEST, "acme", RouterRequest()))["trace"] is None


def test_a_follower_carries_its_cause_s_trace_or_the_one_it_is_given():
    cause = envelope_of(RouterRequest).model_validate_json(request_with(VALID))
    assert json.loads(FollowEncoder(cause).encode(Kind.RESULT, Result(output=1)))["trace"] == VALID
    own = traceparent.child(VALID, traceparent.new_span_id())
    followed = json.loads(FollowEncoder(cause, trace=own).encode(Kind.RESULT, Result(output=1)))
    assert followed["trace"] == own
    assert Envelope[Result].model_validate(followed).trace == own


def test_a_subject_s_family_has_no_tenant():
    assert tracing.family("t.acme.tools.call.orders_lookup") == "t.*.tools.call.orders_lookup"
    assert tracing.family("corral.ping.graph") == "corral.ping.graph"


def test_tracing_is_off_by_default_and_then_nothing_of_opentelemetry_is_imported():
    code = (
        "import sys\n"
        "from services.registry import BY_NAME\n"
        "from services.runtime.service import Service\n"
        "from services.runtime.settings import Settings\n"
        "import corral.client\n"
        "service = Service(BY_NAME['tools'], Settings(log_level='warning'))\n"
        "assert service.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_tracing_on_without_opentelemetry_installed_fails_at_start_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry -> ImportError
    with pytest.raises(tracing.TracingUnavailable, match=r"corral\[traces\]"):
        tracing.start("graph", "console")


def test_otlp_without_an_endpoint_fails_at_start(monkeypatch):
    pytest.importorskip("opentelemetry.sdk")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    with pytest.raises(tracing.TracingUnavailable, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        tracing.start("graph", "otlp")
