// Cortex Batch dashboard: the public API, polled, drawn with plain DOM calls.
//
// No framework and no build step: the page is three files shipped in the Python package.
// Every element is built from text (textContent, never innerHTML): API names, errors, logs and
// payloads come from user code, and the token in session storage must not be reachable by
// anything they contain. The server's Content-Security-Policy is the second wall.

const POLL_MS = 500; // a change shows within about half a second plus one request
const LOG_TAIL = 1000; // lines read back when a job page opens
const LOG_MAX_LINES = 5000; // lines kept on the page: a chatty job must not freeze the tab
const TOKEN_KEY = "cortex.token";
const IN_PROGRESS = new Set(["status_enqueuing", "status_running"]);
const STATUS_TEXT = {
  status_unknown: "unknown",
  status_enqueuing: "enqueuing",
  status_running: "running",
  status_enqueue_failed: "failed while enqueuing",
  status_completed_with_failures: "completed with failures",
  status_succeeded: "succeeded",
  status_unexpected_error: "unexpected error",
  status_worker_error: "worker error",
  status_worker_oom: "out of memory",
  status_stopped: "stopped",
  status_timed_out: "timed out",
};
const LOG_CLASSES = new Set(["stdout", "stderr", "output", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]);

// The server's root, whatever prefix a proxy serves the dashboard under (/ui/ -> /).
const base = new URL("..", location.href);
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

// -- talking to the server ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

let clockOffsetMs = 0; // server time minus this browser's, when they differ by seconds

function noteServerClock(response) {
  // The Date header has a one-second grain: only a skew well past it is corrected.
  const serverMs = Date.parse(response.headers.get("date") || "");
  if (!Number.isNaN(serverMs)) {
    const offset = serverMs - Date.now();
    clockOffsetMs = Math.abs(offset) > 2000 ? offset : 0;
  }
}

const serverNow = () => (Date.now() + clockOffsetMs) / 1000;

async function call(method, path, { body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(path, base), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  noteServerClock(response);
  if (response.status === 401) {
    askToken(token ? "The server refused the token: sign in again." : "");
    throw new ApiError(401, "auth.unauthorized", "sign in to see this server's jobs");
  }
  if (!response.ok) {
    let kind = "request.failed";
    let message = `${response.status} ${response.statusText}`;
    try {
      ({ kind, message } = await response.json());
    } catch {
      // not a {"kind", "message"} body: keep the status line
    }
    throw new ApiError(response.status, kind, message);
  }
  return response;
}

const getJSON = async (path, options) => (await call("GET", path, options)).json();

// -- building the page ---------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      el.append(child instanceof Node ? child : String(child));
    }
  }
  return el;
}

function setText(el, text) {
  // Only on change: a rewrite each poll would drop a reader's text selection.
  const value = String(text);
  if (el.textContent !== value) el.textContent = value;
}

function setJSON(el, data) {
  setText(el, JSON.stringify(data, null, 2));
}

const rowsOf = new WeakMap();

// Keep a table body in step with a list: rows are matched by key and updated in place, so that
// an opened traceback stays open while the list refreshes under it.
function syncRows(tbody, items, keyOf, make) {
  const old = rowsOf.get(tbody) || new Map();
  const next = new Map();
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    const entry = old.get(key) || make(item);
    entry.update(item);
    next.set(key, entry);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (entry.row !== wanted) tbody.insertBefore(entry.row, wanted);
    previous = entry.row;
  }
  for (const [key, entry] of old) if (!next.has(key)) entry.row.remove();
  rowsOf.set(tbody, next);
}

function table(headings, tbody) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headings.map(([text, cls]) => h("th", { class: cls }, text)))),
    tbody,
  );
}

function statusBadge() {
  const el = h("span", { class: "badge" });
  return {
    el,
    update(status) {
      setText(el, STATUS_TEXT[status] || status);
      let tone = "bad";
      if (status === "status_succeeded") tone = "ok";
      else if (status === "status_completed_with_failures") tone = "warn";
      else if (IN_PROGRESS.has(status)) tone = "run";
      else if (status === "status_stopped") tone = "";
      el.className = `badge ${tone}`;
      el.dataset.status = status;
    },
  };
}

function workerBadge(state) {
  const tone = { running: "run", succeeded: "ok", failed: "bad", stalled: "warn", unknown: "warn" };
  return h("span", { class: `badge ${tone[state] || ""}` }, state);
}

// -- numbers a person reads ------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${pad(Math.floor(seconds % 60))}s`;
  return `${Math.floor(minutes / 60)}h ${pad(minutes % 60)}m`;
}

function fmtRate(perSecond) {
  if (perSecond === null || !Number.isFinite(perSecond)) return "—";
  if (perSecond >= 1) return `${perSecond.toFixed(perSecond >= 100 ? 0 : 1)} batches/s`;
  return `${(perSecond * 60).toFixed(1)} batches/min`;
}

const toSeconds = (iso) => (iso ? Date.parse(iso) / 1000 : null);
const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const fmtClock = (ts) => {
  const d = new Date(ts * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
};

// What a job's row and page show: counts, percent done, duration, throughput and ETA.
// Throughput is measured over the last ten seconds this page watched (it follows changes in
// the worker pool), and over the job's whole duration until then or once it has ended.
const samples = new Map();

function progressOf(js) {
  const counts = js.batch_counts || {};
  const succeeded = js.batch_metrics ? js.batch_metrics.succeeded : counts.succeeded || 0;
  const failed = js.batch_metrics ? js.batch_metrics.failed : counts.failed || 0;
  const leased = IN_PROGRESS.has(js.status) ? counts.leased || 0 : 0;
  const queued = IN_PROGRESS.has(js.status) ? counts.queued || 0 : 0;
  const total = Math.max(js.total_batch_count || 0, succeeded + failed + leased + queued);
  const done = succeeded + failed;
  const start = toSeconds(js.start_time);
  const end = toSeconds(js.end_time);
  const duration = start === null ? null : Math.max(0, (end ?? serverNow()) - start);
  let rate = null;
  if (IN_PROGRESS.has(js.status)) {
    const now = performance.now() / 1000;
    const seen = samples.get(js.job_id) || [];
    seen.push([now, done]);
    while (seen.length > 2 && now - seen[0][0] > 10) seen.shift();
    samples.set(js.job_id, seen);
    const [t0, done0] = seen[0];
    if (now - t0 >= 2) rate = (done - done0) / (now - t0);
  } else {
    samples.delete(js.job_id);
  }
  if (rate === null && duration) rate = done / duration;
  let eta = "—";
  if (js.status === "status_enqueuing") eta = "enqueuing";
  else if (js.status === "status_running") eta = rate > 0 ? fmtDuration((total - done) / rate) : "…";
  return { succeeded, failed, leased, queued, total, done, duration, rate, eta };
}

function progressBar() {
  const parts = ["succeeded", "failed", "leased", "queued"];
  const segments = Object.fromEntries(parts.map((p) => [p, h("span", { class: p })]));
  const pct = h("span", { class: "pct" });
  const el = h(
    "div",
    { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-label": "batches done" },
    h("div", { class: "bar" }, parts.map((p) => segments[p])),
    pct,
  );
  return {
    el,
    update(p) {
      for (const part of parts) {
        segments[part].style.width = p.total ? `${(100 * p[part]) / p.total}%` : "0";
      }
      // Rounded down: 100% means every batch has ended.
      const percent = p.total ? Math.floor((100 * p.done) / p.total) : 0;
      el.setAttribute("aria-valuenow", percent);
      setText(pct, `${percent}%`);
      el.title = parts.map((part) => `${p[part]} ${part}`).join(", ");
    },
  };
}

// -- live updates ----------------------------------------------------------------------------

let lastHeard = null;
let current = null;

// Run `refresh` now and again POLL_MS after each answer (never two at once), while the tab is
// visible; `stop` cancels the request in flight.
function live(refresh) {
  const controller = new AbortController();
  let timer = null;
  let running = false;
  let stopped = false;
  async function tick() {
    clearTimeout(timer);
    timer = null;
    if (stopped || running) return;
    if (document.hidden) return; // resumed on visibilitychange
    if ($("login").open) return; // refused until signed in: route() starts over then
    running = true;
    try {
      await refresh(controller.signal);
      lastHeard = Date.now();
      clearNotice("poll");
    } catch (err) {
      if (!stopped && err.name !== "AbortError") report(err, "poll");
    } finally {
      running = false;
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  tick();
  return {
    controller,
    now: tick,
    stop() {
      stopped = true;
      clearTimeout(timer);
      controller.abort();
    },
  };
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && current) current.now();
});

setInterval(() => {
  const el = $("live");
  const fresh = lastHeard !== null && Date.now() - lastHeard < 3000;
  setText(el, lastHeard === null ? "connecting…" : fresh ? "● live" : `offline since ${new Date(lastHeard).toLocaleTimeString()}`);
  el.classList.toggle("stale", !fresh);
}, 250);

let noticeKey = null;
let noticeTimer = null;

function notify(text, { error = false, key = "action" } = {}) {
  clearTimeout(noticeTimer);
  noticeKey = key;
  $("notice").replaceChildren(h("p", { class: error ? "error" : "" }, text));
  if (key === "action") noticeTimer = setTimeout(() => clearNotice("action"), 8000);
}

function clearNotice(key) {
  if (noticeKey === key) {
    noticeKey = null;
    $("notice").replaceChildren();
  }
}

function report(err, key = "action") {
  if (err instanceof ApiError) {
    if (err.status !== 401) notify(`${err.kind}: ${err.message}`, { error: true, key });
  } else {
    notify(`cannot reach the server (${err.message})`, { error: true, key });
  }
}

// -- sign-in -----------------------------------------------------------------------------------

function askToken(message) {
  const dialog = $("login");
  setText($("login-error"), message || "");
  if (!dialog.open) {
    dialog.showModal();
    $("token").focus();
  }
}

$("login").addEventListener("cancel", (event) => event.preventDefault()); // nothing to show without it

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  const response = await fetch(new URL("get", base), { headers: { Authorization: `Bearer ${token}` } });
  if (response.status === 401) {
    setText($("login-error"), "The server refused that token.");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").close();
  $("logout").hidden = false;
  route(); // start over: what failed before signing in is asked again
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// -- views -----------------------------------------------------------------------------------

function crumbs(items) {
  $("crumbs").replaceChildren(
    ...items.flatMap(([text, href], i) => [i ? " / " : "", href ? h("a", { href }, text) : text]),
  );
  document.title = items.length ? `${items.map(([text]) => text).join(" / ")} · Cortex Batch` : "Cortex Batch";
}

const apiHref = (api) => `#/apis/${enc(api)}`;
const jobHref = (api, id) => `#/jobs/${enc(api)}/${enc(id)}`;

function overview(view) {
  crumbs([["APIs"]]);
  const tbody = h("tbody");
  const empty = h("p", { class: "empty", hidden: true }, "No API is deployed yet: run ", h("code", {}, "cortex deploy"), ".");
  view.append(
    h(
      "section",
      { class: "card" },
      h("h2", {}, "APIs"),
      table(
        [["API"], ["Latest job"], ["Status"], ["Progress"], ["Environment"], ["Deployed"]],
        tbody,
      ),
      empty,
    ),
  );
  return live(async (signal) => {
    const { batch_apis: apis } = await getJSON("get", { signal });
    empty.hidden = apis.length > 0;
    syncRows(tbody, apis, (a) => a.spec.name, (a) => {
      const name = a.spec.name;
      const job = h("td", { class: "mono" });
      const badge = statusBadge();
      const status = h("td", {}, badge.el);
      const bar = progressBar();
      const env = h("td");
      const deployed = h("td");
      const row = h("tr", { "data-api": name }, h("td", {}, h("a", { href: apiHref(name) }, name)), job, status, h("td", {}, bar.el), env, deployed);
      return {
        row,
        update(api) {
          const latest = api.job_statuses[0];
          status.hidden = !latest;
          bar.el.hidden = !latest;
          if (latest) {
            job.replaceChildren(h("a", { href: jobHref(name, latest.job_id) }, latest.job_id));
            badge.update(latest.status);
            bar.update(progressOf(latest));
          } else {
            setText(job, "no job yet");
          }
          setText(env, api.environment ? api.environment.state : "—");
          setText(deployed, fmtTime(api.updated_at));
        },
      };
    });
  });
}

function jobRow(apiName) {
  return (js) => {
    const badge = statusBadge();
    const bar = progressBar();
    const cells = {
      batches: h("td", { class: "num" }),
      rate: h("td", { class: "num" }),
      eta: h("td", { class: "num" }),
      duration: h("td", { class: "num" }),
      started: h("td"),
    };
    const row = h(
      "tr",
      { "data-job": js.job_id },
      h("td", { class: "mono" }, h("a", { href: jobHref(apiName, js.job_id) }, js.job_id)),
      h("td", {}, badge.el),
      h("td", {}, bar.el),
      cells.batches,
      cells.rate,
      cells.eta,
      cells.duration,
      cells.started,
    );
    return {
      row,
      update(job) {
        const p = progressOf(job);
        badge.update(job.status);
        bar.update(p);
        setText(cells.batches, `${p.done} / ${p.total}` + (p.failed ? ` (${p.failed} failed)` : ""));
        setText(cells.rate, fmtRate(p.rate));
        setText(cells.eta, p.eta);
        setText(cells.duration, fmtDuration(p.duration));
        setText(cells.started, fmtTime(job.start_time));
      },
    };
  };
}

const JOB_HEADINGS = [["Job"], ["Status"], ["Progress"], ["Batches", "num"], ["Throughput", "num"], ["ETA", "num"], ["Duration", "num"], ["Started"]];

function apiView(view, apiName) {
  crumbs([["APIs", "#/"], [apiName]]);
  const endpoint = h("p", { class: "muted mono" });
  const env = h("span", { class: "badge" });
  const tbody = h("tbody");
  const empty = h("p", { class: "empty", hidden: true }, "No job yet: submit one with ", h("code", {}, `cortex submit ${apiName} submission.json`), ".");
  const spec = h("pre", { class: "json" });
  view.append(
    h("div", { class: "head" }, h("div", { class: "title" }, h("h1", {}, apiName), endpoint), h("div", {}, "environment ", env)),
    h("section", { class: "card" }, h("h2", {}, "Jobs"), table(JOB_HEADINGS, tbody), empty),
    h("section", { class: "card" }, h("details", {}, h("summary", {}, "API configuration"), spec)),
  );
  let specRead = false;
  return live(async (signal) => {
    // The API's record once (it changes on deploys only), its jobs on every poll.
    const [jobs, api] = await Promise.all([
      getJSON(`${enc(apiName)}?limit=50`, { signal }),
      specRead ? null : getJSON(`get/${enc(apiName)}`, { signal }),
    ]);
    if (api) {
      specRead = true;
      setText(endpoint, api.batch_api.endpoint);
      setText(env, api.batch_api.environment ? api.batch_api.environment.state : "—");
      setJSON(spec, api.batch_api.spec);
    }
    empty.hidden = jobs.job_statuses.length > 0;
    syncRows(tbody, jobs.job_statuses, (js) => js.job_id, jobRow(apiName));
  });
}

function stat(label) {
  const value = h("dd");
  return { value, el: h("div", {}, h("dt", {}, label), value) };
}

function details(summary, text) {
  return text ? h("details", {}, h("summary", {}, summary), h("pre", {}, text)) : "";
}

function jobView(view, apiName, jobId) {
  crumbs([["APIs", "#/"], [apiName, apiHref(apiName)], [jobId]]);
  const path = `${enc(apiName)}/${enc(jobId)}`;
  const badge = statusBadge();
  const stop = h("button", { type: "button", class: "danger", disabled: true }, "Stop job");
  const retry = h("button", { type: "button", class: "primary", disabled: true }, "Re-run failed batches");
  const bar = progressBar();
  const legend = h("div", { class: "legend" });
  const stats = Object.fromEntries(
    [
      ["started", "Started"], ["ended", "Ended"], ["duration", "Duration"], ["rate", "Throughput"],
      ["eta", "ETA"], ["average", "Average time per batch"], ["workers", "Workers"],
      ["attempts", "Max attempts"], ["timeout", "Timeout"], ["retryOf", "Retry of"],
    ].map(([key, label]) => [key, stat(label)]),
  );
  const error = h("section", { class: "card", hidden: true });
  const workers = h("tbody");
  const failedNote = h("p", { class: "muted" });
  const failed = h("tbody");
  const failedCard = h("section", { class: "card", hidden: true, "aria-label": "failed batches" }, h("h2", {}, "Failed batches"), failedNote, table([["#", "num"], ["Batch"], ["Attempts", "num"], ["Error"], ["Traceback"], ["Payload"]], failed));
  const submission = h("pre", { class: "json" });
  const apiSpec = h("pre", { class: "json" });
  const log = h("div", { class: "log", role: "log", "aria-label": "job log", tabindex: 0 });
  const logState = h("span", { class: "muted" });

  view.append(
    h(
      "div",
      { class: "head" },
      h("div", { class: "title" }, h("h1", {}, jobId), h("p", { class: "muted" }, "job of ", h("a", { href: apiHref(apiName) }, apiName), " ", badge.el)),
      h("div", { class: "actions" }, stop, retry),
    ),
    h("section", { class: "card" }, bar.el, legend, h("dl", { class: "stats" }, Object.values(stats).map((s) => s.el))),
    error,
    h("section", { class: "card", "aria-label": "workers" }, h("h2", {}, "Workers"), table([["Worker"], ["State"], ["PID", "num"], ["Exit code", "num"], ["Started"], ["Last seen"], ["Replica"], ["Error"]], workers)),
    failedCard,
    h("section", { class: "card" }, h("div", { class: "log-head" }, h("h2", {}, "Log"), logState), log),
    h(
      "div",
      { class: "grid2" },
      h("section", { class: "card", "aria-label": "submission" }, h("h2", {}, "Submission"), submission),
      h("section", { class: "card", "aria-label": "configuration" }, h("h2", {}, "API configuration"), apiSpec),
    ),
  );

  let failedSeen = -1;
  const poll = live(async (signal) => {
    const [status, pool] = await Promise.all([
      getJSON(path, { signal }),
      getJSON(`${path}/workers`, { signal }),
    ]);
    const js = status.job_status;
    const p = progressOf(js);
    const running = IN_PROGRESS.has(js.status);
    badge.update(js.status);
    bar.update(p);
    legend.replaceChildren(
      ...["succeeded", "failed", "leased", "queued"].map((part) => h("span", {}, h("i", { class: part }), `${p[part]} ${part}`)),
      h("span", { class: "muted" }, `${p.done} of ${p.total} batches done`),
    );
    stop.disabled = !running;
    retry.disabled = running || p.failed === 0;
    setText(stats.started.value, fmtTime(js.start_time));
    setText(stats.ended.value, fmtTime(js.end_time));
    setText(stats.duration.value, fmtDuration(p.duration));
    setText(stats.rate.value, fmtRate(p.rate));
    setText(stats.eta.value, p.eta);
    setText(stats.average.value, fmtDuration(js.batch_metrics ? js.batch_metrics.average_time_per_batch : null));
    setText(stats.workers.value, running && js.worker_counts ? `${js.worker_counts.running || 0} running of ${js.workers}` : String(js.workers));
    setText(stats.attempts.value, js.max_attempts);
    setText(stats.timeout.value, js.timeout ? fmtDuration(js.timeout) : "none");
    if (js.retry_of) stats.retryOf.value.replaceChildren(h("a", { href: jobHref(apiName, js.retry_of) }, js.retry_of));
    else setText(stats.retryOf.value, "—");
    error.hidden = !js.error;
    if (js.error && error.dataset.kind !== js.error.kind) {
      error.dataset.kind = js.error.kind;
      error.replaceChildren(h("h2", {}, "Why the job failed"), h("p", { class: "error" }, `${js.error.kind}: ${js.error.message}`), details("traceback", js.error.traceback));
    }
    syncRows(workers, pool.workers, (w) => w.worker_id, workerRow);
    setJSON(submission, {
      workers: js.workers,
      max_attempts: js.max_attempts,
      timeout: js.timeout,
      config: js.config,
      total_batch_count: js.total_batch_count,
      retry_of: js.retry_of,
      api_version: js.spec_id,
    });
    setJSON(apiSpec, status.api_spec);
    if (p.failed !== failedSeen) {
      // Failed batches only change when the count does: read them then, not on every poll.
      const listing = await getJSON(`${path}/failed_batches?limit=100`, { signal });
      failedSeen = p.failed;
      failedCard.hidden = p.failed === 0;
      setText(failedNote, p.failed > listing.failed_batches.length ? `The first ${listing.failed_batches.length} of ${p.failed}; all of them: GET /${apiName}/${jobId}/failed_batches?limit=10000` : `${p.failed} failed after all their attempts.`);
      syncRows(failed, listing.failed_batches, (b) => b.batch_id, failedRow);
    }
  });

  stop.addEventListener("click", async () => {
    if (!confirm(`Stop job ${jobId}? Its workers are stopped and its queued batches are not run.`)) return;
    stop.disabled = true;
    try {
      const answer = await (await call("DELETE", path)).json();
      notify(answer.message);
    } catch (err) {
      report(err);
    }
    poll.now();
  });
  retry.addEventListener("click", async () => {
    retry.disabled = true;
    try {
      const job = await (await call("POST", `${path}/retry_failed`, { body: {} })).json();
      notify(`re-running the ${job.total_batch_count} failed batches of ${jobId} as job ${job.job_id}`);
      location.hash = jobHref(apiName, job.job_id);
    } catch (err) {
      report(err);
      retry.disabled = false;
    }
  });

  followLog(`${path}/logs?follow=true&format=json&tail=${LOG_TAIL}`, log, logState, poll.controller.signal);
  return poll;
}

function workerRow(w) {
  const cells = Array.from({ length: 6 }, (_, i) => h("td", { class: i < 2 ? "num" : "" }));
  const state = h("td");
  const row = h("tr", { "data-worker": w.name }, h("td", { class: "mono" }, w.name), state, ...cells);
  let shown = null;
  return {
    row,
    update(worker) {
      if (shown !== worker.state) {
        shown = worker.state;
        state.replaceChildren(workerBadge(worker.state));
      }
      const [pid, exit, started, seen, replica, error] = cells;
      setText(pid, worker.pid ?? "—");
      setText(exit, worker.exit_code ?? "—");
      setText(started, fmtTime(worker.started_at));
      setText(seen, fmtTime(worker.last_seen));
      setText(replica, worker.replica_id ?? "—");
      setText(error, worker.error ?? "");
    },
  };
}

function failedRow(b) {
  const row = h(
    "tr",
    { "data-batch": b.batch_id },
    h("td", { class: "num" }, b.index),
    h("td", { class: "mono" }, b.batch_id),
    h("td", { class: "num" }, b.attempts),
    h("td", {}, h("span", { class: "muted" }, b.error_kind || ""), " ", h("span", { class: "error" }, b.error || "")),
    h("td", {}, details("traceback", b.traceback)),
    h("td", {}, details("payload", JSON.stringify(b.payload, null, 2))),
  );
  return { row, update() {} }; // a failed batch does not change while it is listed
}

// Stream the job's log (JSON lines) into `box` until the job has ended and every line is in.
async function followLog(path, box, state, signal) {
  setText(state, "following…");
  try {
    const response = await call("GET", path, { signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      const lines = pending.split("\n");
      pending = lines.pop();
      appendLog(box, lines.filter((l) => l).map((l) => JSON.parse(l)));
    }
    setText(state, "the job has ended: this is its whole log");
    box.append(h("div", { class: "end" }, "— end of log —"));
  } catch (err) {
    if (err.name === "AbortError") return;
    setText(state, err instanceof ApiError ? `${err.kind}: ${err.message}` : `the log stream broke (${err.message}): reload to follow it again`);
  }
}

function appendLog(box, lines) {
  if (!lines.length) return;
  const pinned = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
  const fragment = document.createDocumentFragment();
  for (const line of lines) {
    const kind = line.level || line.stream;
    fragment.append(
      h(
        "div",
        { class: LOG_CLASSES.has(kind) ? kind : "" },
        h("span", { class: "ts" }, fmtClock(line.ts)),
        " ",
        h("span", { class: "src" }, line.worker),
        ` ${kind}`,
        line.batch_id ? ` [batch ${line.batch_id}]` : "",
        ` ${line.message}`,
      ),
    );
  }
  box.append(fragment);
  while (box.childElementCount > LOG_MAX_LINES) box.firstElementChild.remove();
  if (pinned) box.scrollTop = box.scrollHeight; // follow the end unless the reader scrolled up
}

// -- routing -----------------------------------------------------------------------------------

function route() {
  if (current) current.stop();
  const view = $("view");
  view.replaceChildren();
  let parts;
  try {
    parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p).map(decodeURIComponent);
  } catch {
    parts = [];
  }
  if (parts[0] === "apis" && parts.length === 2) current = apiView(view, parts[1]);
  else if (parts[0] === "jobs" && parts.length === 3) current = jobView(view, parts[1], parts[2]);
  else current = overview(view);
}

$("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
window.addEventListener("hashchange", route);
route();
