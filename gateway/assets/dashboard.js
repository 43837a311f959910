// shoal's dashboard: polls the gateway's /dashboard/api with the API key and draws what it gets.
// Plain JS, no libraries: everything the page loads comes from the gateway itself.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORE = "shoal.dashboard.key";
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(200, Number(params.get("refresh_ms")) || 1000);
const QUEUE_WINDOW_MS = 5 * 60 * 1000;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  endpoint: params.get("endpoint") || "",
  timer: null,
  tick: 0,
  queue: [], // {t, queued, running, ready}
};

const $ = (id) => document.getElementById(id);

// ---- the API -------------------------------------------------------------------------------

class AuthError extends Error {}

async function call(method, path) {
  const resp = await fetch(path, { method, headers: { Authorization: `Bearer ${state.key}` } });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  const message = (body && body.error) || `${resp.status} ${resp.statusText}`;
  if (resp.status === 401) throw new AuthError(message);
  if (!resp.ok) throw new Error(message);
  return body;
}

const api = (path) => call("GET", `/dashboard/api${path}`);

// ---- formatting ----------------------------------------------------------------------------

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  return h < 48 ? `${h}h ${String(m % 60).padStart(2, "0")}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
}

const clock = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "–");
const shortId = (id) => (id && id.length > 14 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id || "–");

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function badge(row, status) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = `badge ${status}`;
  span.textContent = status;
  td.appendChild(span);
  row.appendChild(td);
}

function fill(tableId, rows, emptyId, countId, total) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
  $(emptyId).hidden = rows.length > 0;
  $(countId).textContent = total === undefined ? `(${rows.length})` : `(${rows.length} of ${total})`;
}

// ---- charts --------------------------------------------------------------------------------

// A round tick step (1, 2 or 5 times a power of ten, or of `unit` when given) so that four
// steps cover `max`.
function tickStep(max, unit) {
  const raw = max / 4;
  if (unit && raw >= unit) return tickStep(raw * 4 / unit) * unit;
  const pow = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= raw);
  return step;
}

// Draws `series` ([{name, color, points: [[x, y]]}]) as lines, or dots when `dots`, in `svg`;
// y ticks are whole numbers, or round durations when `unit` (ms) is given.
function chart(svg, series, { xMin, xMax, yFormat, dots, unit }) {
  const W = 560, H = 200, L = 48, R = 10, T = 24, B = 22;
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const step = Math.max(1, tickStep(Math.max(unit ? 1 : 4, ...ys), unit));
  const yMax = step * 4;
  const x = (v) => L + ((v - xMin) / Math.max(1, xMax - xMin)) * (W - L - R);
  const y = (v) => H - B - (v / yMax) * (H - T - B);
  const el = (name, attrs, text) => {
    const e = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const parts = [];
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    parts.push(el("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    parts.push(el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, yFormat(v)));
  }
  parts.push(el("text", { x: L, y: H - 6 }, clock(xMin)));
  parts.push(el("text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(xMax)));
  series.forEach((s, i) => {
    parts.push(el("rect", { x: L + i * 130, y: 6, width: 10, height: 10, fill: s.color }));
    parts.push(el("text", { x: L + 14 + i * 130, y: 15 }, s.name));
    if (dots) {
      for (const [px, py] of s.points) parts.push(el("circle", { cx: x(px), cy: y(py), r: 3, fill: s.color }));
    } else if (s.points.length > 0) {
      const d = s.points.map(([px, py], j) => `${j ? "L" : "M"}${x(px).toFixed(1)},${y(py).toFixed(1)}`).join(" ");
      parts.push(el("path", { class: "series", d, stroke: s.color }));
    }
  });
  svg.replaceChildren(...parts);
}

function drawQueue(now) {
  state.queue = state.queue.filter((p) => p.t >= now - QUEUE_WINDOW_MS);
  const pts = (k) => state.queue.map((p) => [p.t, p[k]]);
  chart(
    $("chart-queue"),
    [
      { name: "in queue", color: "#e8590c", points: pts("queued") },
      { name: "in progress", color: "#3b5bdb", points: pts("running") },
      { name: "workers ready", color: "#2f9e44", points: pts("ready") },
    ],
    { xMin: Math.min(now - 60 * 1000, ...state.queue.map((p) => p.t)), xMax: now, yFormat: (v) => String(v) },
  );
}

function drawLatency(jobs, now) {
  const done = jobs.filter((j) => j.finished_at_ms && j.started_at_ms);
  const xs = done.map((j) => j.finished_at_ms);
  chart(
    $("chart-latency"),
    [
      { name: "delay", color: "#e8590c", points: done.map((j) => [j.finished_at_ms, j.delay_time_ms || 0]) },
      { name: "execution", color: "#3b5bdb", points: done.map((j) => [j.finished_at_ms, j.execution_time_ms || 0]) },
    ],
    { xMin: xs.length ? Math.min(...xs) : now - 60 * 1000, xMax: xs.length ? Math.max(now, ...xs) : now, yFormat: duration, dots: true, unit: 1000 },
  );
}

// ---- panels --------------------------------------------------------------------------------

async function refreshHealth() {
  const { health, now_ms } = await api(`/endpoints/${state.endpoint}/health`);
  const { jobs, workers, rollout } = health;
  $("stat-queued").textContent = jobs.in_queue;
  $("stat-running").textContent = jobs.in_progress;
  $("stat-completed").textContent = jobs.completed;
  $("stat-failed").textContent = jobs.failed + jobs.timed_out;
  $("stat-ready").textContent = `${workers.ready}`;
  $("stat-rollout").textContent = rollout.workers_total ? `v${rollout.version} ${rollout.workers_on_latest}/${rollout.workers_total}` : `v${rollout.version}`;
  state.queue.push({ t: now_ms, queued: jobs.in_queue, running: jobs.in_progress, ready: workers.ready });
  drawQueue(now_ms);
}

async function refreshWorkers() {
  const { workers } = await api(`/endpoints/${state.endpoint}/workers`);
  const rows = workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.workerId = w.id;
    tr.dataset.state = w.state;
    cell(tr, w.id, "mono");
    badge(tr, w.state);
    cell(tr, w.host, "mono");
    cell(tr, w.gpus.length ? w.gpus.join(", ") : "CPU");
    cell(tr, `v${w.version}${w.outdated ? " (outdated)" : ""}`);
    cell(tr, duration(w.uptime_ms));
    cell(tr, w.current_jobs.map(shortId).join(", "), "mono");
    cell(tr, w.jobs_done);
    cell(tr, [w.reason, w.restarts ? `${w.restarts} restarts` : "", w.start].filter(Boolean).join(" · "), "reason");
    return tr;
  });
  fill("workers", rows, "workers-empty", "workers-count");
}

/** A job's row, started with what every job table shows first: its id and state. */
function jobRow(j) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = j.id;
  tr.dataset.state = j.state;
  cell(tr, shortId(j.id), "mono").title = j.id;
  badge(tr, j.state);
  return tr;
}

async function refreshJobs() {
  const { jobs, matched, now_ms } = await api(`/endpoints/${state.endpoint}/jobs?limit=25`);
  const rows = jobs.map((j) => {
    const tr = jobRow(j);
    cell(tr, clock(j.submitted_at_ms));
    cell(tr, duration(j.delay_time_ms ?? (j.state === "IN_QUEUE" ? now_ms - j.submitted_at_ms : null)));
    cell(tr, duration(j.execution_time_ms ?? (j.state === "IN_PROGRESS" && j.started_at_ms ? now_ms - j.started_at_ms : null)));
    cell(tr, j.attempts);
    cell(tr, j.worker_id, "mono");
    cell(tr, j.waiting_reason || j.error, "reason");
    return tr;
  });
  fill("jobs", rows, "jobs-empty", "jobs-count", matched);
  drawLatency(jobs, now_ms);
}

async function retry(id, button) {
  button.disabled = true;
  const out = $("retry-status");
  try {
    const reply = await call("POST", `/v2/${state.endpoint}/retry/${encodeURIComponent(id)}`);
    out.textContent = `job ${id} is ${reply.status} again`;
    out.className = "status";
    await refreshDead();
  } catch (e) {
    if (e instanceof AuthError) return authFailed(e.message);
    out.textContent = `retry of ${id} failed: ${e.message}`;
    out.className = "status error";
    button.disabled = false;
  }
}

async function refreshDead() {
  const { jobs, matched } = await api(`/endpoints/${state.endpoint}/jobs?state=FAILED,TIMED_OUT&limit=50`);
  const rows = jobs.map((j) => {
    const tr = jobRow(j);
    cell(tr, clock(j.finished_at_ms));
    cell(tr, j.attempts);
    cell(tr, j.error, "reason");
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "retry";
    button.dataset.jobId = j.id;
    button.textContent = "Retry";
    button.addEventListener("click", () => retry(j.id, button));
    td.appendChild(button);
    tr.appendChild(td);
    return tr;
  });
  fill("dead-letters", rows, "dead-empty", "dead-count", matched);
}

// ---- the loop ------------------------------------------------------------------------------

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "status error" : "status";
}

function logout() {
  stop();
  state.key = "";
  sessionStorage.removeItem(KEY_STORE);
  $("main").hidden = true;
  $("login").hidden = false;
  $("forget-key").hidden = true;
  $("auth-error").textContent = "";
  setStatus("not connected", false);
}

function authFailed(message) {
  logout();
  $("auth-error").textContent = `The gateway refused the key (401): ${message}`;
  setStatus("not connected", true);
}

function stop() {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

async function poll() {
  try {
    const work = [refreshHealth(), refreshWorkers()];
    if (state.tick % 2 === 0) work.push(refreshJobs(), refreshDead());
    await Promise.all(work);
    state.tick += 1;
    setStatus(`${state.endpoint} · updated ${new Date().toLocaleTimeString()}`, false);
  } catch (e) {
    if (e instanceof AuthError) return authFailed(e.message);
    setStatus(`update failed: ${e.message}`, true);
  }
  state.timer = setTimeout(poll, REFRESH_MS);
}

async function connect() {
  stop();
  try {
    const { endpoints } = await api("/endpoints");
    $("auth-error").textContent = "";
    sessionStorage.setItem(KEY_STORE, state.key);
    $("login").hidden = true;
    $("forget-key").hidden = false;
    const select = $("endpoint");
    select.replaceChildren(
      ...endpoints.map((e) => {
        const o = document.createElement("option");
        o.value = e.id;
        o.textContent = `${e.id} (v${e.version}, ${e.workers_min}–${e.workers_max} workers)`;
        return o;
      }),
    );
    select.disabled = endpoints.length === 0;
    if (endpoints.length === 0) {
      setStatus("no endpoints yet (create one with `shoal endpoint create`)", false);
      state.timer = setTimeout(connect, REFRESH_MS * 3);
      return;
    }
    if (!endpoints.some((e) => e.id === state.endpoint)) state.endpoint = endpoints[0].id;
    select.value = state.endpoint;
    $("main").hidden = false;
    state.tick = 0;
    state.queue = [];
    poll();
  } catch (e) {
    if (e instanceof AuthError) return authFailed(e.message);
    setStatus(`cannot reach the gateway: ${e.message}`, true);
    state.timer = setTimeout(connect, REFRESH_MS * 3);
  }
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key-input").value.trim();
  $("key-input").value = "";
  connect();
});

$("forget-key").addEventListener("click", logout);

$("endpoint").addEventListener("change", (ev) => {
  state.endpoint = ev.target.value;
  const url = new URL(location.href);
  url.searchParams.set("endpoint", state.endpoint);
  history.replaceState(null, "", url);
  stop();
  state.tick = 0;
  state.queue = [];
  poll();
});

if (state.key) connect();
