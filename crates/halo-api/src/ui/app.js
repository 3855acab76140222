// The halo dashboard: a page over the node's own API (no build step, no
// outside assets). The token stays in this tab's session storage and goes
// to the API as a bearer token.
"use strict";

const $ = (sel) => document.querySelector(sel);
let timer = null;

function token() { return sessionStorage.getItem("halo-token"); }

async function api(path, method = "GET") {
  const r = await fetch(path, { method, headers: { Authorization: "Bearer " + token() } });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!r.ok) {
    const e = new Error((body && body.error) || r.status + " " + r.statusText);
    e.status = r.status;
    throw e;
  }
  return body;
}

function esc(v) {
  return String(v ?? "-").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function table(head, rows) {
  if (!rows.length) return '<p class="muted">none</p>';
  return "<table><thead><tr>" + head.map((h) => "<th>" + esc(h) + "</th>").join("") + "</tr></thead><tbody>" +
    rows.join("") + "</tbody></table>";
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m ago";
}

function spark(values) {
  if (values.length < 2) return '<span class="muted">collecting</span>';
  const max = Math.max(...values, 1e-9);
  const pts = values.map((v, i) => (i * 160 / (values.length - 1)).toFixed(1) + "," + (26 - v / max * 24).toFixed(1)).join(" ");
  return '<svg class="spark" viewBox="0 0 160 28"><polyline points="' + pts + '"/></svg>';
}

function nodes(c) {
  return table(["Node", "Address", "Zone", "Alive", "State", "Leader", "Placed", "Ready", "Drivers"], c.nodes.map((n) => {
    const state = !n.alive ? '<span class="bad">gone</span>' : n.draining ? '<span class="warn">draining</span>' : "active";
    return `<tr data-test="node" data-name="${esc(n.name)}"><td>${esc(n.name)}</td><td>${esc(n.addr)}</td><td>${esc(n.zone)}</td>` +
      `<td class="${n.alive ? "ok" : "bad"}">${n.alive ? "yes" : "no"}</td><td>${state}</td><td>${n.leader ? "yes" : ""}</td>` +
      `<td>${n.placements}</td><td>${n.ready}</td><td>${esc(n.drivers.join(", "))}</td></tr>`;
  }));
}

function services(status) {
  const c = status.cluster;
  const local = {};
  for (const s of status.services) for (const i of s.instances) local[i.id] = i;
  if (!c.services.length) return '<p class="muted">no services; declare one with <code>halo apply -f FILE</code></p>';
  return c.services.map((s) => {
    const rows = c.placements.filter((p) => p.service === s.name).map((p) => {
      const i = local[p.id];
      const ready = p.ready && !(i && i.stopping);
      const state = i ? (i.stopping ? "draining" : i.state + (i.current ? "" : " (old)")) : "on " + p.node;
      const f = i ? i.probe_failures : null;
      const why = i && !ready && i.last_probe_error ? i.last_probe_error : "";
      return `<tr data-test="instance" data-id="${esc(p.id)}" data-ready="${ready}" data-restarts="${i ? i.restarts : ""}">` +
        `<td>${esc(p.id)}</td><td>${esc(p.node)}</td><td>${esc(state)}</td><td class="${ready ? "ok" : "bad"}">${ready ? "yes" : "no"}</td>` +
        `<td>${i ? i.restarts : "-"}</td><td>${esc(i && i.last_exit)}</td>` +
        `<td>${f ? f.startup + "/" + f.readiness + "/" + f.liveness : "-"}</td><td class="msg">${esc(why || "")}</td></tr>`;
    });
    const cls = s.ready >= s.replicas ? "ok" : "warn";
    return `<h3 data-test="service" data-name="${esc(s.name)}">${esc(s.name)} <span class="${cls}">${s.ready}/${s.replicas} ready</span>` +
      (s.placed > s.current ? ` <span class="warn">${s.placed - s.current} of the old revision</span>` : "") + "</h3>" +
      autoscale(s) +
      table(["Instance", "Node", "State", "Ready", "Restarts", "Last exit", "Probe failures (s/r/l)", "Why not ready"], rows);
  }).join("");
}

// An autoscaled service: its bounds, each target against what was
// measured per ready instance, and the leader's last decision.
function autoscale(s) {
  const a = s.autoscale;
  if (!a) return "";
  const targets = a.targets.map((t) => {
    const unit = t.metric === "p99" ? " ms" : "";
    const v = t.value == null ? "-" : t.value.toFixed(1) + unit;
    return `${esc(t.metric)} ${v} (target ${t.target}${unit})`;
  }).join(", ");
  return `<p data-test="autoscale" data-service="${esc(s.name)}" data-replicas="${s.replicas}">` +
    `autoscaling ${s.replicas} replicas (${a.min} to ${a.max}); per instance ${targets}` +
    (a.reason ? ` <span class="muted">${esc(a.reason)}</span>` : "") + "</p>";
}

function traffic(series) {
  const rows = series.map((s) => {
    const last = s.points[s.points.length - 1] || {};
    const ms = (v) => (v == null ? "-" : v.toFixed(1) + " ms");
    const err = last.error_rate || 0;
    return `<tr data-test="traffic" data-kind="${esc(s.kind)}" data-name="${esc(s.name)}" data-rps="${(last.requests_per_s || 0).toFixed(2)}">` +
      `<td>${esc(s.kind)}</td><td>${esc(s.name)}</td><td>${(last.requests_per_s || 0).toFixed(1)}</td>` +
      `<td class="${err > 0.01 ? "bad" : ""}">${(err * 100).toFixed(2)}%</td><td>${ms(last.p50_ms)}</td><td>${ms(last.p99_ms)}</td>` +
      `<td>${spark(s.points.map((p) => p.requests_per_s))}</td></tr>`;
  });
  return table(["Kind", "Name", "Requests/s", "Errors", "p50", "p99", "Requests/s, 15 min"], rows);
}

async function rollouts(c) {
  const found = [];
  for (const s of c.services) {
    try { found.push(await api("/v1/services/" + encodeURIComponent(s.name) + "/rollout")); } catch (_) { /* none */ }
  }
  if (!found.length) return '<p class="muted">no rollouts (a service with <code>[release] strategy = "canary"</code> rolls out here)</p>';
  return table(["Service", "State", "Step", "Canary weight", "Canary ready", "Stable ready", "Windows passed/failed", "Why", ""], found.map((r) => {
    const live = r.state === "progressing" || r.state === "paused";
    const buttons = live ? `<button data-order="promote" data-service="${esc(r.service)}">Promote</button> ` +
      `<button data-order="abort" data-service="${esc(r.service)}">Abort</button>` : "";
    return `<tr data-test="rollout" data-service="${esc(r.service)}"><td>${esc(r.service)}</td><td>${esc(r.state)}</td>` +
      `<td>${r.step} of ${r.steps.length}</td><td>${r.weight}%</td><td>${r.canary.ready}/${r.canary.placed}</td>` +
      `<td>${r.stable.ready}/${r.stable.placed}</td><td>${r.passed_windows}/${r.failed_windows}</td>` +
      `<td class="msg">${esc(r.reason)}</td><td>${buttons}</td></tr>`;
  }));
}

function backups(b) {
  if (!b) return '<p class="muted">no scheduled backups on this node (<code>[backup] every = "15m"</code> in the node file)</p>';
  const when = b.last_success ? ago(b.last_success * 1000) : "never";
  return table(["Last success", "File", "Size", "Took", "Failures", "Last error", "Overdue"], [
    `<tr data-test="backup"><td>${esc(when)}</td><td>${esc(b.last_file)}</td><td>${b.last_size} bytes</td><td>${b.last_duration_ms} ms</td>` +
    `<td>${b.failures}</td><td class="msg bad">${esc(b.last_error || "")}</td><td>${b.overdue ? '<span class="bad">yes</span>' : "no"}</td></tr>`]);
}

function events(list) {
  return table(["When", "Type", "Node", "Kind", "Service", "Message"], list.slice().reverse().map((e) =>
    `<tr data-test="event" data-kind="${esc(e.kind)}"><td>${esc(ago(e.time_ms))}</td>` +
    `<td class="${e.level === "warning" ? "warn" : ""}">${esc(e.level)}</td><td>${esc(e.node)}</td><td>${esc(e.kind)}</td>` +
    `<td>${esc(e.service)}</td><td class="msg">${esc(e.message)}</td></tr>`));
}

async function refresh() {
  try {
    const [status, series, evs] = await Promise.all([api("/v1/status"), api("/v1/traffic"), api("/v1/events?limit=30")]);
    const c = status.cluster;
    $("#summary").textContent = `node ${c.node} · leader ${c.leader || "none"} · ${c.nodes.filter((n) => n.alive).length} of ${c.nodes.length} nodes alive`;
    const v = c.view;
    const banner = !v.store_reachable ? `The store has not answered for ${(v.stale_ms / 1000).toFixed(1)}s: this is the last state seen.`
      : !v.watching ? "The store's watch broke; resuming." : "";
    $("#banner").hidden = !banner;
    $("#banner").textContent = banner;
    $("#nodes").innerHTML = nodes(c);
    $("#services").innerHTML = services(status);
    $("#traffic").innerHTML = traffic(series);
    $("#rollouts").innerHTML = await rollouts(c);
    $("#backups").innerHTML = backups(status.backup);
    $("#events").innerHTML = events(evs);
    document.body.dataset.refreshed = String(Date.now());
  } catch (e) {
    if (e.status === 401) return signOut("The token was refused: " + e.message);
    $("#banner").hidden = false;
    $("#banner").textContent = "Cannot reach the node's API: " + e.message;
  }
}

function show(signedIn) {
  $("#login").hidden = signedIn;
  $("#app").hidden = !signedIn;
  $("#signout").hidden = !signedIn;
  clearInterval(timer);
  if (signedIn) { refresh(); timer = setInterval(refresh, 2000); }
}

function signOut(why) {
  sessionStorage.removeItem("halo-token");
  $("#login-error").textContent = why || "";
  $("#summary").textContent = "";
  show(false);
}

$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("halo-token", $("#token").value.trim());
  try {
    await api("/v1/status");
    $("#login-error").textContent = "";
    show(true);
  } catch (e) {
    signOut(e.status === 401 ? "Wrong token." : "Cannot reach the node's API: " + e.message);
  }
});

$("#signout").addEventListener("click", () => signOut(""));

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-order]");
  if (!b) return;
  const { order, service } = b.dataset;
  if (!confirm(`${order} the canary of ${service}?`)) return;
  try { await api(`/v1/services/${encodeURIComponent(service)}/rollout/${order}`, "POST"); } catch (e) { alert(e.message); }
  refresh();
});

show(Boolean(token()));
