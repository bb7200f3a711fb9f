"use strict";
const $ = (id) => document.getElementById(id);
const ui = {config: null, session: null, state: null, item: null, conflict: null, skeleton: true, pending: 0, actions: 0};
window.labeling = ui;  // for tests and the curious: current item, pending requests, skeleton flag
let chain = Promise.resolve();

// Every call names this page load's session: its image, skips and undo are its own.
async function api(method, url, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(Object.assign({session: ui.session}, body));
  }
  const r = await fetch(url, opts);
  const data = await r.json();
  if (!r.ok) { const e = new Error(data.error || ("HTTP " + r.status)); e.data = data; throw e; }
  return data;
}

// Key presses are queued and run one after another, so fast typing labels the image
// that was on screen when the previous action finished, never the same image twice.
function enqueue(fn) {
  ui.pending++;
  chain = chain.then(fn).catch((e) => { $("msg").textContent = e.message; })
    .finally(() => { ui.pending--; ui.actions++; });
}

function show(state) {
  ui.state = state; ui.item = state.item; ui.conflict = null;
  $("conflict").style.display = "none";
  $("title").textContent = "Round " + state.round + " · " + state.labeler;
  $("prog").max = Math.max(1, state.total); $("prog").value = state.labeled;
  $("progress").textContent = state.labeled + " / " + state.total + " labeled · " + state.skipped + " skipped · " +
    Object.entries(state.counts).map(([k, v]) => k + " " + v).join(", ");
  const it = state.item;
  document.body.dataset.imageId = it ? String(it.image_id) : "";
  $("done").style.display = it ? "none" : "block";
  $("wrap").style.display = it ? "block" : "none";
  if (!it) { $("image-id").textContent = "–"; return; }
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

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  const i = ["1", "2", "3"].indexOf(k);
  if (i >= 0) label(ui.config.classes[i]);
  else if (k === "z") undo();
  else if (k === "s") skip();
  else if (k === "k") toggle();
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
window.addEventListener("resize", drawSkeleton);

enqueue(async () => {
  ui.config = await api("GET", "/api/config");
  const state = await api("POST", "/api/session", {});
  ui.session = state.session; show(state);
});
