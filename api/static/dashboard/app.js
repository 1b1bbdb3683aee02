// The dashboard: hash routes to pages, a 2 s poll of what the page shows (paused while the tab is hidden),
// and a key asked for only when the API answers 401 (without keys, loopback use needs none).

import { getJson, storedKey, storeKey, unauthorized } from "./api.js";
import { batchPage } from "./batch.js";
import { h, notify } from "./dom.js";
import { jobPage } from "./job.js";
import { memoryPage } from "./memory.js";
import { queuePage } from "./queue.js";
import { submitPage } from "./submit.js";

const POLL_MS = 2000;
const ROUTES = [
  [/^#?\/?$/, queuePage, "queue"],
  [/^#\/batch\/([A-Za-z0-9_-]+)$/, batchPage, "queue"],
  [/^#\/job\/([A-Za-z0-9_-]+)$/, jobPage, "queue"],
  [/^#\/memory$/, memoryPage, "memory"],
  [/^#\/submit$/, submitPage, "submit"],
];

const main = document.getElementById("main");
const forget = document.getElementById("forget-key");
const pages = document.querySelector("nav.pages");
let current = null;
let refreshing = false;
let signedIn = false;

function route() {
  for (const [pattern, page, section] of ROUTES) {
    const match = pattern.exec(location.hash);
    if (match) return { page, section, params: { id: match[1] } };
  }
  return null;
}

async function show() {
  leave();
  const found = route();
  markSection(found ? found.section : null);
  if (!found) {
    main.append(
      h("h1", {}, "Not found"),
      h("p", {}, "No such page. ", h("a", { href: "#/" }, "Back to the queue"), "."),
    );
    return;
  }
  current = found.page(main, found.params);
  await tick();
}

function leave() {
  if (current) current.destroy();
  current = null;
  main.replaceChildren();
}

function markSection(section) {
  for (const link of document.querySelectorAll("nav.pages a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function tick() {
  if (refreshing || document.hidden || !current) return;
  const page = current;
  refreshing = true;
  try {
    await page.refresh();
  } catch (error) {
    if (error.status === 404 && page === current) showMissing(error.message);
    else if (error.status !== 401) notify(error.message, true);
  } finally {
    refreshing = false;
  }
}

function showMissing(detail) {
  leave();
  main.append(
    h("h1", {}, "Not found"),
    h("p", { id: "not-found" }, `${detail}. `, h("a", { href: "#/" }, "Back to the queue"), "."),
  );
}

function showLogin(message) {
  leave();
  signedIn = false;
  forget.hidden = true;
  pages.hidden = true; // its links lead nowhere until a key is accepted
  const key = h("input", {
    id: "api-key",
    name: "api_key",
    type: "password",
    autocomplete: "off",
    required: true,
  });
  const problem = h("p", { class: "error", role: "alert", id: "login-problem" }, message || "");
  const form = h(
    "form",
    { id: "login-form", onsubmit: (event) => signIn(event, key.value.trim(), problem) },
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), key),
    h("button", { type: "submit" }, "Sign in"),
    problem,
  );
  main.append(
    h("h1", {}, "Sign in"),
    h(
      "p",
      {},
      "This API needs a key. ",
      h("code", {}, "nightrender keys add NAME"),
      " prints one. The dashboard keeps it for this browser tab's session only and shows only that key's batches.",
    ),
    form,
  );
  key.focus();
}

async function signIn(event, key, problem) {
  event.preventDefault();
  storeKey(key);
  try {
    await getJson("v1/queue");
  } catch (error) {
    storeKey(null);
    if (error.status === 401) showLogin("That key was refused: unknown or revoked.");
    else problem.textContent = error.message;
    return;
  }
  enter();
}

function enter() {
  signedIn = true;
  forget.hidden = !storedKey();
  pages.hidden = false;
  show();
}

unauthorized.addEventListener("unauthorized", () => {
  if (signedIn) showLogin(storedKey() ? "The key was refused: unknown or revoked." : "");
});
forget.addEventListener("click", () => {
  storeKey(null);
  showLogin("");
});
window.addEventListener("hashchange", () => {
  if (!signedIn) return;
  show().then(() => main.focus({ preventScroll: true }));
});
document.addEventListener("visibilitychange", () => tick());
setInterval(tick, POLL_MS);

async function start() {
  try {
    await getJson("v1/queue");
    enter();
  } catch (error) {
    if (error.status === 401) showLogin("");
    else
      main.replaceChildren(
        h("h1", {}, "The dashboard cannot use the API"),
        h("p", { class: "error" }, error.message),
      );
  }
}

start();
