"""The labelling page: one crop large, its nearest labelled neighbours, keys and buttons."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crystalscope label</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1rem 2rem; color: #222; }
#main { display: flex; gap: 2rem; align-items: flex-start; }
#crop { width: 420px; height: 420px; object-fit: contain; background: #111;
        image-rendering: pixelated; border: 3px solid #ccc; }
#crop.labelled { border-color: #2a7; }
.neighbours img { width: 96px; height: 96px; object-fit: contain; background: #111; }
.neighbours figure { display: inline-block; margin: 0 .5rem .5rem 0; text-align: center; }
button { font-size: 1rem; margin: .2rem; padding: .4rem .8rem; }
kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3rem; }
#counts span { margin-right: 1rem; }
#note, #unreadable { color: #666; font-size: .9rem; }
#error { color: #b00; }
</style></head><body>
<h1>crystalscope label</h1>
<div id="counts"></div>
<p id="note"></p>
<div id="main">
  <div>
    <img id="crop" alt="the crop to label">
    <p id="name"></p><p id="guess"></p><p id="current"></p>
    <div id="buttons"></div>
    <p>Keys: <kbd>1</kbd>–<kbd>9</kbd> class, <kbd>u</kbd> not sure (skip), <kbd>z</kbd> undo,
       <kbd>&larr;</kbd> <kbd>&rarr;</kbd> back and forward.</p>
    <p id="error"></p>
  </div>
  <div><h3>Nearest labelled crops</h3><div class="neighbours" id="neighbours"></div></div>
</div>
<details id="unreadable"></details>
<script>
const token = new URLSearchParams(location.search).get("token");
const headers = {"Content-Type": "application/json"};
if (token) headers["Authorization"] = "Bearer " + token;
const imageUrl = id => "/api/image/" + id + (token ? "?token=" + encodeURIComponent(token) : "");
let state = null;
let pending = Promise.resolve();  // calls run one after another, in the order of the keys
let ready = false;  // the shown crop's image has loaded and no call is under way

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function call(path, body) {
  ready = false;  // until the answer's crop has loaded: no key labels a crop not yet seen
  pending = pending.then(() => send(path, body)).catch(error => {
    document.getElementById("error").textContent = String(error); markReady(); });
  return pending;
}

function decide(path, body) {  // a decision names the crop the person saw
  if (!ready || !state || !state.crop) return;
  call(path, Object.assign({crop: state.crop.id}, body));
}

function markReady() {
  ready = true;
  document.body.dataset.ready = "1";
}

async function send(path, body) {
  document.body.dataset.ready = "0";
  const response = await fetch(path, body === undefined ? {headers} :
                               {method: "POST", headers, body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) {
    document.getElementById("error").textContent = data.error;
    if (response.status === 409) return send("/api/state");  // show what is current now
    markReady();
    return;
  }
  document.getElementById("error").textContent = "";
  state = data;
  render();
  document.body.dataset.responses = (parseInt(document.body.dataset.responses || "0") + 1);
}

function button(text, action) {
  const b = el("button", text);
  b.onclick = action;
  return b;
}

function render() {
  const counts = document.getElementById("counts");
  counts.replaceChildren(...state.classes.map((c, i) =>
      el("span", (i + 1) + " " + c + ": " + state.counts[c])),
    el("span", "not sure: " + state.skipped), el("span", "left: " + state.left),
    el("span", "of " + state.total));
  document.getElementById("note").textContent = state.order;
  const buttons = document.getElementById("buttons");
  buttons.replaceChildren(
    ...state.classes.map((c, i) => {
      const b = el("button", (i + 1) + " " + c, {"data-class": c});
      b.onclick = () => decide("/api/label", {label: c, input: "button"});
      return b; }),
    button("u not sure", () => decide("/api/skip", {input: "button"})),
    button("z undo", () => ready && call("/api/undo", {input: "button"})),
    button("\\u2190", () => ready && call("/api/move", {step: -1})),
    button("\\u2192", () => ready && call("/api/move", {step: 1})));
  const crop = state.crop, img = document.getElementById("crop");
  if (!crop) {
    img.removeAttribute("src");
    markReady();
    document.getElementById("name").textContent = "All crops are labelled.";
    for (const id of ["guess", "current"]) document.getElementById(id).textContent = "";
    document.getElementById("neighbours").replaceChildren();
  } else {
    const url = new URL(imageUrl(crop.id), location.href).href;
    if (img.src === url && img.complete) markReady();  // the same crop: no new load comes
    else { img.onload = img.onerror = markReady; img.src = url; }
    img.className = crop.label ? "labelled" : "";
    document.getElementById("name").textContent = crop.name;
    document.getElementById("guess").textContent = crop.guess ?
      "model: " + crop.guess.class + " (" + crop.guess.probability.toFixed(2) + ")" : "";
    document.getElementById("current").textContent = crop.label ?
      "labelled " + crop.label + " (press a class to change it)" : "";
    document.getElementById("neighbours").replaceChildren(...crop.neighbours.map(n => {
      const f = el("figure");
      f.append(el("img", undefined, {src: imageUrl(n.id), alt: n.label}),
               el("figcaption", n.label));
      return f; }));
  }
  const unreadable = document.getElementById("unreadable");
  unreadable.replaceChildren(el("summary", state.unreadable.length + " unreadable file(s) skipped"),
                             ...state.unreadable.map(u => el("div", u)));
}

document.addEventListener("keydown", event => {
  if (!state || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.repeat || !ready) {  // a held key, or the next crop not yet on screen
    if (/^[1-9uz]$|^Arrow(Left|Right)$/.test(event.key)) event.preventDefault();
    return;
  }
  const n = parseInt(event.key, 10);
  if (n >= 1 && n <= state.classes.length) {
    decide("/api/label", {label: state.classes[n - 1], input: "keyboard"});
  } else if (event.key === "u") { decide("/api/skip", {input: "keyboard"});
  } else if (event.key === "z") { call("/api/undo", {input: "keyboard"});
  } else if (event.key === "ArrowLeft") { call("/api/move", {step: -1});
  } else if (event.key === "ArrowRight") { call("/api/move", {step: 1});
  } else { return; }
  event.preventDefault();
});
call("/api/state");
</script></body></html>
"""
