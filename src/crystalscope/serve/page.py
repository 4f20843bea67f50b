"""The dashboard: one self-contained page (no build step, nothing loaded from elsewhere)."""

DASHBOARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crystalscope</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; }
#drop.over { background: #eef5ff; }
#cards { display: flex; flex-wrap: wrap; gap: 1rem; margin-top: 1rem; }
.card { width: 220px; border: 1px solid #ccc; border-radius: 6px; padding: .5rem;
        font-size: .85rem; }
.card img { width: 100%; height: 160px; object-fit: contain; background: #111; }
.similar img { width: 48px; height: 48px; object-fit: cover; margin: 2px; }
.error { color: #b00; }
.unknown { color: #a60; font-weight: bold; }
#status { padding: .6rem .8rem; border-radius: 6px; background: #e8f5e9; }
#status.alarm { background: #b00020; color: white; font-weight: bold; font-size: 1.1rem; }
#status.unknown-particles { background: #fff3cd; }
#status.degraded { background: #ddd; color: #333; font-weight: bold; }
#examples img { width: 72px; height: 72px; object-fit: cover; margin: .3rem .3rem 0 0;
                border: 2px solid white; }
#promise, #legend { font-size: .8rem; color: #555; }
#chart { background: #fafafa; border: 1px solid #ddd; }
</style></head>
<body>
<h1>crystalscope</h1>
<p id="model">loading the model…</p>
<div id="drop">Drop crystal images here, or
  <input id="files" type="file" accept="image/*" multiple></div>
<div id="cards"></div>
<section id="trend" hidden><h2>Batch trend</h2>
  <div id="status" role="status" aria-live="assertive"><span id="status-text"></span>
    <div id="examples"></div></div>
  <p id="promise"></p>
  <svg id="chart" width="720" height="240" role="img" aria-label="impurity share per window">
  </svg>
  <p id="legend"><span style="color:darkorange">&#9632;</span> impurity share with its 95%
    interval &nbsp; <span style="color:#777">- - -</span> clean up to (no alarm below) &nbsp;
    <span style="color:purple">&#9632;</span> unknown share &nbsp;
    <span style="color:#b00">|</span> alarm</p></section>
<script>
const token = new URLSearchParams(location.search).get("token");
const headers = token ? {"Authorization": "Bearer " + token} : {};
let info = {};
async function api(path, options = {}) {
  const response = await fetch(path, {...options, headers: {...headers}});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
function text(tag, content, cls) {
  const e = document.createElement(tag); e.textContent = content;
  if (cls) e.className = cls; return e;
}
async function classify(file) {
  const card = document.createElement("div"); card.className = "card";
  const img = document.createElement("img"); img.src = URL.createObjectURL(file);
  card.append(img, text("div", file.name));
  document.getElementById("cards").prepend(card);
  const form = new FormData(); form.append("files", file);
  try {
    const result = (await api("/predict", {method: "POST", body: form})).results[0];
    card.append(text("div", result.predicted_class + " (probability " +
                     result.probability_of_predicted.toFixed(4) + ")", "prediction"));
    const why = {empty: "no particle in the window", blurred: "out of focus",
                 saturated: "saturated", novel: "unlike the training crystals"};
    if (result.unknown) card.append(text("div", "unknown: " +
                                         (why[result.unknown_reason] || why.novel) +
                                         " (unknown score " + result.unknown_score.toFixed(2) +
                                         ")", "unknown"));
    if (info.store) {
      const query = new FormData(); query.append("file", file); query.append("k", "5");
      const similar = await api("/similar", {method: "POST", body: query});
      const box = text("div", "similar: ", "similar");
      for (const n of similar.neighbours) {
        const t = document.createElement("img"); t.title = n.path + " (" +
          n.distance.toFixed(3) + ", " + n.predicted + ")";
        if (n.thumbnail) t.src = n.thumbnail; box.append(t);
      }
      card.append(box);
    }
  } catch (error) { card.append(text("div", error.message, "error")); }
}
function handle(files) { for (const f of files) classify(f); }
const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
                                     handle(e.dataTransfer.files); });
document.getElementById("files").addEventListener("change", e => handle(e.target.files));
const series = [];  // every window seen so far; each poll fetches only the new ones
async function trend() {
  const since = series.length ? series[series.length - 1].window : 0;
  const state = await api("/monitor?since=" + since);
  series.push(...state.windows);
  document.getElementById("trend").hidden = false;
  const status = document.getElementById("status");
  status.className = state.status.replace(" ", "-");
  document.getElementById("status-text").textContent =
    state.status === "alarm" ? state.reason :  // the alarm's text begins "ALARM at window"
    (state.status === "ok" ? "OK" : state.status.toUpperCase()) + ": " + state.reason;
  const examples = document.getElementById("examples");
  if (examples.childElementCount !== state.examples.length) {
    examples.replaceChildren(...state.examples.map(e => {
      const img = document.createElement("img"); img.src = e.thumbnail; img.title = e.path;
      img.alt = "crop called " + state.positive; return img; }));
  }
  document.getElementById("promise").textContent = "rule: " + state.promise;
  draw(state);
}
async function follow() {  // one poll at a time: no window is fetched twice
  try { await trend(); } catch (error) {
    const status = document.getElementById("status");
    status.className = "degraded";
    document.getElementById("status-text").textContent = "NO CONNECTION: " + error.message;
  }
  setTimeout(follow, 2000);
}
function draw(state) {
  const svg = document.getElementById("chart"), w = 720, h = 240, pad = 30;
  const shown = series.filter(x => x.fraction !== null);
  const top = Math.min(1, Math.max(0.05, state.base_rate * 2,
    ...shown.map(x => x.interval ? x.interval[1] : x.fraction),
    ...series.map(x => x.unknown_fraction || 0)) * 1.1);
  const first = series.length ? series[0].window : 1;
  const last = series.length ? series[series.length - 1].window : 1;
  const X = i => pad + (i - first) * (w - 2 * pad) / Math.max(1, last - first);
  const Y = v => h - pad - v * (h - 2 * pad) / top;
  const line = (points, style) => '<polyline fill="none" ' + style + ' points="' +
    points.map(p => X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ") + '"/>';
  const band = shown.filter(x => x.interval);
  let body = '<line x1="' + pad + '" x2="' + (w - pad) + '" y1="' + Y(0) + '" y2="' + Y(0) +
    '" stroke="#999"/><text x="2" y="' + (pad - 8) + '" font-size="11">' +
    (100 * top).toFixed(1) + '%</text><text x="2" y="' + (h - pad + 4) +
    '" font-size="11">0%</text><text x="' + (w - pad) + '" y="' + (h - 8) +
    '" font-size="11" text-anchor="end">window ' + last + '</text>';
  if (band.length) body += '<polygon id="interval" fill="orange" fill-opacity="0.25" points="' +
    band.map(x => X(x.window).toFixed(1) + "," + Y(x.interval[1]).toFixed(1))
      .concat(band.slice().reverse().map(x => X(x.window).toFixed(1) + "," +
                                           Y(x.interval[0]).toFixed(1))).join(" ") + '"/>';
  body += '<line id="base-rate" x1="' + pad + '" x2="' + (w - pad) + '" y1="' +
    Y(state.base_rate) + '" y2="' + Y(state.base_rate) +
    '" stroke="#777" stroke-dasharray="6 4"/>';
  const unknown = series.filter(x => x.unknown_fraction !== null);
  if (unknown.length) body += line(unknown.map(x => [x.window, x.unknown_fraction]),
                                   'id="unknown" stroke="purple" stroke-width="1.5"');
  body += line(shown.map(x => [x.window, x.fraction]),
               'id="share" stroke="darkorange" stroke-width="2"');
  if (state.alarm_window !== null) body += '<line id="alarm-line" x1="' +
    X(state.alarm_window) + '" x2="' + X(state.alarm_window) + '" y1="' + pad + '" y2="' +
    (h - pad) + '" stroke="#b00" stroke-width="2"/>';
  svg.innerHTML = body;
}
api("/model").then(m => {
  info = m;
  document.getElementById("model").textContent = "classes: " + m.classes.join(", ") +
    " · input " + m.input_size + " px · " + m.backend;
  if (m.monitoring) follow();
}).catch(e => { document.getElementById("model").textContent = e.message; });
</script></body></html>
"""
