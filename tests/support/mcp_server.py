"""A real MCP server for tests: ``python -m tests.support.mcp_server stdio|http PORT``.

Its customer lookup is per tenant: it answers for the tenant it is given, as a real multi-tenant
backend would, so a test can see which tenant the runtime passed.
"""

from __future__ import annotations

import sys

from mcp.server.fastmcp import Context, FastMCP

CUSTOMERS = {
    "acme": {"c-1": {"name": "Wile E. Coyote", "plan": "gold"}},
    "globex": {"c-1": {"name": "Hank Scorpio", "plan": "platinum"}},
}

server = FastMCP("corral-test-crm", host="127.0.0.1")


@server.tool()
def lookup_customer(customer: str, tenant_id: str) -> dict:
    """Look up a customer of the calling tenant."""
    found = CUSTOMERS.get(tenant_id, {}).get(customer)
    return {"tenant": tenant_id, "customer": customer, "found": found is not None, "record": found}


@server.tool()
def whoami(tenant_id: str, ctx: Context) -> dict:
    """Report the tenant argument and the tenant in the request's _meta."""
    meta = ctx.request_context.meta
    extra = meta.model_dump() if meta is not None else {}
    return {"argument": tenant_id, "meta": extra.get("corral/tenant_id")}


@server.tool()
def explode(tenant_id: str) -> str:
    """Always fails."""
    raise RuntimeError("backend exploded")


if __name__ == "__main__":
    if sys.argv[1] == "http":
        server.settings.port = int(sys.argv[2])
        server.run(transport="streamable-http")
    else:
        server.run(transport="stdio")
