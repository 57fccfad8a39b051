// The dashboard's building blocks: elements made from text, tables kept in step by key, the
// numbers a person reads, status badges and the progress bar. No data and no requests here.
//
// Every element is built from text (textContent, never innerHTML): API names, errors, logs and
// payloads come from user code, and the token in session storage must not be reachable by
// anything they contain.

export const IN_PROGRESS = new Set(["status_enqueuing", "status_running"]);
export const STATUS_TEXT = {
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

// -- building the page ---------------------------------------------------------------------

export function h(tag, props = {}, ...children) {
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

export function setText(el, text) {
  // Only on change: a rewrite each poll would drop a reader's text selection.
  const value = String(text);
  if (el.textContent !== value) el.textContent = value;
}

export function setJSON(el, data) {
  setText(el, JSON.stringify(data, null, 2));
}

const rowsOf = new WeakMap();

// Keep a table body in step with a list: rows are matched by key and updated in place, so that
// an opened traceback stays open while the list refreshes under it.
export function syncRows(tbody, items, keyOf, make) {
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

export function table(headings, tbody) {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headings.map(([text, cls]) => h("th", { class: cls }, text)))),
    tbody,
  );
}

export function statusBadge() {
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

export function workerBadge(state) {
  const tone = { running: "run", succeeded: "ok", failed: "bad", stalled: "warn", unknown: "warn" };
  return h("span", { class: `badge ${tone[state] || ""}` }, state);
}

// -- numbers a person reads ------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m ${pad(Math.floor(seconds % 60))}s`;
  return `${Math.floor(minutes / 60)}h ${pad(minutes % 60)}m`;
}

export function fmtRate(perSecond) {
  if (perSecond === null || !Number.isFinite(perSecond)) return "—";
  if (perSecond >= 1) return `${perSecond.toFixed(perSecond >= 100 ? 0 : 1)} batches/s`;
  return `${(perSecond * 60).toFixed(1)} batches/min`;
}

export const toSeconds = (iso) => (iso ? Date.parse(iso) / 1000 : null);
export const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
export const fmtClock = (ts) => {
  const d = new Date(ts * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
};

export function progressBar() {
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

export function stat(label) {
  const value = h("dd");
  return { value, el: h("div", {}, h("dt", {}, label), value) };
}

export function details(summary, text) {
  return text ? h("details", {}, h("summary", {}, summary), h("pre", {}, text)) : "";
}
