"""HTTP tools' URLs may name environment variables (``${NAME}``), filled in when the tool is built."""

from __future__ import annotations

import httpx
import pytest

from contracts.definitions import DefinitionError, HttpTool
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter
from services.toolkit.url_template import UnsetUrlVariable, expand_variables

CTX = ToolContext(tenant_id="acme", run_id=None, principal=None, timeout_s=5.0)


def test_a_variable_is_replaced_by_its_value():
    url = expand_variables("pay", "${API}/v1/{tenant_id}/refunds", {"API": "http://127.0.0.1:8790"})
    assert url == "http://127.0.0.1:8790/v1/{tenant_id}/refunds"


def test_a_url_without_variables_is_left_alone():
    assert expand_variables("pay", "http://x/{tenant_id}", {}) == "http://x/{tenant_id}"


@pytest.mark.parametrize("environ", [{}, {"API": ""}], ids=["unset", "empty"])
def test_an_unset_variable_is_a_definition_error_naming_it(environ):
    with pytest.raises(UnsetUrlVariable, match=r"tool 'pay'.*\$\{API\}.*API is not set") as raised:
        expand_variables("pay", "${API}/v1", environ)
    assert raised.value.code == "invalid_request"


def test_a_value_cannot_bring_in_a_placeholder():
    with pytest.raises(DefinitionError, match="API holds"):
        expand_variables("pay", "${API}/v1", {"API": "http://x/{tenant_id}"})


def test_a_dollar_brace_that_is_not_a_variable_name_is_refused():
    with pytest.raises(DefinitionError, match="does not start a variable"):
        expand_variables("pay", "http://x/${1st}", {})


async def test_the_tools_service_builds_the_url_from_the_environment_once(monkeypatch):
    monkeypatch.setenv("CORRAL_TEST_API", "http://127.0.0.1:8790")
    async with httpx.AsyncClient() as client:
        adapter = HttpAdapter("pay", HttpTool(method="POST", url="${CORRAL_TEST_API}/v1/{tenant_id}/refunds"), client)
        monkeypatch.setenv("CORRAL_TEST_API", "http://elsewhere.example")
        url, body, _ = adapter.build(CTX, {"order_id": "A-1"})
    assert str(url) == "http://127.0.0.1:8790/v1/acme/refunds" and body == {"order_id": "A-1"}


async def test_a_tool_whose_variable_is_unset_is_not_built(monkeypatch):
    monkeypatch.delenv("CORRAL_TEST_API", raising=False)
    async with httpx.AsyncClient() as client:
        with pytest.raises(UnsetUrlVariable, match="CORRAL_TEST_API"):
            HttpAdapter("pay", HttpTool(url="${CORRAL_TEST_API}/v1"), client)
