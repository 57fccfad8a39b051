// Cortex Batch dashboard: sign-in, the header, and which view the URL's fragment names.
//
// No framework and no build step: the page is a few files shipped in the Python package, the
// data is the public API's. Modules: dom.js (building blocks), server.js (requests, polling,
// notices), views.js (the pages). Every element is built from text, never parsed as HTML, and
// the server's Content-Security-Policy is the second wall around the token.

import { setText } from "./dom.js";
import { $, TOKEN_KEY, auth, base, heard } from "./server.js";
import { apiView, jobView, overview } from "./views.js";

let current = null;

// -- sign-in -----------------------------------------------------------------------------------

auth.ask = (message) => {
  const dialog = $("login");
  setText($("login-error"), message || "");
  if (!dialog.open) {
    dialog.showModal();
    $("token").focus();
  }
};

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
  auth.waiting = false;
  route(); // start over: what failed before signing in is asked again
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// -- the header's live dot ---------------------------------------------------------------------

setInterval(() => {
  const el = $("live");
  const fresh = heard.at !== null && Date.now() - heard.at < 3000;
  setText(el, heard.at === null ? "connecting…" : fresh ? "● live" : `offline since ${new Date(heard.at).toLocaleTimeString()}`);
  el.classList.toggle("stale", !fresh);
}, 250);

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && current) current.now();
});

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
