"""Refusals, counted per tenant and kind over one-second windows: cheap however many arrive.

A flood of refusals (a tenant forging envelopes, or going past its rate limit by far) used to cost
a log line and, for attempts on the isolation layers, an audit record each: the log and the audit
stream then slowed every other tenant down and grew without bound. Here a refusal is a dict
update. The first refusal of a kind in a window is logged at once, with its detail; when the
window closes, one line per kind says how many more there were and for how many tenants, and the
attempts on the isolation layers become one audit record per tenant and kind ("412 refusals of
kind tenant_mismatch in this second"), carrying the first one's detail as a sample.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from contracts.errors import ErrorCode

# Refusals that are attempts on the isolation layers, not just malformed input: audited.
AUDITED = frozenset({ErrorCode.TENANT_MISMATCH.value, ErrorCode.FORBIDDEN.value, ErrorCode.UNAUTHORIZED.value})
WINDOW_S = 1.0


@dataclass
class _Count:
    count: int = 0
    sample: dict[str, Any] = field(default_factory=dict)


class Refusals:
    """One service replica's refusals of the current window; ``audit`` may be None (not audited)."""

    def __init__(self, log: Any, audit: Any | None, *, window_s: float = WINDOW_S) -> None:
        self.log = log
        self.audit = audit
        self.window_s = window_s
        # (tenant, kind, whether it goes to the audit trail) -> how many in this window
        self._counts: dict[tuple[str | None, str, bool], _Count] = {}
        self._codes: set[str] = set()  # kinds seen in this window
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self,
        tenant: str | None,
        code: str,
        reason: str,
        subject: str,
        *,
        principal: str | None = None,
        run_id: str | None = None,
        audit: bool = True,
    ) -> None:
        """Count one refusal; ``audit=False`` when it was already recorded (by a handler, or by
        the service that raised it)."""
        key = (tenant, code, audit and code in AUDITED)
        counted = self._counts.get(key)
        if counted is None:
            counted = self._counts[key] = _Count()
            if code not in self._codes:  # the first of its kind in this window: logged in full
                self._codes.add(code)
                self.log.warning("refused", code=code, tenant_id=tenant, reason=reason, subject=subject[:200])
            counted.sample = {"reason": reason, "subject": subject[:200], "principal": principal, "run_id": run_id}
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.window_s, self.close_window)
        counted.count += 1

    def close_window(self) -> None:
        """Write what the window counted: a log line per kind with more than its first, and an
        audit record per tenant and audited kind."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        self._codes.clear()
        by_code: dict[str, list[int]] = {}
        for (tenant, code, audited), counted in counts.items():
            totals = by_code.setdefault(code, [0, 0])
            totals[0] += counted.count
            totals[1] += 1
            if audited and tenant is not None and self.audit is not None:
                sample = counted.sample
                self.audit.record(
                    tenant,
                    "guard_refused",
                    "refused",
                    principal=sample["principal"],
                    run_id=sample["run_id"],
                    code=code,
                    count=counted.count,
                    window_s=self.window_s,
                    reason=sample["reason"],
                    subject=sample["subject"],
                )
        for code, (count, tenants) in by_code.items():
            if count > 1:
                self.log.warning("refusals", code=code, count=count, tenants=tenants, window_s=self.window_s)
