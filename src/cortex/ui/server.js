// Talking to the server: every data call carries the token as a bearer header; a refusal asks
// the person for it (see app.js). Also the live poller and the notices that report failures.

import { h, setText } from "./dom.js";

export const POLL_MS = 500; // a change shows within about half a second plus one request
export const TOKEN_KEY = "cortex.token";

// The server's root, whatever prefix a proxy serves the dashboard under (/ui/ -> /).
export const base = new URL("..", location.href);
export const $ = (id) => document.getElementById(id);

// Set by app.js: what to do when the server refuses the token. Until the person signs in
// again, nothing is polled (`auth.waiting`): every poll would only be refused.
export const auth = { waiting: false, ask: (_message) => {} };

export class ApiError extends Error {
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

export const serverNow = () => (Date.now() + clockOffsetMs) / 1000;

export async function call(method, path, { body, signal } = {}) {
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
    auth.waiting = true;
    auth.ask(token ? "The server refused the token: sign in again." : "");
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

export const getJSON = async (path, options) => (await call("GET", path, options)).json();

// -- live updates ----------------------------------------------------------------------------

export const heard = { at: null }; // when an answer last came in (the header's live dot)

// Run `refresh` now and again POLL_MS after each answer (never two at once), while the tab is
// visible; `stop` cancels the request in flight.
export function live(refresh) {
  const controller = new AbortController();
  let timer = null;
  let running = false;
  let stopped = false;
  async function tick() {
    clearTimeout(timer);
    timer = null;
    if (stopped || running) return;
    if (document.hidden) return; // resumed on visibilitychange
    if (auth.waiting) return; // refused until signed in: app.js starts the view over then
    running = true;
    try {
      await refresh(controller.signal);
      heard.at = Date.now();
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

let noticeKey = null;
let noticeTimer = null;

export function notify(text, { error = false, key = "action" } = {}) {
  clearTimeout(noticeTimer);
  noticeKey = key;
  $("notice").replaceChildren(h("p", { class: error ? "error" : "" }, text));
  if (key === "action") noticeTimer = setTimeout(() => clearNotice("action"), 8000);
}

export function clearNotice(key) {
  if (noticeKey === key) {
    noticeKey = null;
    $("notice").replaceChildren();
  }
}

export function report(err, key = "action") {
  if (err instanceof ApiError) {
    if (err.status !== 401) notify(`${err.kind}: ${err.message}`, { error: true, key });
  } else {
    notify(`cannot reach the server (${err.message})`, { error: true, key });
  }
}
