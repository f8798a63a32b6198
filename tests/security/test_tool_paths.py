"""Layer 3, tools: arguments cannot walk a tool out of its tenant's part of the world.

An HTTP tool's URL template names one tenant's resource; the arguments fill in the rest. Whatever
the arguments are (dot segments, encoded or double-encoded separators, Unicode look-alikes, an
empty segment, a value aimed at the host or the query's tenant), the request either goes to the
template's host, under the template's path, with the tenant's segment where the template put it,
or it is refused before anything is sent. Each HTTP case runs against a real local server that
records the path it received. The same holds for MCP tools (the tenant argument is the
runtime's, whatever its spelling) and for the demo data tool (nothing from the arguments reaches a
file path).
"""

from __future__ import annotations

import json
from urllib.parse import unquote

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.definitions import HttpTool
from contracts.definitions_base import DefinitionError
from contracts.errors import Forbidden, InvalidRequest
from corral.audit_reader import read_trail
from corral.client import CorralClient
from corral.demo.tools import find_order, lookup_incidents, lookup_orders, reload_settings
from services.auth.tokens import mint_dev_token
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter
from services.toolkit.url_template import UrlTemplate
from tests.support.http import Received, Reply, http_server
from tests.support.services import running_services

CTX = ToolContext(tenant_id="acme", run_id="run-1", principal=None, timeout_s=5.0)
RECORDS = "/v1/{tenant_id}/{collection}/{id}"


def records(request: Received) -> Reply:
    """A multi-tenant backend: ``/v1/<tenant>/...`` is that tenant's; ``/v1/globex`` is globex's record."""
    if request.path.split("?")[0] in ("/v1/globex", "/v1/globex/"):
        return Reply(body={"owner": "globex", "secret": "globex-secret"})
    return Reply(body={"owner": request.path.split("/")[2] if request.path.count("/") > 1 else None})


@pytest.fixture
async def client():
    async with httpx.AsyncClient(follow_redirects=False) as http:
        yield http


def tool(client, url, **config):
    return HttpAdapter("records", HttpTool(url=url, retries=0, **config), client)


# ---- the reported finding --------------------------------------------------------------------


async def test_a_dot_dot_collection_cannot_read_another_tenants_record(client):
    with http_server(records) as server, pytest.raises(InvalidRequest, match="'collection'"):
        await tool(client, server.url + RECORDS).call(CTX, {"collection": "..", "id": "globex"})
    assert server.received == []  # the tool was not called at all


# ---- what a path segment may not be, however it is spelled -----------------------------------

TRAVERSALS = {
    "dot dot": "..",
    "dot": ".",
    "encoded dot dot": "%2e%2e",
    "encoded dot dot, upper case": "%2E%2E",
    "half encoded": ".%2e",
    "double encoded": "%252e%252e",
    "triple encoded": "%25252e%25252e",
    "encoded slash": "..%2f",
    "encoded slash, upper case": "..%2F..%2Fglobex",
    "double encoded slash": "..%252f..%252fglobex",
    "slash": "../globex",
    "bare slash": "a/b",
    "backslash": "..\\globex",
    "encoded backslash": "..%5c",
    "encoded backslash, upper case": "%5C",
    "one dot leader": "\u2024\u2024",
    "two dot leader": "\u2025",
    "fullwidth full stops": "\uff0e\uff0e",
    "fullwidth solidus": "a\uff0fb",
    "fullwidth reverse solidus": "a\uff3cb",
    "division slash": "a\u2215b",
    "fullwidth percent signs": "\uff05\uff12\uff45\uff05\uff12\uff45",
    "overlong UTF-8 dot": "%c0%ae%c0%ae",
    "IIS %u escapes": "%u002e%u002e",
    "encoded too deep to follow": "%25252525252e",
    "path parameter after dot dot": "..;jsessionid=1",
    "three dots": "...",
    "dots and spaces": ". .",
    "empty": "",
    "NUL": "a%00b",
    "zero-width space after dot dot": "..\u200b",
    "question mark": "x?tenant=globex",
    "encoded question mark": "x%3F",
    "hash": "x#",
}


@pytest.mark.parametrize("value", TRAVERSALS.values(), ids=TRAVERSALS.keys())
async def test_a_path_argument_that_could_name_another_segment_is_refused_before_sending(client, value):
    with http_server(records) as server, pytest.raises(InvalidRequest, match="argument 'collection'"):
        await tool(client, server.url + RECORDS).call(CTX, {"collection": value, "id": "globex"})
    assert server.received == []


@pytest.mark.parametrize("value", ["..", "../../globex/orders", "%2e%2e%2f", ""])
async def test_every_path_argument_is_checked_not_only_the_first(client, value):
    with http_server(records) as server, pytest.raises(InvalidRequest, match="argument 'id'"):
        await tool(client, server.url + RECORDS).call(CTX, {"collection": "orders", "id": value})
    assert server.received == []


async def test_a_refusal_names_the_argument_without_echoing_a_long_value(client):
    value = "../" * 2000 + "globex"
    with pytest.raises(InvalidRequest) as caught:
        await tool(client, "http://127.0.0.1:9/v1/{tenant_id}/{collection}").call(CTX, {"collection": value})
    assert "'collection'" in caught.value.message
    assert len(caught.value.message) < 200 and "globex" not in caught.value.message


LEGITIMATE = {
    "plain": ("orders", "orders"),
    "space": ("my orders", "my%20orders"),
    "dots inside a name": ("v1.2..3", "v1.2..3"),
    "leading dots that are not a dot segment": ("..hidden", "..hidden"),
    "a literal percent sequence, sent as data": ("100%41", "100%2541"),
    "non-ASCII, percent-encoded as UTF-8": ("caf\u00e9", "caf%C3%A9"),
    "reserved characters, encoded": ("a+b&c=d@e:f", "a%2Bb%26c%3Dd%40e%3Af"),
}


@pytest.mark.parametrize(("value", "sent"), LEGITIMATE.values(), ids=LEGITIMATE.keys())
async def test_ordinary_path_arguments_reach_the_server_as_one_encoded_segment(client, value, sent):
    with http_server(records) as server:
        await tool(client, server.url + RECORDS).call(CTX, {"collection": value, "id": "7"})
    assert [request.path for request in server.received] == [f"/v1/acme/{sent}/7"]


# Made of what traversals are made of, so that most draws are near misses.
NEAR_MISSES = st.text(alphabet=st.sampled_from("./\\%25eEfFcC;? a\u2024\uff0e\uff0f\u2215"), max_size=12)


PROPERTY_TOOL = HttpAdapter(
    "records", HttpTool(url="http://api.internal" + RECORDS), httpx.AsyncClient()
)  # never sends


@settings(max_examples=500)
@given(collection=NEAR_MISSES | st.text(max_size=8), id=NEAR_MISSES)
def test_any_accepted_path_argument_is_exactly_one_segment_under_the_tenant(collection, id):
    try:
        url, _, _ = PROPERTY_TOOL.build(CTX, {"collection": collection, "id": id})
    except InvalidRequest:
        return
    segments = url.raw_path.split(b"/")
    assert segments[:3] == [b"", b"v1", b"acme"] and len(segments) == 5
    assert [unquote(part.decode()) for part in segments[3:]] == [collection, id]  # one decoding gives it back


# ---- the tenant's segment, wherever the template puts it --------------------------------------


@pytest.mark.parametrize(
    ("template", "arguments"),
    [
        ("/v1/{collection}/{tenant_id}/records", {"collection": ".."}),
        ("/v1/{collection}/{tenant_id}/records", {"collection": "globex%2f"}),
        ("/v1/{collection}/{tenant_id}/records", {"collection": ""}),
        ("/{collection}/{tenant_id}", {"collection": "%2e"}),
        ("/v1/{tenant_id}/{id}", {"id": "..%2fglobex"}),
    ],
)
async def test_no_argument_can_remove_or_replace_the_tenant_segment(client, template, arguments):
    with http_server(records) as server, pytest.raises(InvalidRequest):
        await tool(client, server.url + template).call(CTX, arguments)
    assert server.received == []


async def test_the_final_url_check_refuses_a_path_outside_the_template_prefix():
    """The last line of defence, should an argument check ever miss: what httpx would send
    (dot segments removed) must keep the template's prefix and the tenant segment."""
    template = UrlTemplate.parse("records", "http://api.internal/v1/{tenant_id}/{collection}/{id}")
    template.check(httpx.URL("http://api.internal/v1/acme/orders/7"), "acme")
    for sent in (
        "http://api.internal/v1/acme/../globex",  # httpx removes the dot segment: /v1/globex
        "http://api.internal/v1/globex/orders/7",  # another tenant's segment
        "http://api.internal/v1/acme/orders",  # a segment lost
        "http://api.internal/v1/acme/orders/7/extra",  # a segment gained
        "http://api.internal/v1/acme//7",  # an empty segment
        "http://evil.example/v1/acme/orders/7",  # another host
        "http://api.internal:8080/v1/acme/orders/7",  # another port
        "https://api.internal/v1/acme/orders/7",  # another scheme
    ):
        with pytest.raises(Forbidden):
            template.check(httpx.URL(sent), "acme")


# ---- the query and the host ------------------------------------------------------------------


async def test_a_query_argument_cannot_add_parameters_or_change_the_host(client):
    with http_server(records) as server:
        await tool(client, server.url + "/search?q={q}&tenant={tenant_id}").call(
            CTX, {"q": "x&tenant=globex#@evil.example:80/"}
        )
    [request] = server.received
    assert request.path == "/search?q=x%26tenant%3Dglobex%23%40evil.example%3A80%2F&tenant=acme"


async def test_a_query_argument_cannot_replace_a_parameter_the_template_sets(client):
    """httpx merges query arguments into the URL by *replacing* same-named parameters: an
    argument named like the template's tenant parameter would have become the tenant."""
    with http_server(records) as server:
        for name in ("org", "ORG", "Org"):
            with pytest.raises(InvalidRequest, match=f"argument {name!r}"):
                await tool(client, server.url + "/v1/records?org={tenant_id}").call(CTX, {name: "globex"})
    assert server.received == []


@pytest.mark.parametrize(
    "url",
    [
        "http://{host}/v1/{tenant_id}",
        "http://api.internal:{port}/v1/{tenant_id}",
        "http://{user}@api.internal/v1/{tenant_id}",
        "{base}/v1/{tenant_id}",
        "api.internal/v1/{tenant_id}",
        "http://api.internal/v1/{tenant_id}/../{id}",
    ],
)
def test_a_template_that_would_take_its_host_from_arguments_is_refused_at_load(client, url):
    with pytest.raises(DefinitionError):
        tool(client, url)


async def test_the_tenant_may_name_the_host_since_the_runtime_gives_it(client):
    template_url = "http://{tenant_id}.localhost:1/v1/{collection}"
    built, _, _ = tool(client, template_url).build(CTX, {"collection": "orders"})
    assert (built.host, built.raw_path) == ("acme.localhost", b"/v1/orders")


# ---- through a graph: a scripted model attacks, the runtime refuses ----------------------------


def definitions(server_url: str) -> dict:
    return {
        "tools": [
            {
                "name": "records",
                "http": {"url": server_url + RECORDS, "retries": 0},
                "parameters": {
                    "type": "object",
                    "properties": {"collection": {"type": "string"}, "id": {"type": "string"}},
                    "required": ["collection", "id"],
                },
            }
        ],
        "models": [
            {
                "name": "mallory",
                "scripted": {
                    "rules": [
                        {"contains": "globex-secret", "reply": "LEAKED"},
                        {"contains": "invalid_request", "reply": "I was refused."},
                        {
                            "contains": "walk",
                            "reply": {
                                "tool_call": {"name": "records", "arguments": {"collection": "..", "id": "globex"}}
                            },
                        },
                    ],
                    "default": "?",
                },
            }
        ],
        "graphs": [
            {
                "name": "assistant",
                "model": "mallory",
                "entry": "agent",
                "nodes": {"agent": {"kind": "agent", "prompt": "{input.text}", "tools": ["records"]}},
            }
        ],
        "tenants": [
            {
                "tenant": "acme",
                "default_route": "assistant",
                "routes": {"assistant": {"graph": "assistant"}},
                "tools": ["records"],
            }
        ],
    }


async def test_a_model_walking_up_the_url_template_is_refused_and_audited(secured, tmp_path):
    with http_server(records) as server:
        (tmp_path / "defs.yaml").write_text(yaml.safe_dump(definitions(server.url)))
        async with running_services(
            secured.url, secured.state_dir, ("auth", "router", "graph", "tools"), definitions=tmp_path / "defs.yaml"
        ) as services:
            client = await CorralClient.connect(
                secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
            )
            try:
                result = await client.request("walk up to globex")
            finally:
                await client.close()
            for service in services.values():
                await service.flushed()
    assert result.output == {"answer": "I was refused.", "tool_calls": 1}
    assert server.received == []
    trail = await read_trail(secured.url, "admin", secured.secrets.passwords["admin"], "acme")
    assert any(
        r.action == "tool_call" and r.outcome == "refused" and r.detail["tool"] == "records" for r in trail.records
    )


# ---- the demo data tool: nothing from the arguments reaches a path -----------------------------


@pytest.fixture
def shipped_data(monkeypatch):
    monkeypatch.delenv("CORRAL_DEMO_DATA", raising=False)
    reload_settings()
    yield
    reload_settings()


def demo_ctx(tenant: str) -> ToolContext:
    return ToolContext(tenant_id=tenant, run_id=None, principal=None, timeout_s=5.0)


@pytest.mark.parametrize(
    "query",
    ["../globex", "../globex/orders", "..\\globex", "%2e%2e/globex", "globex", "G-2201", "../globex G-2201", "/"],
)
async def test_a_demo_query_aimed_at_another_tenant_reads_nothing_of_it(shipped_data, query):
    result = await lookup_orders(demo_ctx("acme"), query)
    assert all(order["id"].startswith("A-") for order in result["orders"])
    assert result["order"] is None or result["order"]["id"].startswith("A-")
    assert "G-" not in json.dumps(result)


@pytest.mark.parametrize("category", ["../globex", "../globex/incidents", "..", "/"])
async def test_a_demo_incident_category_aimed_at_another_tenant_reads_nothing(shipped_data, category):
    assert (await lookup_incidents(demo_ctx("acme"), category)) == {"open": 0, "incidents": [], "summary": "none"}


@pytest.mark.parametrize("tenant", ["acme\n", "acme/../globex", "..", "%2e%2e", "acme\x00", "globex/", "\uff41cme"])
def test_the_demo_tool_revalidates_the_tenant_it_is_given(shipped_data, tenant):
    with pytest.raises(InvalidRequest):
        find_order(tenant, "A-1001")
