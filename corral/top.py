"""``corral top``: the monitor's figures as a live terminal table.

The monitor (``services/monitor``) serves them as JSON over HTTP; this module reads that API
(:func:`fetch`), turns an answer into a ``rich`` table (:func:`tenants_table`,
:func:`tenant_view`), and redraws it every second (:func:`watch`). The render functions take the
API's answers as plain dicts, so they are tested without a monitor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from contracts.errors import Forbidden, Internal, NotFound, Unauthorized, Unavailable
from corral.state import RUNTIME_FILE, existing_state_dir, read_runtime_info
from services.runtime.credentials import SECRETS_FILE, load_secrets

OPERATOR_TOKEN_FIELD = "monitor_operator_token"  # in secrets.json, written by `corral up`
ALERT = "bold red"  # errors, refusals and denials once they are not zero
DASH = "-"  # a figure the monitor does not have (no latency yet, no connection count)
STATUS_ERRORS = {401: Unauthorized, 403: Forbidden, 404: NotFound}


# ---- where the monitor is, and the credential -------------------------------------------------


def monitor_url(flag: str | None, state_dir: str | None) -> tuple[str, str]:
    """The monitor's base URL and where it came from: ``--monitor-url``, else
    ``$CORRAL_MONITOR_URL``, else ``monitor_url`` in the ``corral.json`` of a running ``corral up``."""
    if flag:
        return flag.rstrip("/"), "--monitor-url"
    if os.environ.get("CORRAL_MONITOR_URL"):
        return os.environ["CORRAL_MONITOR_URL"].rstrip("/"), "$CORRAL_MONITOR_URL"
    found = existing_state_dir(state_dir)
    try:
        info = read_runtime_info(found) or {}
    except (OSError, ValueError) as error:
        raise NotFound(f"cannot read {found / RUNTIME_FILE}: {error}") from None
    if not info.get("monitor_url"):
        raise NotFound(
            f"no running monitor found in {found} (no monitor_url in {RUNTIME_FILE}: corral up writes it while"
            " it runs); start one with `corral up`, or pass --monitor-url"
        )
    return str(info["monitor_url"]).rstrip("/"), str(found / RUNTIME_FILE)


def operator_token(state_dir: str | None) -> str:
    """The monitor's operator token from the state directory's secrets."""
    found = existing_state_dir(state_dir)
    try:
        secrets = load_secrets(found)
    except PermissionError:
        raise Forbidden(f"cannot read {found / SECRETS_FILE}: permission denied") from None
    except (OSError, ValueError, KeyError) as error:
        raise NotFound(f"cannot read the secrets in {found}: {error}") from None
    token = secrets.monitor_operator_token
    if not token:
        raise NotFound(
            f"no {OPERATOR_TOKEN_FIELD} in {found / SECRETS_FILE} (a state directory from before the monitor?"
            " `corral up` adds it); or pass --token"
        )
    return str(token)


# ---- the API ----------------------------------------------------------------------------------


def fetch(client: httpx.Client, base_url: str, path: str, token: str) -> dict[str, Any]:
    """GET ``path`` from the monitor; its error answers and a failed connection become typed errors
    with one clear line (the API's own message when it gave one)."""
    url = f"{base_url}{path}"
    try:
        response = client.get(url, headers={"authorization": f"Bearer {token}"})
    except httpx.TimeoutException:
        raise Unavailable(f"the monitor at {base_url} did not answer in time") from None
    except httpx.HTTPError as error:
        raise Unavailable(f"cannot reach the monitor at {base_url}: {error or type(error).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        detail = body.get("error") if isinstance(body, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else None
        kind = STATUS_ERRORS.get(response.status_code, Unavailable)
        raise kind(f"the monitor answered {response.status_code} for {path}: {message or response.reason_phrase}")
    if not isinstance(body, dict):
        raise Internal(f"the monitor's answer for {path} is not a JSON object")
    return body


def tenants_path(limit: int | None = None) -> str:
    return "/api/tenants" + (f"?limit={limit}" if limit else "")


def tenant_answer(client: httpx.Client, base_url: str, token: str, tenant: str) -> dict[str, Any]:
    """What the tenant view shows: the tenant's detail (its totals) with its subject families."""
    detail = fetch(client, base_url, f"/api/tenants/{tenant}", token)
    families = fetch(client, base_url, f"/api/subjects?tenant={tenant}", token)
    return {**detail, "subjects": families.get("subjects", [])}


# ---- rendering --------------------------------------------------------------------------------


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}" if isinstance(value, float) or digits else f"{value:,}"


def _count(value: Any) -> Text:
    """A count that is red once it is not zero: an error, a refusal, a denial."""
    return Text(_number(value), style=ALERT if value else "")


def _rate(row: dict[str, Any]) -> float:
    return float(row.get("rate") or 0.0)


def _updated(answer: dict[str, Any]) -> str:
    at = answer.get("updated_at")
    return time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) else DASH


def tenants_table(answer: dict[str, Any]) -> Table:
    """``GET /api/tenants`` as a table: busiest tenant first, counts of trouble in red."""
    window = answer.get("window_s", 60)
    table = Table(title=f"Corral tenants (last {window} s, updated {_updated(answer)})", title_justify="left")
    table.add_column("tenant", style="bold")
    for name in ("msg/s", f"msgs {window}s", "errors", "refusals", "denials", "p50 ms", "p99 ms", "in flight", "conns"):
        table.add_column(name, justify="right")
    rows = sorted(answer.get("tenants", []), key=lambda row: (-_rate(row), str(row.get("tenant"))))
    for row in rows:
        table.add_row(
            str(row.get("tenant")),
            _number(row.get("rate"), 1),
            _number(row.get("messages")),
            _count(row.get("errors")),
            _count(row.get("refusals")),
            _count(row.get("denials")),
            _number(row.get("p50_ms"), 1),
            _number(row.get("p99_ms"), 1),
            _number(row.get("in_flight")),
            _number(row.get("connections")),
        )
    if not rows:
        table.caption = "no traffic in the window"
    return table


def subjects_table(subjects: list[dict[str, Any]], window: int = 60) -> Table:
    """A tenant's subject families, busiest first."""
    table = Table(title_justify="left")
    table.add_column("subject family", style="bold")
    table.add_column("service")
    table.add_column("operation")
    for name in ("msg/s", f"msgs {window}s", "errors", "p50 ms", "p99 ms"):
        table.add_column(name, justify="right")
    for row in sorted(subjects, key=lambda row: (-_rate(row), str(row.get("family")))):
        table.add_row(
            str(row.get("family")),
            str(row.get("service") or DASH),
            str(row.get("operation") or DASH),
            _number(row.get("rate"), 1),
            _number(row.get("messages")),
            _count(row.get("errors")),
            _number(row.get("p50_ms"), 1),
            _number(row.get("p99_ms"), 1),
        )
    if not subjects:
        table.caption = "no traffic in the window"
    return table


def tenant_view(answer: dict[str, Any]) -> Group:
    """One tenant: a line of its totals, then its subject families (:func:`tenant_answer`)."""
    totals = answer.get("totals") or {}
    window = answer.get("window_s", 60)
    line = Text.assemble(
        (f"tenant {answer.get('tenant')}", "bold"),
        f"  (last {window} s, updated {_updated(answer)})  ",
        f"{_number(totals.get('rate'), 1)} msg/s  {_number(totals.get('messages'))} msgs  ",
        ("errors ", ""),
        _count(totals.get("errors")),
        "  refusals ",
        _count(totals.get("refusals")),
        "  denials ",
        _count(totals.get("denials")),
        f"  p50 {_number(totals.get('p50_ms'), 1)} ms  p99 {_number(totals.get('p99_ms'), 1)} ms",
    )
    return Group(line, subjects_table(answer.get("subjects", []), window))


# ---- the live loop ----------------------------------------------------------------------------


def watch(
    load: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], RenderableType],
    *,
    interval: float = 1.0,
    console: Console | None = None,
) -> int:
    """Redraw ``render(load())`` every ``interval`` seconds until Ctrl-C. The first load's error
    ends the command; later, a monitor that went away is shown in place and tried again, while a
    refused credential (401, 403) ends it."""
    shown = render(load())
    with Live(shown, console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)  # the refresh period, not a synchronisation
                try:
                    shown = render(load())
                    live.update(shown, refresh=True)
                except Unavailable as error:
                    live.update(Group(shown, Text(f"{error.message}; trying again", style=ALERT)), refresh=True)
        except KeyboardInterrupt:
            return 0


def run_top(
    *,
    base_url: str,
    token: str,
    tenant: str | None,
    limit: int | None = None,
    once: bool,
    as_json: bool,
    timeout: float,
    console: Console | None = None,
) -> int:
    """The command: one table (``once``), the API's answer as JSON (``as_json``; with a tenant,
    its detail with a ``subjects`` list added), or the live table."""
    with httpx.Client(timeout=timeout) as client:

        def load() -> dict[str, Any]:
            if tenant:
                return tenant_answer(client, base_url, token, tenant)
            return fetch(client, base_url, tenants_path(limit), token)

        render: Callable[[dict[str, Any]], RenderableType] = tenant_view if tenant else tenants_table
        if as_json:
            print(json.dumps(load()))
            return 0
        if once:
            (console or Console()).print(render(load()))
            return 0
        return watch(load, render, console=console)
