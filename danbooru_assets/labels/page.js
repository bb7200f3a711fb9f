"use strict";
const $ = (id) => document.getElementById(id);
const PARAMS = new URLSearchParams(location.search);
const GRID = PARAMS.get("mode") === "grid";
const QUEUE = PARAMS.get("queue") || null;
// A shared page is opened with ?token=…: the server put it in a cookie, so it leaves the address bar.
if (PARAMS.has("token")) { PARAMS.delete("token"); history.replaceState(null, "", "?" + PARAMS.toString()); }
const ui = {config: null, session: null, state: null, item: null, conflict: null, skeleton: true, pending: 0, actions: 0,
  grid: GRID, tiles: [], focus: 0, page: 0, conflicts: null, unsaved: 0, lastInput: Date.now()};
window.labeling = ui;  // for tests and the curious: current item, pending requests, skeleton flag
let chain = Promise.resolve();
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

// "Not saved" banner: a request the server could not store (503: the label store is down)
// or could not reach is sent again until it goes through; key presses wait behind it.
function unsaved(text) {
  const el = $("unsaved");
  el.textContent = text || ""; el.style.display = text ? "block" : "none";
}

// Every call names this page load's session: its image, skips and undo are its own.
async function api(method, url, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(Object.assign({session: ui.session}, body));
  }
  for (let attempt = 1; ; attempt++) {
    let r = null, data = null;
    try {
      r = await fetch(url, opts);
      const text = await r.text();
      try { data = JSON.parse(text); } catch (_) { data = {error: text || ("HTTP " + r.status)}; }
    } catch (e) { r = null; data = {error: "the labeling server cannot be reached (" + e.message + ")"}; }
    if (r && r.status !== 503) {
      if (ui.unsaved) { ui.unsaved = 0; unsaved(""); }
      if (!r.ok) { const e = new Error(data.error || ("HTTP " + r.status)); e.data = data; e.status = r.status; throw e; }
      return data;
    }
    const wait = Math.max(1, Number(r && r.headers.get("Retry-After")) || 2);
    ui.unsaved = attempt;
    unsaved((method === "POST" ? "NOT SAVED — " : "") + data.error + ". Trying again in " + wait + " s (attempt " +
      attempt + "); your keys wait in order.");
    await sleep(wait * 1000);
  }
}

// Key presses are queued and run one after another, so fast typing labels the image
// that was on screen when the previous action finished, never the same image twice.
function enqueue(fn) {
  ui.pending++;
  chain = chain.then(fn).catch((e) => { $("msg").textContent = e.message; })
    .finally(() => { ui.pending--; ui.actions++; });
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? h + " h " + m + " min" : m ? m + " min" : Math.round(s) + " s";
}

// Progress, this tab's count and speed, and the round's ETA at that speed (both modes).
function header(state) {
  $("title").textContent = "Round " + state.round + " · " + state.labeler;
  $("prog").max = Math.max(1, state.total); $("prog").value = state.labeled;
  $("progress").textContent = state.labeled + " / " + state.total + " labeled · " + state.skipped + " skipped · " +
    Object.entries(state.counts).map(([k, v]) => k + " " + v).join(", ");
  if (state.queues && Object.keys(state.queues).length > 1)
    $("progress").textContent += " · " + Object.entries(state.queues).map(([q, c]) => q + " " + c.labeled + "/" + c.total)
      .join(", ") + (state.queue ? " (this tab: " + state.queue + ")" : "");
  const t = state.throughput;
  $("rate").textContent = "this tab: " + t.session_labels + " labels" +
    (t.labels_per_minute ? " · " + t.labels_per_minute + "/min · " + t.seconds_per_label + " s each · round ETA " +
      duration(t.eta_seconds) : "");
}

function show(state) {
  ui.state = state; ui.item = state.item; ui.conflict = null;
  $("conflict").style.display = "none";
  header(state);
  const it = state.item;
  document.body.dataset.imageId = it ? String(it.image_id) : "";
  $("done").style.display = it ? "none" : "block";
  $("done-text").textContent = waitingText(state);
  document.body.dataset.waiting = !it && state.held_elsewhere ? "held" : "";
  if (!it && state.held_elsewhere) poll();
  $("wrap").style.display = it ? "block" : "none";
  $("unskip").style.display = state.skipped ? "inline-block" : "none";
  if (!it) {
    $("image-id").textContent = "–";
    ["relpath", "score", "pred", "probs"].forEach((id) => $(id).replaceChildren());
    return;
  }
  $("image-id").textContent = it.image_id;
  $("relpath").textContent = it.rel_path;
  $("score").textContent = it.portrait_score === null ? "–" : it.portrait_score.toFixed(3);
  $("pred").textContent = it.predicted_class || "–";
  const probs = $("probs"); probs.replaceChildren();
  if (it.probs) for (const c of ui.config.classes) {
    const p = it.probs[c] || 0, row = document.createElement("div"), bar = document.createElement("div");
    row.className = "cls"; row.textContent = c + " " + p.toFixed(2);
    bar.className = "bar"; bar.style.width = Math.round(p * 100) + "%";
    probs.append(row, bar);
  }
  const img = $("img");
  if (img.dataset.src !== it.image_url) { img.dataset.src = it.image_url; img.src = it.image_url; }
  else drawSkeleton();
}

// Show the image as large as the stage allows (small images are scaled up too).
function fit() {
  const img = $("img"), stage = $("stage");
  if (!img.naturalWidth) return;
  const s = Math.min((stage.clientWidth - 16) / img.naturalWidth, (stage.clientHeight - 16) / img.naturalHeight);
  img.style.width = Math.max(1, Math.floor(img.naturalWidth * s)) + "px";
  img.style.height = Math.max(1, Math.floor(img.naturalHeight * s)) + "px";
}

function drawSkeleton() {
  const img = $("img"), cv = $("overlay"), it = ui.item;
  fit();
  cv.width = img.clientWidth; cv.height = img.clientHeight;
  const ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  cv.style.display = ui.skeleton ? "block" : "none";
  document.body.dataset.skeleton = ui.skeleton ? "on" : "off";
  if (!ui.skeleton || !it || !it.keypoints || !img.naturalWidth) return;
  // keypoints are pixels of the image whose size the queue gives (else the served file)
  const sx = cv.width / (it.width || img.naturalWidth), sy = cv.height / (it.height || img.naturalHeight);
  const ok = (p) => p && p[0] !== null && p[1] !== null && (p[2] === null || p[2] > 0);
  ctx.lineWidth = 3;
  ui.config.skeleton.forEach(([a, b], i) => {
    const p = it.keypoints[a], q = it.keypoints[b];
    if (!ok(p) || !ok(q)) return;
    const c = ui.config.colors[i % ui.config.colors.length];
    ctx.strokeStyle = "rgb(" + c.join(",") + ")";
    ctx.beginPath(); ctx.moveTo(p[0] * sx, p[1] * sy); ctx.lineTo(q[0] * sx, q[1] * sy); ctx.stroke();
  });
  ctx.fillStyle = "#fff";
  for (const p of it.keypoints) if (ok(p)) { ctx.beginPath(); ctx.arc(p[0] * sx, p[1] * sy, 3, 0, 7); ctx.fill(); }
}

// A label on an image someone else labeled after this tab showed it is refused (409);
// the page says who and what, and "o" sends it again as a deliberate overwrite.
async function sendLabel(id, cls, overwrite) {
  try {
    show(await api("POST", "/api/label", {image_id: id, label: cls, overwrite}));
  } catch (e) {
    const c = e.data && e.data.conflict;
    if (!c) throw e;
    ui.conflict = c;
    $("conflict-text").textContent = "Image " + c.image_id + " is now " + c.label + " (by " + c.labeler + " " +
      c.where + ").";
    $("conflict-yours").textContent = c.yours;
    $("conflict").style.display = "block";
    $("msg").textContent = e.message;
    return;
  }
  $("last").textContent = (overwrite ? "overwrote " : "labeled ") + id + " " + cls; $("msg").textContent = "";
}
function label(cls) {
  enqueue(async () => { if (ui.item) await sendLabel(ui.item.image_id, cls, false); });
}
function overwrite() {
  enqueue(async () => { const c = ui.conflict; if (c) await sendLabel(c.image_id, c.yours, true); });
}
function keepTheirs() {
  enqueue(async () => {
    if (!ui.conflict) return;
    show(await api("GET", "/api/state?session=" + encodeURIComponent(ui.session)));
    $("msg").textContent = "";
  });
}
function skip() {
  enqueue(async () => {
    if (!ui.item) return;
    const id = ui.item.image_id;
    show(await api("POST", "/api/skip", {image_id: id}));
    $("last").textContent = "skipped " + id; $("msg").textContent = "";
  });
}
function undo() {
  enqueue(async () => {
    const s = await api("POST", "/api/undo", {});
    show(s); $("last").textContent = "undid " + s.retracted.label + " on " + s.retracted.image_id; $("msg").textContent = "";
  });
}
function toggle() { ui.skeleton = !ui.skeleton; drawSkeleton(); }

// Out of images: is the queue done, or is the rest on other tabs' screens (held until they close or go idle)?
function waitingText(state) {
  if (!state.held_elsewhere) return state.skipped ? "Queue done (" + state.skipped + " skipped)." : "Queue done.";
  return "Not done: the rest of the queue (" + state.held_elsewhere + (state.held_elsewhere === 1 ? " image" : " images") +
    ") is on another tab's screen. It comes here when that tab is closed or idle for " +
    duration(ui.config.idle_release_s) + "; this page checks every " + ui.config.poll_s + " s.";
}
let polling = false;
function poll() {
  if (polling) return;
  polling = true;
  setTimeout(() => {
    polling = false;
    enqueue(async () => {
      if (ui.grid) { if (!ui.tiles.length) showGrid(await api("POST", "/api/grid/page", {})); }
      else if (!ui.item) show(await api("GET", "/api/state?session=" + encodeURIComponent(ui.session)));
    });
  }, ui.config.poll_s * 1000);
}

// ---- grid mode: a page of thumbnails pre-set to the prediction; flip the exceptions ----
const CLASS_KEYS = {Digit1: 0, Digit2: 1, Digit3: 2, Numpad1: 0, Numpad2: 1, Numpad3: 2};

function showGrid(state) {
  ui.state = state; ui.conflicts = null;
  $("grid-conflict").style.display = "none";
  header(state);
  $("page-no").textContent = state.page_number || "–";
  $("page-count").textContent = state.tiles.length + " tiles";
  $("grid-done").style.display = state.done ? "block" : "none";
  $("grid-done").textContent = state.done ? waitingText(state) : "";
  document.body.dataset.waiting = state.done && state.held_elsewhere ? "held" : "";
  if (state.done && state.held_elsewhere) poll();
  const keepFocus = ui.page === state.page;
  ui.page = state.page;
  // a tile without a prediction (round 1: no model yet) starts unset: Enter will not store a guess
  ui.tiles = state.tiles.map((t) => Object.assign({}, t, {label: t.preset || t.predicted_class || null}));
  if (!keepFocus) ui.focus = 0;
  ui.focus = Math.min(ui.focus, Math.max(0, ui.tiles.length - 1));
  const grid = $("grid"); grid.replaceChildren();
  ui.tiles.forEach((t, i) => {
    const el = document.createElement("div"), img = document.createElement("img"), cv = document.createElement("canvas"),
      badge = document.createElement("span");
    el.className = "tile"; el.dataset.id = t.image_id; el.dataset.index = i; badge.className = "badge";
    img.alt = String(t.image_id); img.src = t.thumb_url;
    img.addEventListener("load", () => drawTileSkeleton(i));
    el.append(img, cv, badge);
    el.onclick = () => { ui.focus = i; setTile(i, ui.config.classes[(ui.config.classes.indexOf(t.label) + 1) % 3]); };
    grid.append(el); t.el = el;
    paintTile(i);
  });
  fitTiles();
  document.body.dataset.page = String(state.page);
  document.body.dataset.pageNumber = String(state.page_number);
  document.body.dataset.tiles = ui.tiles.map((t) => t.image_id).join(",");
  focusTile(ui.focus);
}

// The whole page fits the window without scrolling (tiles no smaller than 110 px).
function fitTiles() {
  if (!ui.tiles.length) return;
  const rows = Math.ceil(ui.tiles.length / columns()), stage = $("grid-stage");
  const h = Math.max(110, Math.floor((stage.clientHeight - 16 - 8 * (rows - 1)) / rows));
  $("grid").style.setProperty("--tile-h", h + "px");
  ui.tiles.forEach((_, i) => drawTileSkeleton(i));
}

function paintTile(i) {
  const t = ui.tiles[i];
  t.el.dataset.label = t.label || "unset";
  // "changed" only against a prediction; a tile without one is set, not changed
  t.el.classList.toggle("flipped", !!t.label && !!t.predicted_class && t.label !== t.predicted_class);
  t.el.querySelector(".badge").textContent = t.label || "unset";
}

function focusTile(i) {
  if (!ui.tiles.length) { $("grid-focus").textContent = ""; return; }
  ui.focus = Math.max(0, Math.min(ui.tiles.length - 1, i));
  ui.tiles.forEach((t, j) => t.el.classList.toggle("focus", j === ui.focus));
  const t = ui.tiles[ui.focus];
  t.el.scrollIntoView({block: "nearest"});
  const p = t.probs ? " · " + ui.config.classes.map((c) => c + " " + (t.probs[c] || 0).toFixed(2)).join(", ") : "";
  $("grid-focus").textContent = "image " + t.image_id + " · predicted " + (t.predicted_class || "–") + p;
}

function setTile(i, cls) { if (ui.tiles[i]) { ui.tiles[i].label = cls; paintTile(i); } }
function setAll(cls) { ui.tiles.forEach((t, i) => { t.label = cls || t.predicted_class || null; paintTile(i); }); }

// Tiles per row, read from the layout (the grid wraps to the window's width).
function columns() {
  if (ui.tiles.length < 2) return 1;
  const top = ui.tiles[0].el.offsetTop;
  const n = ui.tiles.findIndex((t) => t.el.offsetTop !== top);
  return n < 0 ? ui.tiles.length : n;
}

function drawTileSkeleton(i) {
  const t = ui.tiles[i]; if (!t || !t.el) return;
  const img = t.el.querySelector("img"), cv = t.el.querySelector("canvas");
  cv.width = img.clientWidth; cv.height = img.clientHeight;
  cv.style.left = img.offsetLeft + "px"; cv.style.top = img.offsetTop + "px";
  const ctx = cv.getContext("2d"); ctx.clearRect(0, 0, cv.width, cv.height);
  cv.style.display = ui.skeleton ? "block" : "none";
  // keypoints are pixels of the full image: without its size they cannot be placed on a thumbnail
  if (!ui.skeleton || !t.keypoints || !t.width || !t.height || !img.naturalWidth) return;
  const sx = cv.width / t.width, sy = cv.height / t.height;
  const ok = (p) => p && p[0] !== null && p[1] !== null && (p[2] === null || p[2] > 0);
  ctx.lineWidth = 2;
  ui.config.skeleton.forEach(([a, b], k) => {
    const p = t.keypoints[a], q = t.keypoints[b];
    if (!ok(p) || !ok(q)) return;
    ctx.strokeStyle = "rgb(" + ui.config.colors[k % ui.config.colors.length].join(",") + ")";
    ctx.beginPath(); ctx.moveTo(p[0] * sx, p[1] * sy); ctx.lineTo(q[0] * sx, q[1] * sy); ctx.stroke();
  });
}
function toggleGridSkeleton() {
  ui.skeleton = !ui.skeleton; document.body.dataset.skeleton = ui.skeleton ? "on" : "off";
  ui.tiles.forEach((_, i) => drawTileSkeleton(i));
}

async function confirmPage(overwrite) {
  const tiles = overwrite ? ui.tiles.filter((t) => ui.conflicts && ui.conflicts[t.image_id]) : ui.tiles;
  if (!tiles.length) return;
  const unset = tiles.filter((t) => !t.label);
  if (unset.length) {
    focusTile(ui.tiles.indexOf(unset[0]));
    $("grid-msg").textContent = unset.length + " of " + tiles.length + " tiles are unset (no prediction to start " +
      "from): set them with 1/2/3, or the whole page with shift+1/2/3, then Enter. Nothing was stored.";
    return;
  }
  const labels = {}; tiles.forEach((t) => { labels[t.image_id] = t.label; });
  const predicted = tiles.filter((t) => t.predicted_class);
  const flips = predicted.filter((t) => t.label !== t.predicted_class).length;
  const without = tiles.length - predicted.length;
  try {
    showGrid(await api("POST", "/api/grid/confirm", {page: ui.page, labels, overwrite: !!overwrite}));
  } catch (e) {
    const cs = e.data && e.data.conflicts;
    if (!cs) throw e;
    // the tiles saved are gone from the page; the conflicting ones stay, marked, with their labels
    const by = {}; cs.forEach((c) => { by[c.image_id] = c; });
    const kept = ui.tiles.filter((t) => by[t.image_id]);
    const grid = $("grid"); grid.replaceChildren(...kept.map((t) => t.el));
    ui.tiles = kept; kept.forEach((t, i) => { t.el.dataset.index = i; t.el.classList.add("conflict"); });
    ui.conflicts = by; focusTile(0);
    $("grid-conflict-text").textContent = cs.map((c) => "image " + c.image_id + " is now " + c.label + " (by " +
      c.labeler + " " + c.where + ")").join("\n");
    $("grid-conflict").style.display = "block";
    $("grid-msg").textContent = e.message;
    return;
  }
  $("grid-last").textContent = (overwrite ? "overwrote " : "confirmed ") + tiles.length + " tiles (" +
    (predicted.length ? flips + " of " + predicted.length + " changed from the prediction" : "") +
    (predicted.length && without ? ", " : "") + (without ? without + " without a prediction, set by you" : "") + ")";
  $("grid-msg").textContent = "";
}
function gridUndo() {
  enqueue(async () => {
    const s = await api("POST", "/api/undo", {mode: "grid"});
    ui.page = -1; showGrid(s);
    $("grid-last").textContent = "undid " + s.retracted.images.length + " labels: page " + s.page_number +
      " is back as you sent it";
    $("grid-msg").textContent = "";
  });
}
function gridNext() {
  enqueue(async () => { showGrid(await api("POST", "/api/grid/page", {new: true})); $("grid-msg").textContent = ""; });
}

function gridKey(e) {
  const k = e.key, cols = columns();
  if (k in {ArrowLeft: 1, h: 1}) focusTile(ui.focus - 1);
  else if (k in {ArrowRight: 1, l: 1}) focusTile(ui.focus + 1);
  else if (k in {ArrowUp: 1, k: 1}) focusTile(ui.focus - cols);
  else if (k in {ArrowDown: 1, j: 1}) focusTile(ui.focus + cols);
  else if (e.code in CLASS_KEYS && e.shiftKey) setAll(ui.config.classes[CLASS_KEYS[e.code]]);
  else if (e.code in CLASS_KEYS) setTile(ui.focus, ui.config.classes[CLASS_KEYS[e.code]]);
  else if (k === "p") setAll(null);
  else if (k === "Enter") enqueue(() => confirmPage(false));
  else if (k === "z") gridUndo();
  else if (k === "t") toggleGridSkeleton();
  else if (k === "o" && ui.conflicts) enqueue(() => confirmPage(true));
  else if (k === "n" && ui.conflicts) gridNext();
  else if (k === "g") location.search = modeHref(false);
  else return false;
  return true;
}

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (ui.grid) { if (gridKey(e)) e.preventDefault(); return; }
  const k = e.key.toLowerCase();
  const i = ["1", "2", "3"].indexOf(k);
  if (i >= 0) label(ui.config.classes[i]);
  else if (k === "z") undo();
  else if (k === "s") skip();
  else if (k === "k" || k === "t") toggle();
  else if (k === "g") location.search = modeHref(true);
  else if (k === "o" && ui.conflict) overwrite();
  else if (k === "n" && ui.conflict) keepTheirs();
  else return;
  e.preventDefault();
});
document.querySelectorAll("button[data-label]").forEach((b) => b.onclick = () => label(b.dataset.label));
$("undo").onclick = undo; $("skip").onclick = skip; $("toggle").onclick = toggle;
$("overwrite").onclick = overwrite; $("keep").onclick = keepTheirs;
$("unskip").onclick = () => enqueue(async () => show(await api("POST", "/api/unskip", {})));
$("img").addEventListener("load", drawSkeleton);
window.addEventListener("resize", () => { if (ui.grid) fitTiles(); else drawSkeleton(); });
$("grid-confirm").onclick = () => enqueue(() => confirmPage(false));
$("grid-all-good").onclick = () => setAll("good"); $("grid-all-q").onclick = () => setAll("questionable");
$("grid-all-bad").onclick = () => setAll("bad"); $("grid-pred").onclick = () => setAll(null);
$("grid-undo").onclick = gridUndo; $("grid-toggle").onclick = toggleGridSkeleton;
$("grid-overwrite").onclick = () => enqueue(() => confirmPage(true)); $("grid-keep").onclick = gridNext;
document.body.dataset.mode = ui.grid ? "grid" : "single";
function modeHref(grid) {
  const q = new URLSearchParams(QUEUE ? {queue: QUEUE} : {});
  if (grid) q.set("mode", "grid");
  return "?" + q.toString();
}
$("mode-link").href = modeHref(!ui.grid);
$("mode-link").lastChild.textContent = ui.grid ? " single-image mode" : " grid mode";

// Holding images: the server gives a tab's images to others once it is closed or idle.
// While the labeler works here (a key, a click, the mouse), a heartbeat says so.
["keydown", "mousedown", "mousemove", "wheel", "touchstart"].forEach((k) =>
  document.addEventListener(k, () => { ui.lastInput = Date.now(); }, {passive: true}));
let lastBeat = Date.now();
function heartbeat() {
  if (ui.session && ui.lastInput > lastBeat) {
    lastBeat = Date.now();
    fetch("/api/alive", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({session: ui.session})}).catch(() => {});
  }
}
window.addEventListener("pagehide", () => {
  if (ui.session) navigator.sendBeacon("/api/release",
    new Blob([JSON.stringify({session: ui.session})], {type: "application/json"}));
});
window.addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); });  // its session was released

enqueue(async () => {
  ui.config = await api("GET", "/api/config");
  setInterval(heartbeat, ui.config.heartbeat_s * 1000);
  if (QUEUE) $("queue-link").textContent = "queue: " + QUEUE;
  const state = await api("POST", "/api/session", QUEUE ? {queue: QUEUE} : {});
  ui.session = state.session;
  if (ui.grid) showGrid(await api("POST", "/api/grid/page", {})); else show(state);
});
