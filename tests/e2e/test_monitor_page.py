"""The monitor's web page in a real headless Chromium: the per-tenant table (busiest first, trouble
highlighted, refreshing every second), one tenant's four live charts, subject families and agent
patterns' figures (workflow runs by state and outcome, swarm sessions, graph runs, model tokens),
the API's error message. The page is served, with the monitor's JSON contract, by a stub whose figures
move on every call; Chromium's virtual time runs the page's one-second refresh without waiting.
The last test runs the real thing: ``corral up``, requests, ``corral top`` and the real page."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from services.runtime.credentials import load_secrets
from tests.e2e.test_corral_up import CORRAL, start_corral_up, stop_corral_up, wait_for_file
from tests.support.http import http_server
from tests.support.monitor_api import OPERATOR_TOKEN, TENANTS, FakeMonitor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium; .ci/run installs it)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "monitor-page.png"


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def all(self) -> list[Element]:
        return [self, *(found for child in self.children for found in child.all())]

    def find(self, **attrs: str) -> list[Element]:
        wanted = {key.replace("_", "-"): value for key, value in attrs.items()}
        return [
            e for e in self.all() if all(e.attrs.get(k) == v or (v is True and k in e.attrs) for k, v in wanted.items())
        ]

    def by_id(self, id: str) -> Element:
        (found,) = self.find(id=id)
        return found

    def content(self) -> str:
        return self.text + "".join(child.content() for child in self.children)


class DomParser(HTMLParser):
    VOID = {"meta", "link", "input", "br", "img", "line", "circle", "polyline"}

    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {key: value or "" for key, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, {key: value or "" for key, value in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                break

    def handle_data(self, data):
        self.stack[-1].children.append(Element("#text", {}))
        self.stack[-1].children[-1].text = data


def chromium(tmp_path: Path, url: str, *flags: str, budget_ms: int = 4000) -> str:
    """Run headless Chromium on ``url`` (its own profile, its own process group) and return stdout."""
    profile = Path(tmp_path) / f"profile-{len(list(Path(tmp_path).glob('profile-*')))}"
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *flags, url]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its renderers and helpers, if any are left
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-2000:]
    return out


def load(tmp_path: Path, url: str, budget_ms: int = 4000) -> Element:
    parser = DomParser()
    parser.feed(chromium(tmp_path, url, "--dump-dom", budget_ms=budget_ms))
    return parser.root


def rows(dom: Element) -> list[dict[str, str]]:
    table = dom.by_id("tenants")
    return [
        {
            **{cell.attrs["data-field"]: cell.attrs.get("data-value", "") for cell in row.find(data_field=True)},
            "tenant": row.attrs["data-tenant"],
            "alerts": " ".join(
                c.attrs["data-field"] for c in row.find(data_field=True) if "alert" in c.attrs.get("class", "")
            ),
        }
        for row in table.find(data_tenant=True)
    ]


@pytest.fixture
def monitor():
    fake = FakeMonitor()
    with http_server(fake) as server:
        yield fake, server.url


def test_the_table_lists_every_tenant_busiest_first(monitor, tmp_path):
    _, url = monitor
    shown = rows(load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}"))
    assert sorted(row["tenant"] for row in shown) == sorted(TENANTS)
    rates = [float(row["rate"]) for row in shown]
    assert rates == sorted(rates, reverse=True)


def test_errors_and_denials_are_highlighted_where_not_zero(monitor, tmp_path):
    _, url = monitor
    shown = {row["tenant"]: row for row in rows(load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}"))}
    assert shown["globex"]["alerts"] == "errors" and int(shown["globex"]["errors"]) > 0
    assert shown["initech"]["alerts"] == "denials"
    assert shown["acme"]["alerts"] == ""


def test_the_figures_refresh_every_second_and_move(monitor, tmp_path):
    fake, url = monitor
    dom = load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}", budget_ms=4500)
    body = next(e for e in dom.all() if e.tag == "body")
    polls = int(body.attrs["data-polls"])
    assert polls >= 4, polls  # about one a second of the 4.5 s of virtual time
    assert fake.calls.count("/api/tenants") == polls
    shown = {row["tenant"]: float(row["rate"]) for row in rows(dom)}
    first = {row["tenant"]: row["rate"] for row in fake.tenants(1)["tenants"]}
    assert shown != first  # what is shown is a later answer than the first
    again = {row["tenant"]: float(row["rate"]) for row in rows(load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}"))}
    assert again != shown  # and a second load shows other figures again


def test_a_tenants_detail_has_four_live_charts_and_its_subject_families(monitor, tmp_path):
    fake, url = monitor
    dom = load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}#tenant=globex")
    view = dom.by_id("tenant-view")
    assert "hidden" not in view.attrs and dom.by_id("tenant-name").content() == "globex"
    (selected,) = dom.by_id("tenants").find(data_tenant="globex")
    assert selected.attrs.get("class") == "selected"
    for chart, series in [("chart-rate", ["rate"]), ("chart-latency", ["p50", "p99"]),
                          ("chart-errors", ["errors"]), ("chart-denials", ["denials"])]:  # fmt: skip
        figure = dom.by_id(chart)
        drawn = figure.find(data_series=True)
        assert [group.attrs["data-series"] for group in drawn] == series, chart
        assert all(group.attrs["data-points"] == "60" for group in drawn), chart
        assert [e for group in drawn for e in group.all() if e.tag == "polyline"], chart
    rate_now = float(dom.by_id("chart-rate").attrs["data-last"])
    assert rate_now > 0 and rate_now != fake.detail("globex", 1)["series"]["rate"][-1]
    assert "hot" in dom.by_id("chart-errors").attrs["class"]  # globex has errors in the window
    assert "hot" not in dom.by_id("chart-denials").attrs["class"]
    families = [row.attrs["data-family"] for row in dom.by_id("subjects").find(data_family=True)]
    assert families == [f"t.globex.{s}" for s in ("router.request", "graph.run", "tools.call", "auth.callout")]
    assert "tool_failed" in dom.by_id("errors-by-code").content()


def shown_patterns(dom: Element) -> dict[str, str]:
    """The detail's agent patterns' figures: data-pattern path -> data-value."""
    return {dd.attrs["data-pattern"]: dd.attrs["data-value"] for dd in dom.by_id("patterns").find(data_pattern=True)}


def flattened(patterns: dict) -> dict[str, str]:
    """The API's patterns as the page's data-pattern paths (``workflow_runs_open.waiting``)."""
    out = {}
    for name, value in patterns.items():
        if isinstance(value, dict):
            out.update({f"{name}.{key}": str(n) for key, n in value.items()})
        elif name != "workflow_runs_driven":  # not shown (the census's states are)
            out[name] = str(value)
    return out


def test_a_tenants_detail_shows_its_agent_patterns_figures_and_they_move(monitor, tmp_path):
    fake, url = monitor
    dom = load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}#tenant=globex")
    shown = shown_patterns(dom)
    assert set(shown) == set(flattened(fake.patterns("globex", 1)))
    # What is shown is one of the monitor's answers, and a later one than the first: it refreshes.
    ticks = [tick for tick in range(1, fake.ticks + 1) if flattened(fake.patterns("globex", tick)) == shown]
    assert ticks and ticks[0] > 1, shown
    failed = dom.by_id("patterns").find(data_pattern="workflow_runs.failed")[0]
    assert failed.attrs["data-value"] == "1" and failed.attrs.get("class") == "alert"  # a failed run stands out
    assert "waiting now: 6" in dom.by_id("patterns").content()
    again = shown_patterns(load(tmp_path, f"{url}/?token={OPERATOR_TOKEN}#tenant=globex"))
    assert again["model_tokens"] != shown["model_tokens"]


def test_a_refused_token_shows_the_monitors_message(monitor, tmp_path):
    _, url = monitor
    dom = load(tmp_path, f"{url}/?token=stale", budget_ms=1500)
    error = dom.by_id("error")
    assert "hidden" not in error.attrs and error.attrs["data-code"] == "unauthorized"
    assert error.content() == "unauthorized: the token is not valid here (expired, or signed by another key)"
    assert rows(dom) == []


def test_a_screenshot_of_the_page_while_figures_move(monitor, tmp_path):
    """The README's picture; CORRAL_UPDATE_SCREENSHOT=1 writes it to docs/monitor-page.png."""
    _, url = monitor
    target = tmp_path / "monitor-page.png"
    chromium(
        tmp_path, f"{url}/?token={OPERATOR_TOKEN}#tenant=globex", f"--screenshot={target}", "--window-size=1200,800"
    )
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 20_000
    if os.environ.get("CORRAL_UPDATE_SCREENSHOT"):
        shutil.copyfile(target, SCREENSHOT)


def test_the_real_monitor_of_corral_up_shows_both_tenants_in_top_and_on_the_page(tmp_path):
    state_dir = tmp_path / "state"
    env, process = start_corral_up(state_dir)  # a free loopback port; the monitor's own is free too
    try:
        wait_for_file(state_dir / "corral.json", process)
        for tenant in ("acme", "globex", "acme"):
            sent = subprocess.run(
                [*CORRAL, "request", "--tenant", tenant, "where is my order?"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stderr
        url = json.loads((state_dir / "corral.json").read_text())["monitor_url"]
        token = load_secrets(state_dir).monitor_operator_token
        assert url.startswith("http://127.0.0.1:") and token
        deadline = time.monotonic() + 30
        while True:
            top = subprocess.run(
                [*CORRAL, "top", "--once", "--json"], env=env, capture_output=True, text=True, timeout=30
            )
            assert top.returncode == 0, top.stderr
            messages = {row["tenant"]: row["messages"] for row in json.loads(top.stdout)["tenants"]}
            if messages.get("acme", 0) > 0 and messages.get("globex", 0) > 0:
                break
            assert time.monotonic() < deadline, f"corral top never showed both tenants: {messages}"
            time.sleep(0.25)  # polling the monitor with a deadline
        # The page takes the token from ?token= and sends it as Authorization: Bearer (the only
        # place the API reads it), so acme's row is there only if the header went out.
        shown = {row["tenant"]: row for row in rows(load(tmp_path, f"{url}/?token={token}"))}
        assert {"acme", "globex"} <= set(shown)
        assert float(shown["acme"]["messages"]) > 0
        refused = load(tmp_path, f"{url}/", budget_ms=1500)  # no token: the API's 401, no figures
        assert refused.by_id("error").attrs["data-code"] == "unauthorized" and rows(refused) == []
        # A swarm turn of acme's (a session, its turn and the scripted models' tokens) shows in
        # acme's agent patterns, as the monitor sees them after a poll or two.
        sent = subprocess.run(
            [*CORRAL, "request", "--tenant", "acme", "--target", "support", "where is my order?"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 30
        while True:
            patterns = shown_patterns(load(tmp_path, f"{url}/?token={token}#tenant=acme"))
            if patterns.get("swarm_sessions_active") == "1" and patterns.get("swarm_turns") == "1":
                break
            assert time.monotonic() < deadline, f"the page never showed acme's swarm session: {patterns}"
        assert int(patterns["swarm_sessions_started"]) == 1 and int(patterns["model_tokens"]) > 0
        assert patterns["workflow_runs_open.waiting"] == "0" and patterns["graph_runs_active"] == "0"
    finally:
        stop_corral_up(process)
