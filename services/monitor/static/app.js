// Corral's monitor page: polls the monitor's JSON API every second and draws the per-tenant table
// and, for the tenant in the URL (#tenant=acme), its live charts and subject families.
// Plain browser JavaScript, no build step and no external assets; charts are inline SVG.
// What the tests read carries stable ids and data attributes (data-tenant, data-field, data-last,
// body's data-polls).
"use strict";

(() => {
  const REFRESH_MS = 1000;
  const TIMEOUT_MS = 5000;
  const TOKEN_KEY = "corral.monitor.token";
  const SVG = "http://www.w3.org/2000/svg";
  const CHART = { width: 320, height: 110, left: 34, right: 6, top: 8, bottom: 14 };
  const TENANT_FIELDS = [
    ["rate", 1], ["messages", 0], ["errors", 0, true], ["refusals", 0, true], ["denials", 0, true],
    ["p50_ms", 1], ["p99_ms", 1], ["in_flight", 0], ["connections", 0],
  ];
  const SUBJECT_FIELDS = [
    ["rate", 1], ["messages", 0], ["errors", 0, true], ["p50_ms", 1], ["p99_ms", 1],
  ];
  // The agent patterns' figures of a tenant's detail (its "patterns"): [group, path, label, alert].
  // "now" ones are gauges at the monitor's last poll, the others counts over the window.
  const PATTERNS = [
    ["workflow", "workflow_runs_open.running", "running now"],
    ["workflow", "workflow_runs_open.waiting", "waiting now"],
    ["workflow", "workflow_runs_open.sleeping", "sleeping now"],
    ["workflow", "workflow_runs.started", "started"],
    ["workflow", "workflow_runs.completed", "completed"],
    ["workflow", "workflow_runs.failed", "failed", true],
    ["workflow", "workflow_runs.cancelled", "cancelled"],
    ["swarm", "swarm_sessions_active", "sessions active now"],
    ["swarm", "swarm_sessions_started", "sessions started"],
    ["swarm", "swarm_turns", "turns"],
    ["graph", "graph_runs_active", "runs active now"],
    ["model", "model_tokens", "all models"],
  ];

  const byId = (id) => document.getElementById(id);
  let token = takeToken();
  let timer = null;
  let generation = 0; // a poll started by a click supersedes the one in flight

  // The token: from ?token= (then dropped from the address bar and history), else this tab's
  // sessionStorage, else the input field.
  function takeToken() {
    const params = new URLSearchParams(location.search);
    const given = params.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      params.delete("token");
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
    }
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function selectedTenant() {
    const match = /(?:^#|&)tenant=([^&]*)/.exec(location.hash);
    return match && match[1] ? decodeURIComponent(match[1]) : null;
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path) {
    const controller = new AbortController();
    const deadline = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      let response;
      try {
        response = await fetch(path, {
          headers: token ? { Authorization: "Bearer " + token } : {},
          signal: controller.signal,
          cache: "no-store",
        });
      } catch (_) {
        const why = controller.signal.aborted ? "no answer within " + TIMEOUT_MS / 1000 + " s" : "no connection";
        throw new ApiError(0, "unavailable", "cannot reach the monitor (" + why + ")");
      }
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      if (!response.ok) {
        const error = (body && body.error) || {};
        throw new ApiError(response.status, error.code || "http_" + response.status,
          error.message || response.statusText || "the monitor answered " + response.status);
      }
      return body;
    } finally {
      clearTimeout(deadline);
    }
  }

  // ---- formatting ----------------------------------------------------------------------------

  function figure(value, digits) {
    if (value === null || value === undefined) return "\u2013";
    return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function cell(text, field) {
    const td = document.createElement("td");
    td.textContent = text;
    if (field) td.dataset.field = field;
    return td;
  }

  function figuresRow(row, fields) {
    return fields.map(([field, digits, counts]) => {
      const td = cell(figure(row[field], digits), field);
      td.className = "num" + (counts && row[field] > 0 ? " alert" : "");
      td.dataset.value = row[field] === null || row[field] === undefined ? "" : String(row[field]);
      return td;
    });
  }

  const byRate = (a, b) => (b.rate || 0) - (a.rate || 0) || String(a.tenant || a.family).localeCompare(b.tenant || b.family);

  // ---- the tenants' table --------------------------------------------------------------------

  function renderTenants(answer) {
    const chosen = selectedTenant();
    const rows = (answer.tenants || []).slice().sort(byRate).map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.tenant = row.tenant;
      if (row.tenant === chosen) tr.className = "selected";
      const name = cell("", "tenant");
      const link = document.createElement("a");
      link.href = "#tenant=" + encodeURIComponent(row.tenant);
      link.textContent = row.tenant;
      name.appendChild(link);
      tr.append(name, ...figuresRow(row, TENANT_FIELDS));
      tr.addEventListener("click", () => { location.hash = "tenant=" + encodeURIComponent(row.tenant); });
      return tr;
    });
    byId("tenants").tBodies[0].replaceChildren(...rows);
    byId("no-tenants").hidden = rows.length > 0;
    byId("window").textContent = "(last " + (answer.window_s || 60) + " s)";
    const updated = byId("updated");
    updated.dataset.updatedAt = String(answer.updated_at || "");
    updated.textContent = answer.updated_at
      ? "updated " + new Date(answer.updated_at * 1000).toLocaleTimeString("en-GB") : "";
  }

  // ---- one tenant ----------------------------------------------------------------------------

  function niceMax(values) {
    const top = Math.max(0, ...values.filter((v) => typeof v === "number"));
    if (top <= 0) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(top)));
    return [1, 2, 5, 10].map((m) => m * step).find((candidate) => candidate >= top);
  }

  function svgElement(name, attributes, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
    if (text !== undefined) element.textContent = text;
    return element;
  }

  // A small line chart of one or more series (oldest first); a null is a gap in its line.
  function drawChart(id, lines, digits) {
    const container = byId(id);
    const { width, height, left, right, top, bottom } = CHART;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = niceMax(lines.flatMap((line) => line.values));
    const count = Math.max(2, ...lines.map((line) => line.values.length));
    const x = (i) => left + (plotW * i) / (count - 1);
    const y = (v) => top + plotH - (plotH * v) / max;
    const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    svg.append(
      svgElement("line", { class: "axis", x1: left, y1: top + plotH, x2: width - right, y2: top + plotH }),
      svgElement("line", { class: "grid", x1: left, y1: top, x2: width - right, y2: top }),
      svgElement("text", { class: "tick", x: left - 4, y: top + 4, "text-anchor": "end" }, figure(max, digits && max < 10 ? 1 : 0)),
      svgElement("text", { class: "tick", x: left - 4, y: top + plotH + 3, "text-anchor": "end" }, "0"),
      svgElement("text", { class: "tick", x: left, y: height - 2 }, "-" + (count - 1) + " s"),
      svgElement("text", { class: "tick", x: width - right, y: height - 2, "text-anchor": "end" }, "now"),
    );
    for (const line of lines) {
      let run = [];
      const runs = [];
      line.values.forEach((value, i) => {
        if (typeof value === "number") run.push(`${x(i).toFixed(1)},${y(value).toFixed(1)}`);
        else if (run.length) { runs.push(run); run = []; }
      });
      if (run.length) runs.push(run);
      const last = line.values.length ? line.values[line.values.length - 1] : null;
      const group = svgElement("g", { class: "series " + line.name, "data-series": line.name,
        "data-last": last === null || last === undefined ? "" : String(last), "data-points": line.values.length });
      for (const points of runs) {
        group.append(points.length > 1 ? svgElement("polyline", { points: points.join(" ") })
          : svgElement("circle", { cx: points[0].split(",")[0], cy: points[0].split(",")[1], r: 1.5 }));
      }
      svg.append(group);
    }
    const first = lines[0].values;
    const latest = first.length ? first[first.length - 1] : null;
    container.dataset.last = latest === null || latest === undefined ? "" : String(latest);
    container.classList.toggle("hot", lines.some((line) => line.values.some((v) => v > 0)));
    const label = lines.map((line) => {
      const values = line.values;
      return (lines.length > 1 ? line.name + " " : "") + figure(values.length ? values[values.length - 1] : null, digits);
    }).join("  ");
    svg.append(svgElement("text", { class: "latest", x: width - right, y: top + 10, "text-anchor": "end" }, label));
    container.querySelector("svg").replaceWith(svg);
  }

  function renderBreakdown(id, counts) {
    const list = byId(id);
    const entries = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
    const items = entries.length ? entries.map(([key, count]) => {
      const dd = document.createElement("dd");
      dd.dataset.key = key;
      dd.className = count > 0 ? "alert" : "";
      dd.textContent = key + ": " + figure(count, 0);
      return dd;
    }) : [Object.assign(document.createElement("dd"), { className: "quiet", textContent: "none" })];
    list.replaceChildren(list.querySelector("dt"), ...items);
  }

  function pattern(dd, path, label, value, alert) {
    dd.dataset.pattern = path;
    dd.dataset.value = value === null || value === undefined ? "" : String(value);
    dd.className = alert && value > 0 ? "alert" : "";
    dd.textContent = label + ": " + figure(value, 0);
    return dd;
  }

  function renderPatterns(patterns) {
    const found = patterns || {};
    const at = (path) => path.split(".").reduce((value, key) => (value == null ? undefined : value[key]), found);
    const groups = {};
    for (const [group, path, label, alert] of PATTERNS) {
      (groups[group] = groups[group] || []).push(pattern(document.createElement("dd"), path, label, at(path), alert));
    }
    const byModel = Object.entries(found.model_tokens_by_model || {}).sort((a, b) => b[1] - a[1]);
    for (const [model, tokens] of byModel) {
      groups.model.push(pattern(document.createElement("dd"), "model_tokens_by_model." + model, model, tokens));
    }
    for (const list of byId("patterns").querySelectorAll("dl[data-group]")) {
      list.replaceChildren(list.querySelector("dt"), ...(groups[list.dataset.group] || []));
    }
  }

  function renderTenant(detail, families) {
    const series = detail.series || {};
    const totals = detail.totals || {};
    byId("tenant-name").textContent = detail.tenant;
    byId("tenant-view").dataset.tenant = detail.tenant;
    byId("tenant-totals").textContent =
      figure(totals.rate, 1) + " msg/s \u00b7 " + figure(totals.messages, 0) + " msgs \u00b7 " +
      figure(totals.errors, 0) + " errors \u00b7 " + figure(totals.refusals, 0) + " refusals \u00b7 " +
      figure(totals.denials, 0) + " denials \u00b7 p50 " + figure(totals.p50_ms, 1) + " ms \u00b7 p99 " +
      figure(totals.p99_ms, 1) + " ms";
    drawChart("chart-rate", [{ name: "rate", values: series.rate || [] }], 1);
    drawChart("chart-latency", [
      { name: "p50", values: series.p50_ms || [] },
      { name: "p99", values: series.p99_ms || [] },
    ], 1);
    drawChart("chart-errors", [{ name: "errors", values: series.errors || [] }], 0);
    drawChart("chart-denials", [{ name: "denials", values: series.denials || [] }], 0);
    renderBreakdown("errors-by-code", detail.errors_by_code);
    renderBreakdown("refusals-by-kind", detail.refusals_by_kind);
    renderBreakdown("denials-by-reason", detail.denials_by_reason);
    renderPatterns(detail.patterns);
    const rows = (families.subjects || []).slice().sort(byRate).map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.family = row.family;
      tr.append(cell(row.family, "family"), cell(row.service || "\u2013", "service"),
        cell(row.operation || "\u2013", "operation"), ...figuresRow(row, SUBJECT_FIELDS));
      return tr;
    });
    byId("subjects").tBodies[0].replaceChildren(...rows);
    byId("tenant-view").hidden = false;
  }

  // ---- the loop ------------------------------------------------------------------------------

  function showError(error) {
    const banner = byId("error");
    if (!error) {
      banner.hidden = true;
      banner.textContent = "";
      delete banner.dataset.code;
      document.body.classList.remove("stale");
      return;
    }
    banner.hidden = false;
    banner.dataset.code = error.code || "error";
    banner.textContent = (error.code || "error") + ": " + error.message;
    document.body.classList.add("stale");
    if (error.status === 401 || error.status === 403) byId("token").focus({ preventScroll: true });
  }

  async function poll() {
    clearTimeout(timer);
    const mine = ++generation;
    const tenant = selectedTenant();
    const jobs = [api("/api/tenants").then(renderTenants)];
    if (tenant) {
      const path = encodeURIComponent(tenant);
      jobs.push(Promise.all([api("/api/tenants/" + path), api("/api/subjects?tenant=" + path)])
        .then(([detail, families]) => { if (selectedTenant() === tenant) renderTenant(detail, families); }));
    } else {
      byId("tenant-view").hidden = true;
    }
    const failed = (await Promise.allSettled(jobs)).find((outcome) => outcome.status === "rejected");
    if (mine !== generation) return;
    if (failed && tenant && failed.reason instanceof ApiError && failed.reason.status === 404) {
      byId("tenant-view").hidden = true;
    }
    showError(failed ? failed.reason : null);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    timer = setTimeout(poll, REFRESH_MS);
  }

  byId("token").value = token;
  byId("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = byId("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    poll();
  });
  byId("back").addEventListener("click", (event) => {
    event.preventDefault();
    history.pushState(null, "", location.pathname + location.search);
    poll();
  });
  window.addEventListener("hashchange", poll);
  poll();
})();
