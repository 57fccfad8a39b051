// The three views: the APIs, an API's jobs, and a job's page. Each returns the live poller
// that keeps it up to date (`stop` when the reader leaves it).

import {
  IN_PROGRESS,
  details,
  fmtClock,
  fmtDuration,
  fmtRate,
  fmtTime,
  h,
  progressBar,
  setJSON,
  setText,
  stat,
  statusBadge,
  syncRows,
  table,
  toSeconds,
  workerBadge,
} from "./dom.js";
import { $, call, getJSON, live, notify, report, serverNow } from "./server.js";

const LOG_TAIL = 1000; // lines read back when a job page opens
const LOG_MAX_LINES = 5000; // lines kept on the page: a chatty job must not freeze the tab
const LOG_CLASSES = new Set(["stdout", "stderr", "output", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]);
const enc = encodeURIComponent;

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

function crumbs(items) {
  $("crumbs").replaceChildren(
    ...items.flatMap(([text, href], i) => [i ? " / " : "", href ? h("a", { href }, text) : text]),
  );
  document.title = items.length ? `${items.map(([text]) => text).join(" / ")} · Cortex Batch` : "Cortex Batch";
}

const apiHref = (api) => `#/apis/${enc(api)}`;
const jobHref = (api, id) => `#/jobs/${enc(api)}/${enc(id)}`;

// An API version's environment: "none" means its workers run in the server's own Python.
const envText = (env) => (!env ? "—" : env.state === "none" ? "server's Python" : env.state);

export function overview(view) {
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
          setText(env, envText(api.environment));
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

export function apiView(view, apiName) {
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
      setText(env, envText(api.batch_api.environment));
      setJSON(spec, api.batch_api.spec);
    }
    empty.hidden = jobs.job_statuses.length > 0;
    syncRows(tbody, jobs.job_statuses, (js) => js.job_id, jobRow(apiName));
  });
}

export function jobView(view, apiName, jobId) {
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
      dataset: js.dataset,
      workers: js.workers,
      max_attempts: js.max_attempts,
      timeout: js.timeout,
      config: js.config,
      total_batch_count: js.total_batch_count,
      retry_of: js.retry_of,
      api_version: js.spec_id,
      metadata: js.metadata,
      webhook: js.webhook,
      webhook_deliveries: js.webhook_deliveries,
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
