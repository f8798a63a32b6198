"""The tools service's declaration: tool calls in, answered with the tool's output."""

from contracts import subjects
from contracts.envelope import Kind, ToolCall
from services.runtime.manifest import Consume, Manifest
from services.toolkit.settings import ToolsSettings

MANIFEST = Manifest(
    name="tools",
    summary="Tool adapters (Python callables, HTTP/REST, MCP servers) with the tenant injected by the runtime",
    consumes=(
        Consume(
            "call",
            subjects.TOOL_CALLS,
            Kind.TOOL_CALL,
            ToolCall,
            "Call a tool for the tenant of the subject; the runtime injects the tenant",
        ),
    ),
    settings=ToolsSettings,
)
