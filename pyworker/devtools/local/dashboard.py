"""The local autoscaler's web page: each worker's state and charts of its load and perf.

One self-contained page (inline CSS, JS and canvas; nothing fetched from elsewhere) that polls
`/fleet` every second. Worker-supplied text (urls, error messages) is only ever set through
`textContent`, so a hostile report cannot inject markup.
"""

from __future__ import annotations

FLEET_PATH = "/fleet"

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pyworker local autoscaler</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.2em; margin: 0 0 .5em; }
table { border-collapse: collapse; margin: 1em 0; background: #fff; }
th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.ready { color: #137333; font-weight: 600; }
.loading { color: #b06000; font-weight: 600; }
.errored { color: #c5221f; font-weight: 600; }
.stale, .draining { color: #777; font-weight: 600; }
.chart { display: inline-block; margin: 0 1em 1em 0; padding: .5em; background: #fff;
         border: 1px solid #ddd; vertical-align: top; }
.chart h2 { font-size: 1em; margin: 0 0 .3em; }
.legend span { margin-right: 1em; }
#status { color: #777; }
</style>
</head>
<body>
<h1>pyworker local autoscaler</h1>
<div id="summary"></div>
<table>
<thead><tr>
<th>id</th><th>state</th><th>url</th><th>load</th><th>max perf</th><th>util</th>
<th>working</th><th>routed</th><th>finished</th><th>failed</th><th>last report</th><th>error</th>
</tr></thead>
<tbody id="workers"></tbody>
</table>
<div id="charts"></div>
<p id="status">connecting...</p>
<script>
"use strict";
const FLEET_URL = "__FLEET_PATH__?history=300";
const SERIES = [
  ["cur_load", "load in progress", "#1a73e8"],
  ["max_perf", "max perf", "#137333"],
  ["cur_perf", "served since last report", "#e37400"],
];

function number(value) {
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toFixed(2);
}

function addCell(row, text, className) {
  const cell = document.createElement("td");
  cell.textContent = text;
  if (className) cell.className = className;
  row.appendChild(cell);
}

function failures(finished) {
  let count = 0;
  for (const [status, n] of Object.entries(finished)) if (status !== "Success") count += n;
  return count;
}

function renderTable(fleet) {
  const body = document.getElementById("workers");
  const rows = [];
  for (const worker of fleet.workers) {
    const row = document.createElement("tr");
    const done = Object.values(worker.finished).reduce((a, b) => a + b, 0);
    const util = worker.max_perf > 0
      ? (100 * worker.cur_load / worker.max_perf).toFixed(0) + "%" : "-";
    addCell(row, String(worker.id));
    addCell(row, worker.state, worker.state);
    addCell(row, worker.url || "-");
    addCell(row, number(worker.cur_load), "number");
    addCell(row, number(worker.max_perf), "number");
    addCell(row, util, "number");
    addCell(row, String(worker.num_requests_working), "number");
    addCell(row, String(worker.routed), "number");
    addCell(row, String(done), "number");
    addCell(row, String(failures(worker.finished)), "number");
    addCell(row, number(worker.seconds_since_report) + " s ago", "number");
    addCell(row, worker.error_msg || "");
    rows.push(row);
  }
  body.replaceChildren(...rows);
  const counts = Object.entries(fleet.counts).map(([state, n]) => n + " " + state).join(", ");
  document.getElementById("summary").textContent = fleet.workers.length + " workers ("
    + counts + "); " + fleet.finished.total + " requests finished";
}

function chartBox(id) {
  let box = document.getElementById("chart-" + id);
  if (box) return box;
  box = document.createElement("div");
  box.className = "chart";
  box.id = "chart-" + id;
  const title = document.createElement("h2");
  title.textContent = "worker " + id;
  const canvas = document.createElement("canvas");
  canvas.width = 480;
  canvas.height = 160;
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [, label, color] of SERIES) {
    const item = document.createElement("span");
    item.textContent = "\u25a0 " + label;
    item.style.color = color;
    legend.appendChild(item);
  }
  box.append(title, canvas, legend);
  document.getElementById("charts").appendChild(box);
  return box;
}

function draw(canvas, history) {
  const context = canvas.getContext("2d");
  const width = canvas.width, height = canvas.height, pad = 24;
  context.clearRect(0, 0, width, height);
  context.fillStyle = "#777";
  context.font = "11px system-ui, sans-serif";
  const times = history.time;
  if (times.length < 2) {
    context.fillText("waiting for reports", pad, height / 2);
    return;
  }
  let top = 1;
  for (const [field] of SERIES) for (const value of history[field]) top = Math.max(top, value);
  const start = times[0], span = Math.max(times[times.length - 1] - start, 1);
  context.strokeStyle = "#ddd";
  context.strokeRect(pad, pad / 2, width - 2 * pad, height - 1.5 * pad);
  context.fillText(number(top), 2, pad / 2 + 10);
  context.fillText("0", 2, height - pad);
  context.fillText(span.toFixed(0) + " s", width - pad - 20, height - 6);
  for (const [field, , color] of SERIES) {
    context.strokeStyle = color;
    context.beginPath();
    history[field].forEach((value, index) => {
      const x = pad + (times[index] - start) / span * (width - 2 * pad);
      const y = height - pad - value / top * (height - 2 * pad);
      if (index === 0) context.moveTo(x, y); else context.lineTo(x, y);
    });
    context.stroke();
  }
}

function renderCharts(fleet) {
  const wanted = new Set();
  for (const worker of fleet.workers) {
    const box = chartBox(worker.id);
    wanted.add(box.id);
    draw(box.querySelector("canvas"), worker.history);
  }
  for (const box of Array.from(document.getElementById("charts").children)) {
    if (!wanted.has(box.id)) box.remove();
  }
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch(FLEET_URL, { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const fleet = await response.json();
    renderTable(fleet);
    renderCharts(fleet);
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    status.textContent = "cannot reach the autoscaler: " + error.message;
  } finally {
    setTimeout(refresh, 1000);
  }
}

refresh();
</script>
</body>
</html>
""".replace("__FLEET_PATH__", FLEET_PATH)
