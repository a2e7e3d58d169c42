/* musclenode dashboard: vanilla JavaScript, no build step, no network beyond the node.
 *
 * Signs in with a bearer token (kept in sessionStorage only), then calls the node's API:
 * /api/v1/subjects (completeness grid), /api/v1/subjects/{subject} (trajectories),
 * /api/v1/measurements (cohort view) and, where the node has it, /api/v1/stats.
 */
"use strict";

const TOKEN_KEY = "musclenode-token";
const MONTH_DAYS = 365.25 / 12;
/* Okabe-Ito: distinguishable with the common colour-vision deficiencies. */
const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
const METRICS = {
  csa_mm2: "Cross-sectional area", vol_ml: "Muscle volume", ff_percent: "Fat fraction",
  frma_mm2: "Functional remaining muscle area", t2w_ms: "Water T2 (median)", t2w_mean_ms: "Water T2 (mean)",
  t2w_iqr_ms: "Water T2 (IQR)", b1: "Relative B1", ff_t2_percent: "Fat fraction (T2 fit)",
};
const STATES = ["done", "processing", "received", "waiting for ROIs", "failed", "skipped"];
const STATS_FIELDS = ["n", "mean", "sd", "srm", "srm_ci", "n_per_arm_25", "n_per_arm_50"];
const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const FONT = { family: "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif", size: 15 };

const state = { subjects: [], rows: [], hasStats: false, subject: null };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function months(days) { return Math.round((days / MONTH_DAYS) * 10) / 10; }
function metricName(m) { return METRICS[m] || m; }
function unitText(u) { return u === "mm2" ? "mm²" : u === "1" ? "" : u || ""; }
function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (digits === undefined && Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);   // counts: n, n per arm
  const d = digits === undefined ? (Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2) : digits;
  return x.toFixed(d);
}
function signed(x) { return (x > 0 ? "+" : x < 0 ? "−" : "±") + fmt(Math.abs(x)); }
function stateClass(s) { return "state-" + String(s || "none").replace(/[^a-z]+/gi, "-").toLowerCase(); }
function lineName(m) { return [m.region, m.roi || "whole leg", m.side].filter(Boolean).join(" · "); }
function uniq(xs) { return [...new Set(xs)]; }

/* ---- the API ---------------------------------------------------------------------- */

class Unauthorised extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token, Accept: "application/json" } });
  if (r.status === 401) throw new Unauthorised("the token was not accepted");
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

/* The stats endpoint is called only where the OpenAPI document lists it (no 404s logged). */
async function detectStats() {
  try {
    const r = await fetch("/api/v1/openapi.json");
    const doc = r.ok ? await r.json() : {};
    return Boolean(doc.paths && doc.paths["/api/v1/stats"]);
  } catch (e) {
    return false;
  }
}

/* ---- sign in ---------------------------------------------------------------------- */

function showSignin(message) {
  $("signin-section").hidden = false;
  $("dashboard").hidden = true;
  $("signout").hidden = true;
  $("signin-error").textContent = message || "";
}

async function start() {
  if (!sessionStorage.getItem(TOKEN_KEY)) { showSignin(""); return; }
  try {
    state.subjects = await api("/api/v1/subjects");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin(e instanceof Unauthorised ? "This token was not accepted (unknown or revoked)." : String(e.message));
    return;
  }
  $("signin-section").hidden = true;
  $("dashboard").hidden = false;
  $("signout").hidden = false;
  renderGrid();
  const [rows, hasStats] = await Promise.all([api("/api/v1/measurements"), detectStats()]);
  state.rows = rows;
  state.hasStats = hasStats;
  setupSubject();
  setupCohort();
  $("footer").textContent = `${state.subjects.length} subjects · ${rows.length} measurements · ` +
    `as of ${new Date().toLocaleString()}`;
  document.body.dataset.ready = "1";
}

/* ---- completeness grid ------------------------------------------------------------ */

function visitColumns() {
  const days = new Map();
  for (const s of state.subjects) for (const v of s.states) {
    if (!days.has(v.visit)) days.set(v.visit, []);
    days.get(v.visit).push(v.days_since_baseline);
  }
  const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  return [...days.keys()].sort((a, b) => median(days.get(a)) - median(days.get(b)) || a.localeCompare(b));
}

function renderGrid() {
  const labels = visitColumns();
  const head = el("tr", {}, el("th", { scope: "col" }, "Subject"), el("th", { scope: "col" }, "Regions"),
    el("th", { scope: "col" }, "Group"), ...labels.map((l) => el("th", { scope: "col" }, l)));
  const body = state.subjects.map((s) => {
    const cells = labels.map((l) => {
      const vs = s.states.filter((v) => v.visit === l);
      if (!vs.length) return el("td", { class: "state state-none" }, "no visit");
      const v = vs[vs.length - 1];
      return el("td", { class: "state " + stateClass(v.state), title: `${s.subject}, ${l}: ${v.state}` },
        el("span", { class: "label" }, v.state + (vs.length > 1 ? ` (${vs.length} studies)` : "")),
        el("span", { class: "days" }, `month ${fmt(months(v.days_since_baseline), 1)}`));
    });
    return el("tr", { "data-subject": s.subject },
      el("th", { scope: "row" }, el("button", { type: "button", class: "subject-link",
        onclick: () => selectSubject(s.subject) }, s.subject)),
      el("td", {}, (s.regions || []).join(", ") || "–"), el("td", { class: "group" }, s.group || "–"), ...cells);
  });
  $("grid").replaceChildren(el("table", { class: "grid" }, el("thead", {}, head), el("tbody", {}, ...body)));
  $("legend").replaceChildren(...STATES.map((st) => el("li", { class: stateClass(st) }, st)));
}

/* ---- one subject's trajectories ----------------------------------------------------- */

function setupSubject() {
  const pick = $("subject-pick");
  pick.replaceChildren(...state.subjects.map((s) => el("option", { value: s.subject }, s.subject)));
  pick.onchange = () => selectSubject(pick.value);
  $("subject-roi").onchange = () => renderTrajectories();
  if (state.subjects.length) selectSubject(state.subjects[0].subject);
}

async function selectSubject(code) {
  state.subject = code;
  $("subject-pick").value = code;
  $("subject-title").textContent = code;
  for (const tr of document.querySelectorAll("#grid tbody tr")) {
    tr.classList.toggle("selected", tr.dataset.subject === code);
  }
  const timeline = await api("/api/v1/subjects/" + encodeURIComponent(code));
  if (state.subject !== code) return;   // another subject was chosen meanwhile
  state.timeline = timeline;
  const rois = uniq(timeline.visits.flatMap((v) => v.measurements.map((m) => m.roi || ""))).sort();
  const roiPick = $("subject-roi");
  const keep = roiPick.value;
  roiPick.replaceChildren(...rois.map((r) => el("option", { value: r }, r || "whole leg")),
    ...(rois.length > 1 ? [el("option", { value: "*" }, "all")] : []));
  roiPick.value = [...rois, "*"].includes(keep) ? keep : "";
  renderTrajectories();
}

function renderTrajectories() {
  const roi = $("subject-roi").value;
  const points = [];
  for (const v of state.timeline.visits) for (const m of v.measurements) {
    if (roi === "*" || (m.roi || "") === roi) points.push({ ...m, visit: v.visit, days: v.days_since_baseline });
  }
  const box = $("trajectories");
  for (const div of box.querySelectorAll(".js-plotly-plot")) Plotly.purge(div);
  box.replaceChildren();
  const metrics = uniq(points.map((p) => p.metric));
  if (!metrics.length) { box.append(el("p", { class: "hint" }, "No measurements yet for this subject.")); return; }
  for (const metric of metrics) {
    const div = el("div", { class: "plot trajectory", "data-metric": metric });
    box.append(div);
    const mine = points.filter((p) => p.metric === metric);
    const unit = unitText(mine[0].unit);
    const lines = new Map();
    for (const p of mine) {
      const key = lineName(p) + (p.roi ? ` (${p.source})` : "");
      if (!lines.has(key)) lines.set(key, []);
      lines.get(key).push(p);
    }
    const traces = [], notes = [];
    const colours = new Map();   // one colour per region and ROI; the side is the dash
    for (const [key, ps] of lines) {
      ps.sort((a, b) => a.days - b.days);
      const where = `${ps[0].region}/${ps[0].roi || ""}/${ps[0].source}`;
      if (!colours.has(where)) colours.set(where, PALETTE[colours.size % PALETTE.length]);
      const colour = colours.get(where);
      traces.push({
        type: "scatter", mode: "lines+markers", name: key, cliponaxis: false, x: ps.map((p) => months(p.days)), y: ps.map((p) => p.value),
        line: { color: colour, width: 3, dash: ps[0].side === "left" ? "dash" : "solid" },
        marker: { size: ps.map((p, k) => (k === 0 ? 14 : 9)), symbol: ps.map((p, k) => (k === 0 ? "diamond" : "circle")),
                  color: colour },
        customdata: ps.map((p) => [p.visit, p.change_from_baseline, p.annualised_change]),
        hovertemplate: `${key}<br>%{customdata[0]} (month %{x})<br>%{y:.2f} ${unit}` +
          "<br>change since baseline: %{customdata[1]:+.2f}<extra></extra>",
      });
      const last = ps[ps.length - 1];
      if (ps.length > 1 && last.change_from_baseline !== null && lines.size <= 8) {
        const rate = last.annualised_change === null ? "" : ` (${signed(last.annualised_change)}/yr)`;
        notes.push({ x: months(last.days), y: last.value, text: `Δ ${signed(last.change_from_baseline)} ${unit}${rate}`,
                     showarrow: true, arrowhead: 0, arrowcolor: colour, ax: 40, ay: notes.length % 2 ? 24 : -24, xanchor: "left",
                     font: { color: colour, size: 14 }, bgcolor: "rgba(255,255,255,0.85)" });
      }
    }
    Plotly.newPlot(div, traces, {
      title: { text: `${metricName(metric)}${unit ? " (" + unit + ")" : ""}`, x: 0.01, xanchor: "left" }, font: FONT,
      margin: { l: 70, r: 30, t: 50, b: 100 }, hovermode: "closest",
      xaxis: { title: { text: "months since baseline", standoff: 8 }, zeroline: false, rangemode: "tozero" },
      yaxis: { title: { text: unit } },
      legend: { orientation: "h", y: -0.38, yanchor: "top" },
      shapes: [{ type: "line", xref: "x", yref: "paper", x0: 0, x1: 0, y0: 0, y1: 1,
                 line: { color: "#555", width: 1, dash: "dot" } }],
      annotations: [{ x: 0, y: 1, xref: "x", yref: "paper", text: "baseline", showarrow: false, xanchor: "left",
                      yanchor: "bottom", font: { size: 13, color: "#555" } }, ...notes],
    }, PLOT_CONFIG);
  }
}

/* ---- the cohort ---------------------------------------------------------------------- */

function fillSelect(id, values, label, prefer) {
  const pick = $(id);
  const keep = pick.value;
  pick.replaceChildren(...values.map((v) => el("option", { value: v }, label ? label(v) : v)));
  pick.value = values.includes(keep) ? keep : values.includes(prefer) ? prefer : values[0] || "";
}

function cohortRows() {
  const m = $("cohort-metric").value, g = $("cohort-region").value, r = $("cohort-roi").value, s = $("cohort-side").value;
  const grp = $("cohort-group").value;
  return state.rows.filter((x) => x.metric === m && x.region === g && (x.roi || "") === r && x.side === s &&
                                  (!grp || x.group === grp));
}

function setupCohort() {
  const refill = () => {
    const rows = state.rows;
    fillSelect("cohort-metric", uniq(rows.map((x) => x.metric)).sort(), metricName, "ff_percent");
    const m = rows.filter((x) => x.metric === $("cohort-metric").value);
    fillSelect("cohort-region", uniq(m.map((x) => x.region)).sort());
    const g = m.filter((x) => x.region === $("cohort-region").value);
    fillSelect("cohort-roi", uniq(g.map((x) => x.roi || "")).sort(), (v) => v || "whole leg", "");
    const r = g.filter((x) => (x.roi || "") === $("cohort-roi").value);
    fillSelect("cohort-side", uniq(r.map((x) => x.side)).sort(), null, "right");
    /* every list, plot and statistic can be split by group (trial arm, fast or slow progressors) */
    fillSelect("cohort-group", [""].concat(uniq(rows.map((x) => x.group).filter((x) => x)).sort()),
               (v) => v || "all subjects", "");
    renderCohort();
  };
  for (const id of ["cohort-metric", "cohort-region", "cohort-roi", "cohort-side", "cohort-group"]) $(id).onchange = refill;
  $("score").onchange = () => loadCorrelation();
  refill();
}

function renderCohort() {
  const rows = cohortRows();
  const div = $("cohort-plot");
  if (!rows.length) { Plotly.purge(div); div.replaceChildren(el("p", { class: "hint" }, "No values.")); return; }
  const unit = unitText(rows[0].unit);
  const traces = [];
  for (const subject of uniq(rows.map((x) => x.subject))) {
    const ps = rows.filter((x) => x.subject === subject).sort((a, b) => a.days_since_baseline - b.days_since_baseline);
    traces.push({ type: "scatter", mode: "lines+markers", name: subject, showlegend: false,
                  x: ps.map((p) => p.months_since_baseline), y: ps.map((p) => p.value),
                  line: { color: "rgba(0,114,178,0.55)", width: 1.5 }, marker: { size: 6, color: "rgba(0,114,178,0.7)" },
                  hovertemplate: `${subject}<br>%{x} months: %{y:.2f} ${unit}<extra></extra>` });
  }
  const byVisit = new Map();
  for (const x of rows) {
    if (!byVisit.has(x.visit)) byVisit.set(x.visit, []);
    byVisit.get(x.visit).push(x);
  }
  const summary = [...byVisit.entries()].map(([visit, xs]) => {
    const vals = xs.map((x) => x.value);
    const mean = vals.reduce((a, b) => a + b, 0) / vals.length;
    const sd = vals.length > 1 ? Math.sqrt(vals.reduce((a, b) => a + (b - mean) ** 2, 0) / (vals.length - 1)) : 0;
    const month = xs.reduce((a, x) => a + x.months_since_baseline, 0) / xs.length;
    return { visit, mean, sd, n: vals.length, month };
  }).sort((a, b) => a.month - b.month);
  const xs = summary.map((s) => s.month);
  traces.push({ type: "scatter", mode: "lines", x: xs, y: summary.map((s) => s.mean + s.sd), line: { width: 0 },
                hoverinfo: "skip", showlegend: false });
  traces.push({ type: "scatter", mode: "lines", x: xs, y: summary.map((s) => s.mean - s.sd), line: { width: 0 },
                fill: "tonexty", fillcolor: "rgba(213,94,0,0.22)", name: "± SD", hoverinfo: "skip" });
  traces.push({ type: "scatter", mode: "lines+markers", name: "mean", x: xs, y: summary.map((s) => s.mean),
                line: { color: "#D55E00", width: 3 }, marker: { size: 10, color: "#D55E00", symbol: "square" },
                customdata: summary.map((s) => [s.visit, s.sd, s.n]),
                hovertemplate: `%{customdata[0]}: mean %{y:.2f} ± %{customdata[1]:.2f} ${unit} (n = %{customdata[2]})<extra></extra>` });
  const what = [$("cohort-region").value, $("cohort-roi").value || "whole leg", $("cohort-side").value,
                $("cohort-group").value || "all subjects"].join(" · ");
  Plotly.react(div, traces, {
    title: { text: `${metricName($("cohort-metric").value)}${unit ? " (" + unit + ")" : ""}: ${what}`, x: 0.01,
             xanchor: "left" }, font: FONT,
    margin: { l: 70, r: 30, t: 50, b: 100 }, hovermode: "closest",
    xaxis: { title: { text: "months since baseline", standoff: 8 }, rangemode: "tozero", zeroline: false,
             tickvals: xs, ticktext: summary.map((s) => `${s.visit}`) },
    yaxis: { title: { text: unit } }, legend: { orientation: "h", y: -0.3, yanchor: "top" },
  }, PLOT_CONFIG);
  loadStats();
}

function statsQuery(extra) {
  const q = new URLSearchParams({ metric: $("cohort-metric").value, region: $("cohort-region").value,
                                  roi: $("cohort-roi").value, side: $("cohort-side").value, ...(extra || {}) });
  if ($("cohort-group").value) q.set("group", $("cohort-group").value);
  return "/api/v1/stats?" + q.toString();
}

function fieldList(obj, fields) {
  return el("dl", {}, ...fields.filter((f) => f in obj).flatMap((f) => {
    const v = obj[f];
    const text = Array.isArray(v) ? "[" + v.map((x) => fmt(x)).join(", ") + "]" : fmt(v);
    return [el("dt", {}, f), el("dd", { "data-field": f }, text)];
  }));
}

async function loadStats() {
  const box = $("stats");
  $("correlation-section").hidden = !state.hasStats;
  if (!state.hasStats) { box.textContent = "not available"; return; }
  try {
    const stats = await api(statsQuery());
    box.replaceChildren(fieldList(stats, STATS_FIELDS));
  } catch (e) {
    box.textContent = "not available";
  }
  loadCorrelation();
}

async function loadCorrelation() {
  const score = $("score").value.trim();
  const panel = $("correlation-panel"), box = $("correlation"), div = $("correlation-plot");
  let stats = null;
  if (state.hasStats && score) {
    try { stats = await api(statsQuery({ score })); } catch (e) { stats = null; }
  }
  /* the panel only where the stats endpoint answers a correlation for this score */
  panel.hidden = !(stats && "correlation" in stats);
  $("correlation-hint").hidden = !panel.hidden;
  if (panel.hidden) return;
  const c = stats.correlation;
  box.replaceChildren(typeof c === "object" && c !== null ? fieldList(c, Object.keys(c).filter((k) => !["pairs", "points", "left_out"].includes(k)))
    : fieldList({ correlation: c }, ["correlation"]));
  const pts = (c && (c.pairs || c.points)) || [];
  if (pts.length) {
    Plotly.react(div, [{ type: "scatter", mode: "markers", x: pts.map((p) => p.mri_change), y: pts.map((p) => p.score_change ?? p.clinical_change),
                         text: pts.map((p) => p.subject || ""), marker: { size: 11, color: "#0072B2" },
                         hovertemplate: "%{text}<br>MRI %{x:.2f}, clinical %{y:.2f}<extra></extra>" }], {
      font: FONT, margin: { l: 70, r: 30, t: 30, b: 70 }, hovermode: "closest",
      xaxis: { title: { text: `change in ${metricName($("cohort-metric").value)}` } },
      yaxis: { title: { text: `change in ${score}` } },
    }, PLOT_CONFIG);
  } else {
    Plotly.purge(div);
  }
}

/* ---- wiring ------------------------------------------------------------------------- */

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin("Signed out.");
  });
  window.addEventListener("beforeprint", () => {
    for (const div of document.querySelectorAll(".js-plotly-plot")) Plotly.Plots.resize(div);
  });
  start().catch((e) => showSignin(String(e.message || e)));
});
