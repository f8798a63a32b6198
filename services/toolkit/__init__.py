"""The tool runtime: adapters for Python callables, HTTP APIs and MCP servers, the per-tenant
bulkheads they run in, and the checked call path (:mod:`services.toolkit.runtime`). The tools
service serves it on the bus; the workflow service runs a `local` step's tool with it."""
