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
#alarm { font-weight: bold; }
#alarm.on { color: #b00; }
</style></head>
<body>
<h1>crystalscope</h1>
<p id="model">loading the model…</p>
<div id="drop">Drop crystal images here, or
  <input id="files" type="file" accept="image/*" multiple></div>
<div id="cards"></div>
<section id="trend" hidden><h2>Batch trend</h2><p id="alarm"></p>
  <svg id="chart" width="640" height="200" role="img" aria-label="impurity share per window">
  </svg></section>
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
    if (result.unknown) card.append(text("div", "unknown: unlike the training crystals " +
                                         "(unknown score " + result.unknown_score.toFixed(2) + ")",
                                         "unknown"));
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
async function trend() {
  const state = await api("/monitor");
  document.getElementById("trend").hidden = false;
  const alarm = document.getElementById("alarm");
  alarm.textContent = state.alarm || ("no alarm; " + state.windows.length + " windows");
  alarm.className = state.alarm ? "on" : "";
  const svg = document.getElementById("chart"), w = 640, h = 200;
  const points = state.windows.filter(x => x.fraction !== null).map((x, i, all) =>
    (i * (w - 20) / Math.max(1, all.length - 1) + 10) + "," + (h - 10 - x.fraction * (h - 20)));
  svg.innerHTML = '<polyline fill="none" stroke="darkorange" stroke-width="2" points="' +
                  points.join(" ") + '"></polyline>';
}
api("/model").then(m => {
  info = m;
  document.getElementById("model").textContent = "classes: " + m.classes.join(", ") +
    " · input " + m.input_size + " px · " + m.backend;
  if (m.monitoring) { trend(); setInterval(trend, 2000); }
}).catch(e => { document.getElementById("model").textContent = e.message; });
</script></body></html>
"""
