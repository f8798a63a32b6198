"""structlog, configured once per process: JSON in production, readable in a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(service: str, *, fmt: str = "console", level: str = "info") -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound to ``service``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        # Filtering happens before any processor runs, so debug calls on the hot path are cheap.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(service=service)
