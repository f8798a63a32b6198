"""MCP servers as tools, over stdio and streamable HTTP, with the tenant passed by the runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

from contracts.definitions import Catalog, DefinitionsFile
from contracts.errors import ToolFailed
from corral.nats_server import free_port, wait_for_port
from services.toolkit.context import ToolContext
from services.toolkit.registry import ToolRegistry

SERVER = [sys.executable, "-m", "tests.support.mcp_server"]


def ctx(tenant):
    return ToolContext(tenant_id=tenant, run_id="run-1", principal=None, timeout_s=20)


def catalog_for(transport):
    tools = [
        {"name": "crm_lookup", "mcp": {"server": "crm", "tool": "lookup_customer"}},
        {"name": "crm_whoami", "mcp": {"server": "crm", "tool": "whoami"}},
        {"name": "crm_explode", "mcp": {"server": "crm", "tool": "explode"}},
    ]
    return Catalog.merge(
        [
            DefinitionsFile.model_validate(
                {
                    "mcp_servers": [{"name": "crm", **transport}],
                    "tools": tools,
                    "tenants": [{"tenant": "acme", "tools": ["crm_lookup", "crm_whoami", "crm_explode"]}],
                }
            )
        ]
    )


@pytest.fixture
def http_mcp():
    port = free_port()
    process = subprocess.Popen([*SERVER, "http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=30, process=process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(params=["stdio", "http"])
async def registry(request):
    if request.param == "stdio":
        transport = {"stdio": {"command": SERVER[0], "args": [*SERVER[1:], "stdio"]}}
    else:
        transport = {"http": {"url": request.getfixturevalue("http_mcp")}}
    tools = ToolRegistry(catalog_for(transport))
    await tools.discover()
    try:
        yield tools
    finally:
        await tools.aclose()


async def test_mcp_tools_are_listed_with_their_schema_minus_the_tenant(registry):
    schemas = {tool["name"]: tool["parameters"] for tool in registry.schemas_for("acme")}
    assert set(schemas["crm_lookup"]["properties"]) == {"customer"}
    assert schemas["crm_lookup"]["required"] == ["customer"]
    assert "tenant_id" not in str(schemas)


async def test_the_runtime_passes_the_tenant_as_argument_and_in_meta(registry):
    result = await registry.adapters["crm_whoami"].call(ctx("acme"), {})
    assert result == {"argument": "acme", "meta": "acme"}


async def test_each_tenant_sees_its_own_records_through_the_same_server(registry):
    acme = await registry.adapters["crm_lookup"].call(ctx("acme"), {"customer": "c-1"})
    globex = await registry.adapters["crm_lookup"].call(ctx("globex"), {"customer": "c-1"})
    assert acme["record"]["name"] == "Wile E. Coyote"
    assert globex["record"]["name"] == "Hank Scorpio"


async def test_a_failing_mcp_tool_is_a_tool_failure(registry):
    with pytest.raises(ToolFailed, match="crm_explode"):
        await registry.adapters["crm_explode"].call(ctx("acme"), {})
    # ...and the session keeps serving.
    assert (await registry.adapters["crm_whoami"].call(ctx("acme"), {}))["argument"] == "acme"


async def test_an_unreachable_mcp_server_is_a_tool_failure_not_a_hang():
    tools = ToolRegistry(catalog_for({"http": {"url": f"http://127.0.0.1:{free_port()}/mcp"}, "timeout_s": 3}))
    try:
        await tools.discover()  # logs and carries on
        with pytest.raises(ToolFailed, match=r"unavailable|did not start"):
            await tools.adapters["crm_whoami"].call(ctx("acme"), {})
    finally:
        await tools.aclose()
