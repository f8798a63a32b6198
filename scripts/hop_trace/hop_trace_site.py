"""Loaded (through ``sitecustomize``) by every Python process started with this folder on
``PYTHONPATH``; ``scripts/hop_trace.py`` starts the services that way. With ``CORRAL_HOP_TRACE``
set to a folder, it timestamps each message as the process reads it, starts its handler and
writes the next one, and leaves them in ``<folder>/<pid>.trace`` when the process exits. Without
the variable it does nothing.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

FOLDER = os.environ.get("CORRAL_HOP_TRACE")
RECORDS: list[tuple[int, int, str, str]] = []  # (wall ns, thread CPU ns, event, subject)


def mark(event: str, subject: Any) -> None:
    if isinstance(subject, bytes):
        subject = subject.decode(errors="replace")
    RECORDS.append((time.perf_counter_ns(), time.thread_time_ns(), event, str(subject)[:60]))


def _patch_connection(module: Any) -> None:
    connection = module.Connection
    process_msg, publish = connection._process_msg, connection.publish

    async def traced_process_msg(
        self: Any, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        mark("read", subject)
        await process_msg(self, sid, subject, reply, data, headers)

    async def traced_publish(
        self: Any, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None
    ) -> None:
        mark("publish", subject)
        await publish(self, subject, payload, reply, headers)
        mark("written", subject)

    connection._process_msg, connection.publish = traced_process_msg, traced_publish


def _patch_service(module: Any) -> None:
    service = module.Service
    dispatch = service._dispatch

    async def traced_dispatch(
        self: Any, op: Any, envelope_type: Any, handler: Any, stats: Any, msg: Any, reply: str
    ) -> None:
        mark("handle", msg.subject)
        await dispatch(self, op, envelope_type, handler, stats, msg, reply)

    service._dispatch = traced_dispatch


PATCHES = {"services.runtime.connection": _patch_connection, "services.runtime.service": _patch_service}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches a module of :data:`PATCHES` right after it is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            PATCHES[name](module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _dump() -> None:
    if FOLDER and RECORDS:
        with open(os.path.join(FOLDER, f"{os.getpid()}.trace"), "w") as out:
            out.writelines(f"{wall} {cpu} {event} {subject}\n" for wall, cpu, event, subject in RECORDS)


if FOLDER:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_dump)
