"""A log that keeps what it was told, for tests that check a warning was (or was not) logged."""

from __future__ import annotations


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event, **fields):
        self.lines.append((event, fields))

    error = warning
