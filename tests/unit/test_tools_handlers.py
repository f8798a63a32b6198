"""The tools handler without a broker: a Request built as the runtime builds it, a real registry."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import structlog
from structlog.testing import LogCapture

from contracts import subjects
from contracts.definitions import Catalog, DefinitionsFile
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.errors import DeadlineExceeded, Forbidden, InvalidRequest, NotFound
from services.runtime.service import Request, Service
from services.runtime.settings import Settings
from services.tools.handlers import register
from services.tools.manifest import MANIFEST

DEFINITIONS = {
    "tools": [
        {
            "name": "echo",
            "python": {"callable": "tests.unit.test_tools_handlers:echo"},
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
        {"name": "stall", "python": {"callable": "tests.unit.test_tools_handlers:stall"}},
        {"name": "admin_export", "python": {"callable": "tests.unit.test_tools_handlers:echo"}},
    ],
    "tenants": [
        {"tenant": "acme", "tools": ["echo", "stall"]},
        {"tenant": "globex", "tools": ["echo", "admin_export"]},
    ],
}


def echo(ctx, **arguments):
    """What the tool saw: the runtime's context and the arguments left after cleaning."""
    return {"tenant": ctx.tenant_id, "run": ctx.run_id, "principal": ctx.principal, "arguments": arguments}


async def stall(ctx):
    await asyncio.Event().wait()


@pytest.fixture
async def tools():
    service = Service(dataclasses.replace(MANIFEST, audit=False), Settings(log_level="warning"))
    captured = LogCapture()
    service.log = structlog.wrap_logger(structlog.PrintLogger(), processors=[captured])
    registry = register(service, Catalog.merge([DefinitionsFile.model_validate(DEFINITIONS)]))
    handler = service.handlers["call"]

    async def call(tenant, tool, arguments=None, *, subject_tool=None, deadline_s=10.0):
        envelope = Envelope[ToolCall](
            kind=Kind.TOOL_CALL,
            tenant_id=tenant,
            run_id="run-7",
            principal="alice",
            deadline=deadline_in(deadline_s),
            payload=ToolCall(tool=tool, arguments=arguments or {}),
        )
        subject = subjects.parse(subjects.tool_call(tenant, subject_tool or tool))
        return await handler(Request(envelope, subject.tenant, subject, service))

    call.logs = captured.entries
    yield call
    await registry.aclose()


async def test_the_tool_gets_the_tenant_run_and_principal_from_the_request(tools):
    assert await tools("acme", "echo", {"q": "hi"}) == {
        "tenant": "acme",
        "run": "run-7",
        "principal": "alice",
        "arguments": {"q": "hi"},
    }


async def test_a_smuggled_tenant_id_is_removed_at_any_depth_and_logged(tools):
    result = await tools(
        "acme", "echo", {"q": "hi", "tenant_id": "globex", "filter": {"tenant_id": "globex", "n": [{"tenant": "x"}]}}
    )
    assert result["tenant"] == "acme"
    assert result["arguments"] == {"q": "hi", "filter": {"n": [{}]}}
    [warning] = [entry for entry in tools.logs if entry["event"] == "tenant_override_attempt"]
    assert warning["tenant_id"] == "acme" and warning["tool"] == "echo" and warning["log_level"] == "warning"
    assert warning["removed"] == ["tenant_id", "filter.tenant_id", "filter.n[0].tenant"]


async def test_a_clean_call_logs_no_override_attempt(tools):
    await tools("acme", "echo", {"q": "hi"})
    assert not [entry for entry in tools.logs if entry["event"] == "tenant_override_attempt"]


async def test_the_subjects_tool_must_be_the_payloads(tools):
    with pytest.raises(InvalidRequest, match="the subject names tool 'stall'"):
        await tools("acme", "echo", {"q": "hi"}, subject_tool="stall")


async def test_a_tool_of_another_tenants_policy_is_forbidden(tools):
    with pytest.raises(Forbidden):
        await tools("acme", "admin_export")
    assert (await tools("globex", "admin_export"))["tenant"] == "globex"


async def test_a_tenant_without_a_policy_is_forbidden_every_tool(tools):
    with pytest.raises(Forbidden):
        await tools("initech", "echo", {"q": "hi"})
    with pytest.raises(Forbidden):  # nor does it learn which tools exist
        await tools("initech", "nothing_here")


async def test_an_unknown_tool_is_not_found(tools):
    with pytest.raises(NotFound):
        await tools("acme", "nothing_here")


async def test_arguments_missing_a_required_key_are_refused_before_the_call(tools):
    with pytest.raises(InvalidRequest, match="'q' is a required property"):
        await tools("acme", "echo", {})


async def test_the_tool_runs_within_the_requests_remaining_deadline(tools):
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(tools("acme", "stall", deadline_s=0.1), timeout=5)
