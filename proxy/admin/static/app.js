// The admin console: plain DOM code over the admin API. The token lives in sessionStorage
// (this tab only): no cookie, so no request is sent with it unless this script adds it.
"use strict";

const API = "/admin/api";
const TOKEN_KEY = "nxlink-admin-token";
const LIMITS = ["rateLimitRps", "rateLimitBurst", "maxInflight", "appendBatchSize"];
const QUOTAS = ["numbersPerDay", "numbersPerMonth", "requestsPerDay", "requestsPerMonth"];
const OPENAPI = ["accessKey", "accessSecret", "baseUrl", "bizType", "algorithm"];
const SVG = "http://www.w3.org/2000/svg";

const state = { tenants: [], today: {}, editing: null, chartTenant: null, confirmed: null };
const $ = (selector) => document.querySelector(selector);

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.errors = (body && body.errors) || [];
  }
}

// The tenants file's version (ETag) of the last answer: an edit is sent with If-Match, so
// that it cannot undo a change made meanwhile (in another tab, by another operator).
let fileVersion = null;

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  if (method === "PATCH" && fileVersion) headers["If-Match"] = fileVersion;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (err) {
    throw new ApiError(0, { message: `Cannot reach the admin API (${err.message})` });
  }
  const doc = await response.json().catch(() => null);
  if (response.headers.get("ETag")) fileVersion = response.headers.get("ETag");
  if (!response.ok) {
    if (response.status === 401 || response.status === 403) signOut();
    throw new ApiError(response.status, doc);
  }
  return doc.data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

// notices: every failure is said in words

function describe(err) {
  const code = err.code ? ` (${err.code})` : "";
  return `${err.message}${code}`;
}

function notify(text, kind = "error") {
  const box = $("#notice");
  box.className = `notice ${kind}`;
  box.replaceChildren(el("span", {}, text), el("button", { class: "ghost", onclick: clearNotice }, "×"));
  box.hidden = false;
}

function clearNotice() {
  $("#notice").hidden = true;
}

function failed(err) {
  notify(describe(err));
}

// sign-in

function showSignedIn(signedIn) {
  $("#sign-in").hidden = signedIn;
  $("#console").hidden = !signedIn;
  $("#sign-out").hidden = !signedIn;
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  showSignedIn(false);
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = "";
  try {
    await refresh();
    clearNotice();
  } catch (err) {
    signOut();
    failed(err);
  }
}

// the tenant table

async function refresh() {
  const [list, usage] = await Promise.all([api("GET", "/tenants"), api("GET", "/usage?days=1")]);
  state.tenants = list.tenants;
  state.today = Object.fromEntries(usage.tenants.map((row) => [row.id, row.days[0]]));
  showSignedIn(true);
  renderTenants();
  await Promise.all([loadAudit(), state.chartTenant ? loadChart(state.chartTenant) : null]);
}

function expiry(key) {
  if (key.expired) return el("span", { class: "tag bad" }, "expired");
  if (!key.notAfter) return el("span", { class: "tag" }, "no expiry");
  return el("span", { class: "tag warn", title: key.notAfter }, `until ${shortTime(key.notAfter).slice(5, 16)}`);
}

function keysCell(tenant) {
  const list = el("ul", { class: "keys" });
  for (const key of tenant.keys) {
    const revoke = tenant.editable
      ? el("button", { class: "link revoke", onclick: () => revokeKey(tenant, key) }, "revoke")
      : null;
    list.append(el("li", { "data-key-id": key.id }, el("code", {}, key.masked), " ", expiry(key), " ", revoke));
  }
  return list;
}

function pairs(values) {
  const entries = Object.entries(values || {});
  if (!entries.length) return el("span", { class: "muted" }, "defaults");
  return el("ul", { class: "pairs" }, ...entries.map(([k, v]) => el("li", {}, `${k}: ${v}`)));
}

function todayCell(tenant) {
  const day = state.today[tenant.id];
  if (!day) return el("span", { class: "muted" }, "–");
  return el("span", {}, `${day.requests} req · ${day.numbersAppended} numbers`);
}

function actions(tenant) {
  const cell = el("div", { class: "row-actions" });
  const add = (label, cls, handler) => cell.append(el("button", { class: cls, onclick: handler }, label));
  add("Usage", "ghost usage", () => loadChart(tenant.id).catch(failed));
  add("Test", "ghost test", () => testTenant(tenant));
  if (tenant.editable) {
    add("Edit", "ghost edit", () => openForm(tenant));
    add("Rotate", "ghost rotate", () => openRotate(tenant));
    add("Delete", "danger delete", () => confirmDelete(tenant));
  } else {
    cell.append(el("span", { class: "muted small", title: "Change it where it is configured" }, "read-only"));
  }
  return cell;
}

function renderTenants() {
  const body = $("#tenants tbody");
  body.replaceChildren(
    ...state.tenants.map((t) =>
      el(
        "tr",
        { "data-tenant-id": t.id },
        el(
          "td",
          { class: "alias" },
          el("strong", {}, t.alias),
          t.description ? el("div", { class: "description" }, t.description) : null,
          el("div", { class: "muted small" }, t.id),
        ),
        el("td", {}, el("span", { class: `tag source-${t.source}` }, t.source)),
        el("td", {}, keysCell(t)),
        el("td", { class: "url" }, t.openapi.baseUrl, t.openapi.hasSecret ? null : el("div", { class: "tag bad" }, "no credentials")),
        el("td", {}, pairs(t.limits)),
        el("td", {}, pairs(t.quotas)),
        el("td", { class: "today" }, todayCell(t)),
        el("td", { class: "actions" }, actions(t)),
      ),
    ),
  );
  if (!state.tenants.length) body.append(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "No tenant yet.")));
  $("#tenant-count").textContent = String(state.tenants.length);
}

// create and edit

function openForm(tenant) {
  state.editing = tenant;
  const form = $("#tenant-form");
  form.reset();
  $("#tenant-form-errors").hidden = true;
  $("#tenant-form-title").textContent = tenant ? `Edit ${tenant.alias}` : "New tenant";
  if (tenant) {
    form.alias.value = tenant.alias;
    form.description.value = tenant.description;
    form.baseUrl.value = tenant.openapi.baseUrl;
    form.bizType.value = tenant.openapi.bizType;
    form.algorithm.value = tenant.openapi.algorithm || "md5";
    for (const name of LIMITS) form[name].value = tenant.limits[name] ?? "";
    for (const name of QUOTAS) form[name].value = tenant.quotas[name] ?? "";
  }
  form.accessKey.placeholder = tenant && tenant.openapi.accessKey ? `unchanged (${tenant.openapi.accessKey})` : "";
  form.accessSecret.placeholder = tenant && tenant.openapi.hasSecret ? "unchanged" : "";
  $("#tenant-dialog").showModal();
}

function numbers(form, names, editing) {
  const out = {};
  for (const name of names) {
    const text = form[name].value.trim();
    if (text !== "") out[name] = Number(text);
    else if (editing) out[name] = null;
  }
  return out;
}

function formBody(form, editing) {
  const openapi = {};
  for (const name of OPENAPI) {
    const text = form[name].value.trim();
    if (text !== "") openapi[name] = text;
  }
  return {
    alias: form.alias.value.trim(),
    description: form.description.value.trim(),
    openapi,
    limits: numbers(form, LIMITS, editing),
    quotas: numbers(form, QUOTAS, editing),
  };
}

async function saveTenant(event) {
  event.preventDefault();
  const form = $("#tenant-form");
  const editing = state.editing;
  try {
    if (editing) {
      await api("PATCH", `/tenants/${encodeURIComponent(editing.id)}`, formBody(form, true));
      $("#tenant-dialog").close();
      notify(`Saved ${form.alias.value.trim()}.`, "ok");
    } else {
      const created = await api("POST", "/tenants", formBody(form, false));
      $("#tenant-dialog").close();
      showKey(created.tenant.alias, created.apiKey);
    }
    await refresh();
  } catch (err) {
    const box = $("#tenant-form-errors");
    box.replaceChildren(el("p", {}, describe(err)), ...(err.errors.length ? [el("ul", {}, ...err.errors.map((e) => el("li", {}, e)))] : []));
    box.hidden = false;
  }
}

// keys

function showKey(alias, key) {
  $("#key-alias").textContent = alias;
  $("#new-key").value = key;
  $("#copy-state").textContent = "";
  $("#key-dialog").showModal();
  $("#new-key").select();
}

async function copyKey() {
  const input = $("#new-key");
  try {
    await navigator.clipboard.writeText(input.value);
    $("#copy-state").textContent = "Copied to the clipboard.";
  } catch {
    input.select();
    $("#copy-state").textContent = "Press Ctrl+C (or ⌘C) to copy the selected key.";
  }
}

function forgetKey() {
  $("#new-key").value = "";
}

function openRotate(tenant) {
  state.editing = tenant;
  $("#rotate-alias").textContent = tenant.alias;
  $("#rotate-dialog").showModal();
}

async function rotate(event) {
  event.preventDefault();
  const tenant = state.editing;
  const grace = Number($("#rotate-form").graceSeconds.value || 0);
  $("#rotate-dialog").close();
  try {
    const made = await api("POST", `/tenants/${encodeURIComponent(tenant.id)}/keys`, { graceSeconds: grace });
    showKey(tenant.alias, made.apiKey);
    await refresh();
  } catch (err) {
    failed(err);
  }
}

function revokeKey(tenant, key) {
  ask(`Revoke key ${key.masked}?`, `Clients of ${tenant.alias} using it are refused at once.`, "Revoke", async () => {
    await api("DELETE", `/tenants/${encodeURIComponent(tenant.id)}/keys/${encodeURIComponent(key.id)}`);
    notify(`Revoked ${key.masked}.`, "ok");
  });
}

// delete, with confirmation

function confirmDelete(tenant) {
  ask(`Delete ${tenant.alias}?`, "Its keys stop working at once. This cannot be undone.", "Delete", async () => {
    await api("DELETE", `/tenants/${encodeURIComponent(tenant.id)}`);
    if (state.chartTenant === tenant.id) state.chartTenant = null;
    notify(`Deleted ${tenant.alias}.`, "ok");
  });
}

function ask(title, text, verb, action) {
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-yes").textContent = verb;
  state.confirmed = action;
  $("#confirm-dialog").showModal();
}

async function confirmed() {
  $("#confirm-dialog").close();
  const action = state.confirmed;
  state.confirmed = null;
  try {
    await action();
    await refresh();
  } catch (err) {
    failed(err);
  }
}

// credentials test

async function testTenant(tenant) {
  $("#test-alias").textContent = tenant.alias;
  $("#test-verdict").textContent = "Calling nxlink…";
  $("#test-verdict").className = "verdict";
  $("#test-details").replaceChildren();
  $("#test-dialog").showModal();
  try {
    const result = await api("POST", `/tenants/${encodeURIComponent(tenant.id)}/test`);
    $("#test-verdict").textContent = result.ok ? "OK: nxlink accepted the credentials" : "Failed";
    $("#test-verdict").className = `verdict ${result.ok ? "ok" : "bad"}`;
    const rows = [
      ["HTTP status", result.httpStatus ?? "–"],
      ["nxlink code", result.nxlinkCode ?? "–"],
      ["Message", result.message],
      ["Latency", `${result.latencyMs} ms`],
    ];
    $("#test-details").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  } catch (err) {
    $("#test-verdict").textContent = describe(err);
    $("#test-verdict").className = "verdict bad";
  }
}

// usage chart: bars for requests, a line for numbers appended, oldest day on the left

async function loadChart(tenantId) {
  state.chartTenant = tenantId;
  const usage = await api("GET", `/usage?days=30&tenant=${encodeURIComponent(tenantId)}`);
  const row = usage.tenants[0];
  $("#usage-tenant").textContent = row.apiKeyAlias;
  drawChart(row.days.slice().reverse());
}

function drawChart(days) {
  const width = 640, height = 220, left = 44, bottom = 28, top = 12;
  const peak = Math.max(1, ...days.map((d) => Math.max(d.requests, d.numbersAppended)));
  const step = (width - left - 8) / days.length;
  const y = (value) => top + (height - top - bottom) * (1 - value / peak);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "usage chart" });
  for (const fraction of [0, 0.5, 1]) {
    const value = Math.round(peak * fraction);
    chart.append(svg("line", { class: "grid", x1: left, x2: width, y1: y(value), y2: y(value) }));
    const label = svg("text", { class: "axis", x: left - 6, y: y(value) + 4, "text-anchor": "end" });
    label.textContent = String(value);
    chart.append(label);
  }
  const points = [];
  days.forEach((day, i) => {
    const x = left + i * step;
    const bar = svg("rect", { class: "bar", x: x + 1, width: Math.max(1, step - 2), y: y(day.requests), height: y(0) - y(day.requests), "data-date": day.date, "data-requests": day.requests });
    const tip = svg("title");
    tip.textContent = `${day.date}: ${day.requests} requests, ${day.numbersAppended} numbers appended`;
    bar.append(tip);
    chart.append(bar);
    points.push(`${x + step / 2},${y(day.numbersAppended)}`);
  });
  chart.append(svg("polyline", { class: "numbers", points: points.join(" ") }));
  for (const i of [0, days.length - 1]) {
    const label = svg("text", { class: "axis", x: left + i * step + step / 2, y: height - 8, "text-anchor": i ? "end" : "start" });
    label.textContent = days[i].date;
    chart.append(label);
  }
  $("#chart").replaceChildren(chart);
}

// audit log

async function loadAudit() {
  const audit = await api("GET", "/audit?limit=50");
  const body = $("#audit-table tbody");
  body.replaceChildren(
    ...audit.entries.map((e) =>
      el(
        "tr",
        {},
        el("td", { class: "small" }, shortTime(e.time)),
        el("td", {}, e.action),
        el("td", {}, e.alias || e.tenantId),
        el("td", {}, el("span", { class: `tag ${e.result === "ok" ? "good" : "bad"}` }, e.result)),
      ),
    ),
  );
  if (!audit.entries.length) body.append(el("tr", {}, el("td", { colspan: "4", class: "muted" }, "No change yet.")));
}

function shortTime(iso) {
  return iso.replace("T", " ").replace(/(\.\d+)?Z$/, " UTC");
}

// wiring

function start() {
  $("#sign-in-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", signOut);
  $("#refresh").addEventListener("click", () => refresh().catch(failed));
  $("#new-tenant").addEventListener("click", () => openForm(null));
  $("#tenant-form").addEventListener("submit", saveTenant);
  $("#rotate-form").addEventListener("submit", rotate);
  $("#copy-key").addEventListener("click", copyKey);
  $("#key-dialog").addEventListener("close", forgetKey);
  $("#confirm-yes").addEventListener("click", confirmed);
  for (const button of document.querySelectorAll("[data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  window.addEventListener("unhandledrejection", (event) => notify(`Unexpected error: ${event.reason}`));
  window.addEventListener("error", (event) => notify(`Unexpected error: ${event.message}`));
  if (sessionStorage.getItem(TOKEN_KEY)) refresh().catch((err) => { signOut(); failed(err); });
  else showSignedIn(false);
}

start();
