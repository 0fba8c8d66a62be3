// Turnout's release dashboard: polls GET /live once a second (status, events, a ten-
// minute history and who the token belongs to) and renders it; the buttons call the
// admin API. Everything shown is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4c9aff", "#36c37a", "#f5a524", "#c678dd", "#56b6c2"];
const KEY = "turnout-token";
let token = sessionStorage.getItem(KEY) || "";
let current = null; // the last /live answer
let halted = false; // a 401: polling waits for another token (each refusal is audited)

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, cache: "no-store", signal: AbortSignal.timeout(5000),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let doc = null;
  try { doc = await r.json(); } catch (e) { doc = null; }
  return { status: r.status, doc };
}

function text(id, value) { const el = $(id); if (el) el.textContent = value == null ? "" : String(value); }
function when(iso) { return iso ? new Date(iso).toLocaleTimeString() : ""; }
function pct(x, digits = 1) { return x == null ? "–" : (100 * x).toFixed(digits) + "%"; }
function num(x, digits = 1) { return x == null ? "–" : Number(x).toFixed(digits); }

function setConn(message) {
  const el = $("conn");
  el.hidden = !message;
  el.textContent = message || "";
}

function showToken(message, status) {
  const form = $("token-form");
  form.hidden = false;
  text("token-why", status === 401
    ? (token ? "That token was refused: " : "This admin API needs a token: ") + (message || "")
    : (message || "refused"));
  document.body.dataset.auth = token ? "refused" : "needed";
}

function signedOut() {
  current = null;
  renderButtons(null, null);
  text("who", "");
}

async function poll() {
  if (halted) { setTimeout(poll, 1000); return; }
  let answer;
  try {
    answer = await api("GET", "/live");
  } catch (e) {
    setConn("cannot reach the proxy — retrying every second");
    document.body.dataset.connected = "no";
    setTimeout(poll, 1000);
    return;
  }
  try {
    const { status, doc } = answer;
    if (status === 200) {
      setConn(null);
      // with tokens, the form stays to switch to another one
      $("token-form").hidden = !doc.tokens;
      text("token-why", "Use another token:");
      document.body.dataset.auth = "ok";
      render(doc);
    } else if (status === 401) {
      setConn(null);
      signedOut();
      showToken(doc && doc.error, status);
      halted = true; // until a token is submitted
    } else if (status === 403) {
      signedOut();
      setConn("refused: " + ((doc && doc.error) || "403"));
    } else {
      setConn("the admin API answered " + status + (doc && doc.error ? ": " + doc.error : ""));
    }
  } catch (e) {
    setConn("the page could not show this answer: " + e);
  }
  setTimeout(poll, 1000);
}

function render(doc) {
  current = doc;
  const st = doc.status;
  document.body.dataset.connected = "yes";
  // the latch: the largest thing on the page
  const rb = st.rollback;
  $("banner").hidden = !rb.active;
  document.body.dataset.latched = rb.active ? "yes" : "no";
  text("banner-stable", st.stable);
  text("banner-detail", rb.active
    ? `${rb.reason || "rolled back"} — by ${rb.actor || "?"} at ${when(rb.at)}` : "");
  // versions and the weight
  text("stable-name", st.stable);
  text("canary-name", st.canary);
  text("stable-release", (st.versions[st.stable] || {}).release || "");
  text("canary-release", (st.versions[st.canary] || {}).release || "");
  text("weight-effective", st.weight.effective);
  $("weight-fill").style.width = Math.max(0, Math.min(100, st.weight.effective)) + "%";
  text("weight-configured", st.rollout.state === "none"
    ? `configured ${st.weight.configured}%` : `rollout step weight ${st.rollout.weight}%`);
  renderRollout(st.rollout, rb.active);
  renderGuard(st.guard);
  renderCharts(doc.history, st);
  renderTable(st);
  renderMirror(st.mirror);
  renderWorkers(st.workers);
  renderEvents(doc.events);
  renderButtons(st, doc.caller);
  text("footer", `config ${st.config.path} · generation ${st.config.generation} · ` +
    `state ${st.state.backend}${st.state.up ? "" : " (DOWN)"} · build ${st.build}`);
}

function renderRollout(ro, latched) {
  text("rollout-state", latched && ro.state !== "none" ? "halted by the latch" : ro.state);
  $("rollout-state").className = "pill " + (latched ? "latched" : ro.state);
  const list = $("steps");
  list.replaceChildren();
  (ro.steps || []).forEach((weight, i) => {
    const li = document.createElement("li");
    li.textContent = weight + "%";
    const role = (ro.step_approvals || [])[i];
    if (role) {
      const a = document.createElement("span");
      a.className = "approve";
      a.textContent = "approval: " + role;
      li.appendChild(a);
    }
    if (i < ro.step || (i === ro.step && ro.state === "complete")) li.className = "done";
    else if (i === ro.step) li.className = "current" + (latched ? " halted" : "");
    li.dataset.step = i;
    list.appendChild(li);
  });
  let next = "";
  if (ro.awaiting) next = `waiting for approval by role ${ro.awaiting}`;
  else if (ro.next_at && ro.state === "progressing") {
    const s = Math.max(0, Math.round((new Date(ro.next_at) - Date.now()) / 1000));
    next = `next step in ${s} s (at ${when(ro.next_at)}) if the canary stays healthy`;
  }
  text("rollout-next", ro.state === "none" ? "no rollout: the weight is set in the config" : next);
  const waiting = $("waiting");
  waiting.replaceChildren(...(ro.waiting_for || []).map((w) => {
    const li = document.createElement("li"); li.textContent = "waiting for " + w; return li;
  }));
}

const TESTS = { error_rate: "binomial", relative: "Fisher", p99: "p99 binomial" };

function guardWords(g) {
  const ev = g.evidence || {};
  const c = ev.canary, s = ev.stable;
  if (!c || !s) return g.state === "inconclusive" ? "not enough canary traffic to judge yet" : "";
  let words = `canary ${c.errors}/${c.requests} errors (${pct(c.error_rate)}) vs stable ` +
    `${s.errors}/${s.requests}`;
  const alpha = (ev.thresholds || {}).alpha;
  for (const [name, t] of Object.entries(ev.tests || {})) {
    if (t.p_value == null) continue;
    const p = Number(t.p_value).toExponential(1);
    words += `; ${TESTS[name] || name} p = ${p}` +
      (alpha == null ? "" : (t.p_value < alpha ? " < " : " ≥ ") + Number(alpha).toExponential(0));
  }
  return words;
}

function renderGuard(g) {
  if (!g) {
    text("guard-state", "none");
    $("guard-state").className = "pill";
    text("guard-words", "no guard section: no automatic verdict");
    text("guard-source", "");
    return;
  }
  text("guard-state", g.state + (g.reasons.length ? " (" + g.reasons.join(", ") + ")" : ""));
  $("guard-state").className = "pill " + g.state;
  text("guard-words", guardWords(g) + (g.summary ? " · " + g.summary : ""));
  const src = g.source || {};
  text("guard-source", src.kind === "prometheus"
    ? `source: Prometheus ${src.url} (${src.up ? "up" : "DOWN: " + src.last_error})`
    : "source: this proxy's own counts");
}

function renderCharts(h, st) {
  const names = Object.keys(st.versions);
  const legend = $("legend");
  legend.replaceChildren(...names.map((n, i) => {
    const span = document.createElement("span");
    const dot = document.createElement("i");
    dot.style.background = COLORS[i % COLORS.length];
    span.append(dot, n);
    return span;
  }));
  for (const [id, key] of [["chart-rps", "rps"], ["chart-errors", "error_rate"], ["chart-p99", "p99_ms"]]) {
    const svg = $(id);
    svg.replaceChildren();
    const series = names.map((n) => ((h.versions[n] || {})[key]) || []);
    const max = Math.max(1e-9, ...series.flat().filter((v) => v != null));
    let points = 0;
    series.forEach((values, i) => {
      const n = values.length;
      if (n < 2) return;
      const pts = [];
      values.forEach((v, j) => {
        if (v == null) return;
        pts.push(`${(300 * j / (n - 1)).toFixed(1)},${(98 - 94 * v / max).toFixed(1)}`);
      });
      points += pts.length;
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("points", pts.join(" "));
      line.setAttribute("stroke", COLORS[i % COLORS.length]);
      svg.appendChild(line);
    });
    svg.dataset.points = points;
  }
}

function renderTable(st) {
  const body = $("versions-table").tBodies[0];
  body.replaceChildren(...Object.entries(st.versions).map(([name, v]) => {
    const r = v.recent || {};
    const tr = document.createElement("tr");
    for (const cell of [name, num(r.rps), pct(r.error_rate == null ? v.error_rate : r.error_rate, 2),
      num(r.p99_ms == null ? v.p99_ms : r.p99_ms), v.requests.toLocaleString()]) {
      const td = document.createElement("td"); td.textContent = cell; tr.appendChild(td);
    }
    return tr;
  }));
}

function renderMirror(m) {
  $("mirror-card").hidden = !m;
  if (!m) return;
  text("mirror-counts", `${m.percent}% of ${m.methods.join(",")}: sent ${m.sent}, dropped ` +
    `${m.dropped}, failed ${m.failed}` + (m.compare ? `, matched ${m.matched}, mismatched ${m.mismatched}` : ""));
  $("mismatches").replaceChildren(...(m.latest_mismatches || []).map((x) => {
    const li = document.createElement("li");
    li.textContent = `${when(x.at)} ${x.request || ""} (${x.version || "canary"}): ` +
      `${x.difference || "the answer"} differs` + (x.detail ? ` — ${JSON.stringify(x.detail)}` : "");
    return li;
  }));
}

function renderWorkers(w) {
  $("workers-card").hidden = !w;
  if (!w) return;
  $("workers").replaceChildren(...w.members.map((m) => {
    const li = document.createElement("li");
    li.textContent = `worker ${m.index}: pid ${m.pid}, ${m.requests} requests` + (m.latched ? ", latched" : "");
    return li;
  }));
}

function renderEvents(events) {
  $("events").replaceChildren(...(events || []).slice(0, 30).map((e) => {
    const li = document.createElement("li");
    const t = document.createElement("time");
    t.textContent = when(e.at);
    const detail = e.kind === "rollout" ? `${e.phase} step ${e.step}, weight ${e.weight}%`
      : e.kind === "rollback" ? (e.reason || "") : e.kind === "admin" ? `${e.action}: ${e.outcome}`
      : (e.message || e.reason || "");
    li.append(t, `${e.kind}${e.actor ? " by " + e.actor : ""} — ${detail}`);
    return li;
  }));
}

function may(caller, action, st) {
  if (!caller) return false;
  if (caller.everything) return true;
  if (action === "rollback" || action === "pause") return true;
  if (!caller.roles.some((r) => r !== "viewer")) return false;
  if (action === "promote") {
    // promote enters the awaited step, or the next one; a step with `approve` needs its role
    const ro = st.rollout;
    const target = ro.awaiting ? ro.step : ro.step + 1;
    const need = (ro.step_approvals || [])[target];
    return !need || caller.roles.includes(need);
  }
  return true;
}

function renderButtons(st, caller) {
  if (!st) {
    for (const action of ["rollback", "pause", "resume", "promote"]) $("btn-" + action).disabled = true;
    return;
  }
  const ro = st.rollout, latched = st.rollback.active;
  const sense = {
    rollback: !latched,
    pause: ["progressing", "awaiting_approval"].includes(ro.state),
    resume: latched || ro.state === "paused",
    promote: !latched && ["progressing", "awaiting_approval"].includes(ro.state),
  };
  for (const action of Object.keys(sense)) {
    const b = $("btn-" + action);
    const allowed = may(caller, action, st);
    b.disabled = !allowed || !sense[action];
    b.title = allowed ? "" : `your token does not hold a role that may ${action}`;
  }
  text("who", caller ? (caller.everything ? "local access: every action allowed"
    : `token ${caller.name}, roles: ${caller.roles.join(", ")}`) : "");
}

async function act(action) {
  let body;
  if (action === "rollback") {
    const reason = window.prompt("Why roll back? (recorded with the latch)", "");
    if (reason === null) return;
    body = reason ? { reason } : {};
  }
  const out = $("action-result");
  out.className = "result";
  out.textContent = action + "…";
  try {
    const { status, doc } = await api("POST", "/" + action, body === undefined ? {} : body);
    if (status === 200 || (status === 503 && doc && doc.latched)) {
      // a 503 after a rollback: the latch is in force here, not yet saved or confirmed
      out.className = status === 200 ? "result ok" : "result error";
      out.textContent = status === 200
        ? `${action}: done` + (doc && doc.actor ? ` (as ${doc.actor})` : "")
        : `${action}: in force here, not yet confirmed: ${doc.error || ""}`;
      if (doc && doc.status && current) render({ ...current, status: doc.status });
    } else {
      out.className = "result error";
      out.textContent = `${action} refused (${status}): ${(doc && doc.error) || "no reason given"}`;
    }
  } catch (e) {
    out.className = "result error";
    out.textContent = `${action}: the proxy could not be reached`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const action of ["rollback", "pause", "resume", "promote"]) {
    $("btn-" + action).addEventListener("click", () => act(action));
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token-input").value.trim();
    $("token-input").value = "";
    if (token) sessionStorage.setItem(KEY, token); else sessionStorage.removeItem(KEY);
    $("token-form").hidden = true;
    halted = false;
  });
  $("token-forget").addEventListener("click", () => {
    token = "";
    sessionStorage.removeItem(KEY);
    signedOut();
    halted = false;
  });
  poll();
});
