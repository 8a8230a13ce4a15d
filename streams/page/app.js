// The try-it page: asks POST /recommend, suggests users from GET /users, refreshes GET /live.
// Every string from the server (titles, reasons, the instruction, errors) is user data: it enters the page
// through textContent only, never as HTML.
"use strict";

const RECOMMEND_TIMEOUT_MS = 120000; // the worker answers 504 after its own timeout; this guards the network
const LIVE_EVERY_MS = 3000;

// One id per page load for an empty user field: a user the stream has never seen (the cold start), kept
// for the page's life so that a second request sees the intention the first one left.
const guestId = "guest-" + Array.from(crypto.getRandomValues(new Uint8Array(4)),
  (b) => b.toString(16).padStart(2, "0")).join("");

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmt(value, digits) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "—";
}

function addFact(list, term, value, className) {
  const dd = value instanceof Node ? el("dd", null, className) : el("dd", value, className);
  if (value instanceof Node) dd.append(value);
  list.append(el("dt", term), dd);
}

async function getJSON(url, options, timeoutMs) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  try {
    const response = await fetch(url, { ...options, signal: abort.signal });
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null; // an error page that is not JSON: the status says enough
    }
    if (!response.ok) {
      const why = body && body.error ? body.error : response.statusText;
      const fields = body && body.fields ? " (fields: " + body.fields.join(", ") + ")" : "";
      throw new Error("HTTP " + response.status + ": " + why + fields);
    }
    return body;
  } catch (error) {
    if (error.name === "AbortError") {
      throw new Error("no answer from the worker within " + timeoutMs / 1000 + " s");
    }
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------------------------------ users

async function loadUsers() {
  const hint = $("users-hint");
  try {
    const { users } = await getJSON("/users?limit=50", {}, 10000);
    const options = users.map((user) => {
      const option = el("option");
      option.value = user.user_id;
      option.label = user.history + " items in history";
      return option;
    });
    $("users").replaceChildren(...options);
    const known = users.length === 1 ? "1 user" : users.length + " users";
    hint.textContent = (users.length
      ? "Suggestions: " + known + " with a history on this worker (the context table is partitioned: " +
        "other workers know other users)."
      : "This worker holds no user with a history yet.") + " Empty: a new user, " + guestId + " (cold start).";
  } catch (error) {
    hint.textContent = "No suggestions: " + error.message;
  }
}

// ------------------------------------------------------------------------------------------ ask

async function ask(event) {
  event.preventDefault();
  const userId = $("user").value.trim() || guestId;
  const text = $("text").value.trim();
  const k = Number.parseInt($("k").value, 10);
  const body = { user_id: userId, k: Number.isNaN(k) ? 10 : k };
  if (text) body.text = text;

  const status = $("status");
  status.className = "status";
  status.textContent = "Asking for " + body.k + " recommendations for " + userId + "…";
  $("submit").disabled = true;
  const started = performance.now();
  try {
    const answer = await getJSON("/recommend", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    }, RECOMMEND_TIMEOUT_MS);
    showAnswer(answer, userId === guestId);
    status.textContent = "Answered in " + fmt(performance.now() - started, 0) + " ms (round trip).";
  } catch (error) {
    status.className = "status error";
    status.textContent = "Failed: " + error.message;
  } finally {
    $("submit").disabled = false;
  }
}

function showAnswer(answer, coldStart) {
  const facts = $("facts");
  facts.replaceChildren();
  addFact(facts, "user", answer.user_id + (coldStart ? " (new user: cold start)" : ""));
  addFact(facts, "model version", answer.model_version, "version");
  if (answer.requested_version && answer.requested_version !== answer.model_version) {
    addFact(facts, "requested version", answer.requested_version);
  }
  addFact(facts, "template", answer.template_id);
  addFact(facts, "degraded", answer.degraded ? "yes: " + (answer.reason || "no reason given") : "no",
    answer.degraded ? "bad" : "good");
  if (answer.relaxed && answer.relaxed.length) {
    addFact(facts, "relaxed", answer.relaxed.join(", ") + " (no item satisfied it: let go)", "bad");
  }

  $("items").replaceChildren(...answer.items.map(itemNode));
  if (!answer.items.length) $("items").append(el("li", "No items.", "muted"));
  $("instruction").textContent = answer.instruction || "(none: no model ranked this answer)";

  $("timings").replaceChildren(...Object.entries(answer.timings || {}).map(([stage, ms]) => {
    const node = el("li");
    node.append(el("span", stage.replace(/_ms$/, ""), "muted"), " " + fmt(ms, 1));
    return node;
  }));
  $("answer").hidden = false;
}

function itemNode(item) {
  const node = el("li");
  const head = el("div", null, "item-head");
  head.append(el("span", item.title || item.item_id, "title"),
    el("span", "item " + item.item_id + " · score " + fmt(item.score, 3), "muted"));
  node.append(head);
  if (item.reasons && item.reasons.length) {
    const reasons = el("ul", null, "reasons");
    reasons.append(...item.reasons.map((reason) => el("li", reason)));
    node.append(reasons);
  }
  return node;
}

// ------------------------------------------------------------------------------------------ live

function ms(value) {
  return fmt(value, value < 10 ? 1 : 0);
}

function latency(figure) {
  if (!figure) return "— (none in the window)";
  const line = document.createDocumentFragment();
  line.append("p50 " + ms(figure.p50) + " · p99 " + ms(figure.p99) + " ms",
    el("div", figure.count + (figure.count === 1 ? " observation" : " observations"), "muted small"));
  return line;
}

function eventsPerSecond(rates) {
  if (!rates) return "— (measuring)";
  const topics = Object.entries(rates).sort();
  const total = topics.reduce((sum, [, rate]) => sum + rate, 0);
  const line = document.createDocumentFragment();
  line.append(fmt(total, 1), el("div", topics.map(([t, r]) => t + " " + fmt(r, 1)).join(" · "), "muted small"));
  return line;
}

function showLive(live) {
  const facts = $("live-facts");
  facts.replaceChildren();
  addFact(facts, "served model", live.model_version, "version");
  addFact(facts, "reranker circuit", live.circuit, live.circuit === "closed" ? "good" : "bad");
  addFact(facts, "events/s", eventsPerSecond(live.events_per_s));
  addFact(facts, "query path", latency(live.query_ms));
  addFact(facts, "POST /recommend", latency(live.recommend_ms));

  const rows = live.prequential.map((row) => {
    const tr = el("tr");
    tr.append(el("td", row.version), el("td", fmt(row.ndcg10, 4)), el("td", fmt(row.hr10, 4)),
      el("td", row.answers));
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    const cell = el("td", "no answer scored yet", "muted");
    cell.colSpan = 4;
    tr.append(cell);
    rows.push(tr);
  }
  $("prequential").tBodies[0].replaceChildren(...rows);
  $("live-updated").textContent = "· " + new Date().toLocaleTimeString();
}

async function refreshLive() {
  const status = $("live-status");
  try {
    showLive(await getJSON("/live", {}, 10000));
    status.textContent = "";
    status.className = "status";
  } catch (error) {
    status.className = "status error";
    status.textContent = "Live figures unavailable: " + error.message;
  }
}

// ------------------------------------------------------------------------------------------ start

$("ask").addEventListener("submit", ask);
$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
loadUsers();
refreshLive();
setInterval(refreshLive, LIVE_EVERY_MS);
