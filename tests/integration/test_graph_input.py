"""The router checks a request's input against its graph's input schema and the tenant's size
limit (which counts the input, not the envelope around it), over a real broker."""

from __future__ import annotations

import pytest
import yaml

from contracts.errors import InvalidRequest
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

LIMIT = 1024
DEFINITIONS = {
    "graphs": [
        {
            "name": "echo",
            "input_schema": {
                "type": "object",
                "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
                "required": ["text"],
            },
            "entry": "say",
            "nodes": {"say": {"kind": "respond", "template": "{input.text}"}},
        }
    ],
    "tenants": [
        {"tenant": "acme", "default_route": "echo", "routes": {"echo": {"graph": "echo"}}, "max_input_bytes": LIMIT}
    ],
}


@pytest.fixture
async def acme(secured, tmp_path):
    path = tmp_path / "defs.yaml"
    path.write_text(yaml.safe_dump(DEFINITIONS))
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph"), definitions=path):
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            yield client
        finally:
            await client.close()


async def test_an_input_outside_the_graphs_input_schema_is_refused_naming_the_field(acme):
    with pytest.raises(InvalidRequest, match=r"the input of 'echo' does not match its schema: input: 'text' is a"):
        await acme.request(input={"txt": "hello"}, watch=False)
    with pytest.raises(InvalidRequest, match=r"input\['times'\]: 'twice' is not of type 'integer'"):
        await acme.request(input={"text": "hello", "times": "twice"}, watch=False)
    assert (await acme.request(input={"text": "hello", "times": 2}, watch=False)).output == "hello"


async def test_an_input_just_under_the_limit_is_admitted_though_its_envelope_is_over_it(acme):
    text = "x" * (LIMIT - len('{"text":""}'))
    assert (await acme.request(input={"text": text}, watch=False)).output == text
    with pytest.raises(InvalidRequest, match=f"input of {LIMIT + 1} bytes is over the tenant's limit of {LIMIT}"):
        await acme.request(input={"text": text + "x"}, watch=False)
