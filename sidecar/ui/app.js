// The operator's live usage page. It holds no data of its own: every figure comes from the
// sidecar's /v1 API with the admin token, polled every POLL_MS; the one action (release a
// call) is DELETE /v1/calls/{call_id}. Everything from the API is put on the page as text
// (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const PAGE = 25;
const TOKEN_KEY = "sidecar-admin-token";

const state = {
  token: null,
  paused: false,
  timer: null,
  accounts: { under: null, q: "", offset: 0 },
  channels: { q: "", offset: 0 },
  calls: { account: "", after: [], next: null },
  serverNow: null,
  generation: 0,
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

// --- the token: from #token=..., else this tab's storage, else the form -----------------

function takeTokenFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);  // out of the address bar
  }
}

function showLogin(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(state.timer);
  $("#board").hidden = true;
  $("#logout").hidden = true;
  $("#pause").hidden = true;
  $("#summary").replaceChildren();
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#token").value = "";
  $("#token").focus();
}

function showBoard() {
  $("#login").hidden = true;
  $("#board").hidden = false;
  $("#logout").hidden = false;
  $("#pause").hidden = false;
  refresh();
}

class Unauthorized extends Error {}

async function api(method, path) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${state.token}` },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const why = body && body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
    throw new Error(`${method} ${path}: ${response.status} ${why}`);
  }
  return body;
}

function qs(params) {
  const out = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") out.set(key, value);
  }
  const text = out.toString();
  return text ? `?${text}` : "";
}

// --- bars -------------------------------------------------------------------------------

function level(active, limit) {
  if (limit === null || limit === undefined) return "none";
  if (limit === 0 || active / limit >= 0.9) return "full";
  if (active / limit >= 0.7) return "warn";
  return "ok";
}

function bar(counter, figure) {
  if (!figure) return el("span", { class: "muted", text: "-" });
  const active = figure.active !== undefined ? figure.active : figure.used;
  const limit = figure.active !== undefined ? figure.limit : figure.burst;
  const kind = level(active, limit);
  if (kind === "none") {
    // No limit: the count alone, no bar to fill.
    return el("span", { class: "unlimited", "data-counter": counter, "data-active": active, "data-limit": "", text: `${active} · no limit` });
  }
  const share = limit ? Math.min(active / limit, 1) : limit === 0 ? 1 : 0;
  const fill = el("div", { class: "fill" });
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  let label = limit === null || limit === undefined ? `${active} (no limit)` : `${active} / ${limit}`;
  if (figure.burst !== undefined) label = `${active} / ${limit} (${figure.limit}/s)`;
  return el(
    "div",
    {
      class: `bar ${kind}`,
      "data-counter": counter,
      "data-active": active,
      "data-limit": limit === null || limit === undefined ? "" : limit,
      title: `${counter}: ${label}`,
    },
    fill,
    el("span", { class: "label", text: label }),
  );
}

// --- accounts ---------------------------------------------------------------------------

function crumbs(path) {
  const nav = $("#crumbs");
  nav.replaceChildren();
  const all = el("button", { class: "link", type: "button", text: "all accounts" });
  all.addEventListener("click", () => drill(null));
  nav.append(all);
  for (const id of path || []) {
    const link = el("button", { class: "link", type: "button", text: id });
    link.addEventListener("click", () => drill(id));
    nav.append(" › ", link);
  }
}

function drill(id) {
  state.accounts.under = id;
  state.accounts.offset = 0;
  refresh();
}

function accountRow(account) {
  const id = el("button", { class: "link account-id", type: "button", text: account.id, title: "show this account and the accounts below it" });
  id.addEventListener("click", () => drill(account.id));
  const calls = el("button", { class: "link", type: "button", text: "calls" });
  calls.addEventListener("click", () => {
    $("#call-account").value = account.id;
    state.calls = { account: account.id, after: [], next: null };
    refresh();
    $("#calls-section").scrollIntoView({ behavior: "smooth" });
  });
  const path = account.path.length > 1 ? account.path.slice(0, -1).join(" › ") : null;
  const cell = el(
    "td",
    {},
    id,
    account.name ? el("span", { class: "account-name", text: account.name }) : null,
    account.children ? el("span", { class: "muted", text: ` (${account.children} below)` }) : null,
    path ? el("div", { class: "path", text: path }) : null,
  );
  const u = account.usage;
  return el(
    "tr",
    { "data-account": account.id },
    cell,
    el("td", {}, bar("calls", u.calls)),
    el("td", {}, bar("public", u.public)),
    el("td", {}, bar("internal", u.internal)),
    el("td", {}, bar("cps", u.cps)),
    el("td", {}, calls),
  );
}

function pager(node, offset, shown, total, move) {
  node.replaceChildren();
  if (!total) {
    node.append(el("span", { text: "none" }));
    return;
  }
  node.append(el("span", { text: `${offset + 1}–${offset + shown} of ${total}, busiest first` }));
  if (offset > 0) node.append(el("button", { type: "button", text: "‹ previous", onclick: () => move(Math.max(0, offset - PAGE)) }));
  if (offset + shown < total) node.append(el("button", { type: "button", text: "next ›", onclick: () => move(offset + PAGE) }));
}

function renderAccounts(page, underPath) {
  crumbs(underPath);
  $("#accounts tbody").replaceChildren(...page.accounts.map(accountRow));
  pager($("#accounts-pager"), page.offset, page.accounts.length, page.total, (offset) => {
    state.accounts.offset = offset;
    refresh();
  });
}

// --- channels ---------------------------------------------------------------------------

function renderChannels(page) {
  const rows = page.channels.map((c) =>
    el(
      "tr",
      { "data-channel": c.id },
      el("td", {}, el("span", { class: "account-id", text: c.id }), c.name ? el("span", { class: "account-name", text: c.name }) : null),
      el("td", {}, bar("calls", c.usage.calls)),
      el("td", {}, bar("cps", c.usage.cps)),
    ),
  );
  $("#channels tbody").replaceChildren(...rows);
  pager($("#channels-pager"), page.offset, page.channels.length, page.total, (offset) => {
    state.channels.offset = offset;
    refresh();
  });
}

// --- calls ------------------------------------------------------------------------------

function age(iso) {
  if (!iso || !state.serverNow) return "";
  const seconds = Math.max(0, Math.round((state.serverNow - Date.parse(iso)) / 1000));
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function confirmRelease(call) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent =
    `Release call ${call.call_id}? Its slots are given back at once; ` +
    "the call itself is not hung up (its own BYE later changes nothing).";
  dialog.returnValue = "";
  dialog.showModal();
  const answer = await new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true }));
  if (answer !== "yes") return;
  try {
    await api("DELETE", `/v1/calls/${encodeURIComponent(call.call_id)}${qs({ from_tag: call.from_tag })}`);
  } catch (err) {
    showError(err);
  }
  refresh();
}

function renderCalls(page) {
  const rows = page.calls.map((call) => {
    const release = el("button", { type: "button", class: "danger", text: "Release", "data-release": call.call_id });
    release.addEventListener("click", () => confirmRelease(call));
    return el(
      "tr",
      { "data-call": call.call_id },
      el("td", { class: "mono cut", title: call.call_id, text: call.call_id }),
      el("td", { text: call.state + (call.late ? " (late)" : "") }),
      el("td", { class: "cut", text: call.origin || "" }),
      el("td", { class: "cut", text: call.destination || "" }),
      el("td", { text: call.node || "" }),
      el("td", { text: age(call.created_at) }),
      el("td", { class: "mono cut", title: call.counters.join("\n"), text: call.counters.join(" ") }),
      el("td", {}, release),
    );
  });
  $("#calls tbody").replaceChildren(...rows);
  state.calls.next = page.next;
  const node = $("#calls-pager");
  node.replaceChildren();
  if (!page.calls.length) node.append(el("span", { text: "no call up" + (state.calls.account ? ` for ${state.calls.account}` : "") }));
  if (state.calls.after.length) {
    node.append(el("button", { type: "button", text: "‹ first", onclick: () => { state.calls.after = []; refresh(); } }));
  }
  if (page.next) {
    node.append(el("button", { type: "button", text: "next ›", onclick: () => { state.calls.after.push(JSON.stringify(page.next)); refresh(); } }));
  }
}

// --- refusals, nodes, summary -----------------------------------------------------------

function renderRefusals(data) {
  const minutes = [];
  const base = Math.floor((state.serverNow || Date.now()) / 60000) * 60000;
  for (let i = data.minutes - 1; i >= 0; i--) minutes.push(base - i * 60000);
  const byCounter = new Map();
  for (const r of data.refusals) {
    if (!byCounter.has(r.counter)) byCounter.set(r.counter, new Map());
    byCounter.get(r.counter).set(Date.parse(r.minute), r.refusals);
  }
  const totals = [...byCounter].map(([counter, per]) => [counter, per, [...per.values()].reduce((a, b) => a + b, 0)]);
  totals.sort((a, b) => b[2] - a[2] || a[0].localeCompare(b[0]));
  const peak = Math.max(1, ...totals.flatMap(([, per]) => [...per.values()]));
  const rows = totals.slice(0, 10).map(([counter, per, total]) => {
    const spark = el("div", { class: "spark" });
    for (const m of minutes) {
      const n = per.get(m) || 0;
      const stick = el("span", { class: n ? "" : "zero", title: `${new Date(m).toLocaleTimeString()}: ${n}` });
      stick.style.height = `${Math.max(1, Math.round((n / peak) * 100))}%`;
      spark.append(stick);
    }
    return el("tr", { "data-refusals": counter }, el("td", { class: "mono", text: counter }), el("td", {}, spark), el("td", { text: total }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 3, class: "muted", text: "no refusal" })));
  $("#refusals tbody").replaceChildren(...rows);
}

function renderNodes(data) {
  const rows = data.nodes.map((n) =>
    el(
      "tr",
      { "data-node": n.node },
      el("td", { class: "mono", text: n.node }),
      el("td", {}, el("span", { class: `badge ${n.alive ? "alive" : "silent"}`, text: n.alive ? "alive" : "silent" })),
      el("td", { text: `${n.seconds_since} s ago` }),
      el("td", { text: n.dialogs === null ? "-" : n.dialogs }),
      el("td", { text: new Date(n.booted_at).toLocaleString(), title: `boot ${n.boot}` }),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "no heartbeat yet" })));
  $("#nodes tbody").replaceChildren(...rows);
}

function renderSummary(s) {
  const item = (label, value, id) => el("span", { id }, el("b", { text: value }), ` ${label}`);
  $("#summary").replaceChildren(
    item("answered", s.calls.answered, "sum-answered"),
    item("ringing", s.calls.ringing, "sum-ringing"),
    item("refused this minute", s.refusals_this_minute, "sum-refused"),
    item("accounts", s.accounts, "sum-accounts"),
  );
}

function showError(err) {
  const node = $("#error");
  node.hidden = !err;
  node.textContent = err ? String(err.message || err) : "";
}

// --- the poll ---------------------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  if (!state.token) return;
  const a = state.accounts;
  const c = state.channels;
  const calls = state.calls;
  const generation = ++state.generation;  // a refresh asked meanwhile supersedes this one
  try {
    const [summary, accounts, channels, callPage, refusals, nodes] = await Promise.all([
      api("GET", "/v1/summary"),
      api("GET", `/v1/usage/accounts${qs({ under: a.under, q: a.q, limit: PAGE, offset: a.offset })}`),
      api("GET", `/v1/usage/channels${qs({ q: c.q, limit: PAGE, offset: c.offset })}`),
      api("GET", `/v1/calls${qs({ account: calls.account, limit: PAGE, after: calls.after[calls.after.length - 1] })}`),
      api("GET", "/v1/refusals?minutes=15"),
      api("GET", "/v1/nodes"),
    ]);
    if (generation !== state.generation) return;
    state.serverNow = Date.parse(summary.at);
    renderSummary(summary);
    renderAccounts(accounts, accounts.under_path);
    renderChannels(channels);
    renderCalls(callPage);
    renderRefusals(refusals);
    renderNodes(nodes);
    showError(null);
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshed = String(Date.now());
  } catch (err) {
    if (generation !== state.generation) return;
    if (err instanceof Unauthorized) {
      showLogin("The sidecar refused this token.");
      return;
    }
    showError(err);
  }
  if (!state.paused) state.timer = setTimeout(refresh, POLL_MS);
}

function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

function start() {
  takeTokenFromHash();
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#token").value.trim();
    if (!state.token) return;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    showBoard();
  });
  $("#logout").addEventListener("click", () => showLogin(""));
  $("#pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("#pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) refresh();
    else clearTimeout(state.timer);
  });
  $("#account-search").addEventListener("input", debounce((e) => {
    state.accounts.q = e.target.value.trim();
    state.accounts.offset = 0;
    refresh();
  }, 250));
  $("#channel-search").addEventListener("input", debounce((e) => {
    state.channels.q = e.target.value.trim();
    state.channels.offset = 0;
    refresh();
  }, 250));
  $("#call-account").addEventListener("input", debounce((e) => {
    state.calls = { account: e.target.value.trim(), after: [], next: null };
    refresh();
  }, 250));
  state.token = sessionStorage.getItem(TOKEN_KEY);
  if (state.token) showBoard();
  else showLogin("");
}

document.addEventListener("DOMContentLoaded", start);
