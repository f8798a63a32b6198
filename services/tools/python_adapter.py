"""Python callables as tools: ``function(ctx, **arguments)``, sync or async."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from contracts.definitions import PythonTool
from contracts.errors import CorralError, DeadlineExceeded, ToolFailed
from services.tools.context import ToolContext


class PythonAdapter:
    """Imports the callable once; async functions run on the loop, sync ones in a worker thread."""

    def __init__(self, name: str, config: PythonTool) -> None:
        self.name = name
        module_name, _, attribute = config.callable.partition(":")
        try:
            self.function: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ToolFailed(f"tool {name!r}: cannot import {config.callable!r}: {exc}") from None
        self.is_async = inspect.iscoroutinefunction(self.function)

    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        try:
            async with asyncio.timeout(ctx.timeout_s):
                if self.is_async:
                    return await self.function(ctx, **arguments)
                return await asyncio.to_thread(self.function, ctx, **arguments)
        except TimeoutError:
            raise DeadlineExceeded(f"tool {self.name!r} did not finish within {ctx.timeout_s:.1f}s") from None
        except CorralError:
            raise
        except TypeError as exc:
            raise ToolFailed(f"tool {self.name!r} rejected its arguments: {exc}") from None
        except Exception as exc:
            raise ToolFailed(f"tool {self.name!r} failed: {type(exc).__name__}") from exc
