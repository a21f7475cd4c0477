// eventful-serve camera page: a camera (getUserMedia) or a local video file, streamed as JPEG frames over the
// WebSocket /v1/streams/{id} (at most MAX_IN_FLIGHT unanswered), results drawn over the video, live latency and
// budget graphs, a budget slider (PUT /v1/streams/{id}/budget) and text queries for OWLv2 models (the `queries`
// control message, sent again on every connect). Protocol: docs/protocol.md. Plain JS, no build.
"use strict";

const MAX_IN_FLIGHT = 2;     // frames sent (or being encoded) and not yet answered
const HISTORY_S = 30;        // graphs and latency quantiles cover this many seconds
const KEY_STORAGE = "eventful.apiKey";
const BOX_COLOURS = ["#ff4040", "#40c8ff", "#ffc800", "#78ff78", "#ff78ff"];

// Everything the page knows, in one place (also read by the end-to-end test).
const state = window.eventful = {
  running: false, connected: false, everConnected: false, streamId: null, reconnects: 0, lastError: "",
  sent: 0, results: 0, dropped: 0, errors: 0, inFlight: 0,
  lastResult: null, lastFrameSize: null, drawnResult: null, drawnCaption: "", drawnBoxes: 0, draws: 0,
  numPatches: null, budget: null, history: [],  // history: {t (ms), latency (ms), budget}
  queries: null, queriesAnswer: null, queriesError: "",  // queries: as typed; queriesAnswer: the server's answer
};

const $ = (id) => document.getElementById(id);
const video = $("video"), overlay = $("overlay"), capture = $("capture");

let ws = null, frameIndex = 0, pending = new Map(), sendTimer = null, reconnectTimer = null, backoffMs = 500;
let mediaStream = null;

// ---- API key and REST ------------------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

let keyPrompt = null;  // one prompt at a time; every caller waits on it
function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-message").textContent = message;
    $("key-input").value = "";
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
      dialog.close();
      keyPrompt = null;
      resolve();
    };
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  });
  return keyPrompt;
}

async function api(method, path, body) {
  for (;;) {
    const headers = { "Content-Type": "application/json" };
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (response.status === 401) {
      await askForKey(apiKey() ? "The server refused this API key. Try again:" : "This server needs an API key.");
      continue;
    }
    if (!response.ok) throw new Error(`${method} ${path}: HTTP ${response.status} ${await response.text()}`);
    return response.status === 204 ? null : response.json();
  }
}

// ---- sources ---------------------------------------------------------------------------------------------

async function listCameras() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $("camera-select"), chosen = select.value;
  const cameras = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  select.replaceChildren(new Option("default camera", ""));
  cameras.forEach((d, i) => select.add(new Option(d.label || `camera ${i + 1}`, d.deviceId)));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

function stopMedia() {
  if (mediaStream) mediaStream.getTracks().forEach((t) => t.stop());
  mediaStream = null;
}

async function openSource() {
  stopMedia();
  if ($("source-file").checked) {
    const file = $("file-input").files[0];
    if (!file) throw new Error("choose a video file first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.loop = true;
  } else {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("no camera access here (the page needs https or localhost)");
    }
    const deviceId = $("camera-select").value;
    mediaStream = await navigator.mediaDevices.getUserMedia(
      { video: deviceId ? { deviceId: { exact: deviceId } } : true, audio: false });
    video.removeAttribute("src");
    video.srcObject = mediaStream;
    listCameras();  // labels are known once permission is granted
  }
  video.muted = true;
  await video.play();
}

// ---- streaming -------------------------------------------------------------------------------------------

function streamId() {
  const id = $("stream-id").value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/.test(id)) throw new Error(`invalid stream id: ${id || "(empty)"}`);
  return id;
}

function wsUrl(id) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = apiKey() ? `?token=${encodeURIComponent(apiKey())}` : "";
  return `${scheme}//${location.host}/v1/streams/${encodeURIComponent(id)}${token}`;
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind || ""}`;
}

function connect() {
  clearTimeout(reconnectTimer);
  const socket = new WebSocket(wsUrl(state.streamId));
  ws = socket;
  frameIndex = 0;
  pending = new Map();
  state.inFlight = 0;
  setStatus("connecting...");
  socket.onopen = () => {
    if (ws !== socket) return;
    if (state.everConnected) state.reconnects += 1;
    state.everConnected = true;
    state.connected = true;
    backoffMs = 500;
    setStatus(`streaming ${state.streamId}`, "ok");
    sendQueries();  // (again after a reconnect: a restarted server has lost them)
  };
  socket.onmessage = (event) => { if (ws === socket) onMessage(JSON.parse(event.data)); };
  socket.onclose = async (event) => {
    if (ws !== socket) return;
    state.connected = false;
    ws = null;
    pending.clear();
    state.inFlight = 0;
    if (!state.running) { setStatus("stopped"); return; }
    if (event.code === 1008 && /key/i.test(event.reason)) {
      setStatus("API key needed", "bad");
      await askForKey("The stream needs an API key.");
      if (state.running) connect();
      return;
    }
    state.lastError = `closed ${event.code} ${event.reason}`;
    setStatus(`disconnected (${event.code}${event.reason ? ": " + event.reason : ""}); retrying in ${(backoffMs / 1000).toFixed(1)} s`, "bad");
    reconnectTimer = setTimeout(() => { if (state.running) connect(); }, backoffMs);
    backoffMs = Math.min(5000, backoffMs * 2);
  };
}

function sendFrame() {
  const socket = ws;
  if (!socket || socket.readyState !== WebSocket.OPEN || state.inFlight >= MAX_IN_FLIGHT) return;
  if (video.readyState < 2 || !video.videoWidth) return;
  const maxWidth = Number($("max-width").value) || 640;
  const scale = Math.min(1, maxWidth / video.videoWidth);
  const w = Math.max(2, Math.round(video.videoWidth * scale)), h = Math.max(2, Math.round(video.videoHeight * scale));
  capture.width = w;
  capture.height = h;
  capture.getContext("2d").drawImage(video, 0, 0, w, h);
  state.inFlight += 1;
  capture.toBlob((blob) => {
    if (ws !== socket || socket.readyState !== WebSocket.OPEN || !blob) { if (ws === socket) state.inFlight -= 1; return; }
    const index = frameIndex++;  // the frame index is the position among binary messages of this connection
    pending.set(index, { sentAt: performance.now(), w, h });
    socket.send(blob);
    state.sent += 1;
  }, "image/jpeg", Number($("quality").value) || 0.8);
}

function onMessage(message) {
  if (message.type === "queries") {
    state.queriesAnswer = message.queries;
    state.queriesError = "";
    $("queries-info").textContent = `queries: ${message.queries.join(", ")}`;
    return;
  }
  if (message.type === "error" && message.frame === null) {  // about a control message (the queries)
    state.queriesError = `${message.code}: ${message.message}`;
    $("queries-info").textContent = state.queriesError;
    return;
  }
  if (!["result", "dropped", "error"].includes(message.type) || message.frame === null) return;
  const sent = pending.get(message.frame);
  if (!sent) return;
  pending.delete(message.frame);
  state.inFlight = Math.max(0, state.inFlight - 1);
  const now = performance.now();
  if (message.type === "result") {
    state.results += 1;
    state.lastResult = message;
    state.lastFrameSize = { w: sent.w, h: sent.h };
    state.budget = message.budget;
    state.history.push({ t: now, latency: now - sent.sentAt, budget: message.budget });
  } else if (message.type === "dropped") {
    state.dropped += 1;
  } else {
    state.errors += 1;
    state.lastError = `${message.code}: ${message.message}`;
  }
  while (state.history.length && state.history[0].t < now - HISTORY_S * 1000) state.history.shift();
}

async function start() {
  try {
    state.streamId = streamId();
    await openSource();
    await refreshBudget();
    state.running = true;
    state.everConnected = false;  // a new start is not a reconnect
    $("start").disabled = true;
    $("stop").disabled = false;
    connect();
    clearInterval(sendTimer);
    const fps = Math.min(60, Math.max(1, Number($("fps").value) || 10));
    sendTimer = setInterval(sendFrame, 1000 / fps);
  } catch (err) {
    state.lastError = String(err);
    setStatus(String(err.message || err), "bad");
  }
}

function stop() {
  state.running = false;
  clearInterval(sendTimer);
  clearTimeout(reconnectTimer);
  if (ws) ws.close(1000, "stopped");
  stopMedia();
  video.pause();
  $("start").disabled = false;
  $("stop").disabled = true;
  setStatus("stopped");
}

// ---- text queries (OWLv2) -------------------------------------------------------------------------------

function parseQueries(text) {
  return text.split(",").map((q) => q.trim()).filter((q) => q.length > 0);
}

function setQueries() {
  const queries = parseQueries($("queries").value);
  state.queries = queries.length ? queries : null;
  if (!state.queries) { $("queries-info").textContent = "type queries, comma-separated"; return; }
  if (!sendQueries()) $("queries-info").textContent = `sent when the stream starts: ${queries.join(", ")}`;
}

function sendQueries() {
  if (!state.queries || !ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify({ type: "queries", queries: state.queries }));
  return true;
}

// ---- budget ----------------------------------------------------------------------------------------------

function showBudget(answer) {
  state.numPatches = answer.num_patches;
  const slider = $("budget-slider");
  slider.max = answer.num_patches;
  slider.value = answer.effective_tokens;
  $("budget-value").textContent = answer.effective_tokens;
  $("num-patches").textContent = answer.num_patches;
  $("budget-info").textContent = `${answer.stream_id}: ${answer.effective_tokens} tokens (${answer.source})`;
}

async function refreshBudget() {
  let id;
  try { id = streamId(); } catch (err) { return; }
  showBudget(await api("GET", `/v1/streams/${encodeURIComponent(id)}/budget`));
}

async function putBudget() {
  const tokens = Number($("budget-slider").value);
  try {
    showBudget(await api("PUT", `/v1/streams/${encodeURIComponent(streamId())}/budget`, { tokens }));
  } catch (err) {
    $("budget-info").textContent = String(err.message || err);
  }
}

async function resetBudget() {
  try {
    await api("DELETE", `/v1/streams/${encodeURIComponent(streamId())}/budget`);
  } catch (err) { /* 404: there was no override */ }
  refreshBudget().catch((err) => { $("budget-info").textContent = String(err.message || err); });
}

// ---- drawing ---------------------------------------------------------------------------------------------

function caption(outputs) {
  outputs = outputs || {};
  if (outputs.action) {
    const a = outputs.action;
    return typeof a === "object" ? `action: ${a.label}${typeof a.score === "number" ? " " + a.score.toFixed(2) : ""}` : `action: ${a}`;
  }
  if ("boxes" in outputs) {
    const n = (outputs.boxes || []).length;
    return `${n} detection${n === 1 ? "" : "s"}`;
  }
  const top = (outputs.top || [])[0];
  if (!top) return "";
  const label = String(top.label ?? top.index).split(",")[0];
  return typeof top.score === "number" ? `${label} ${top.score.toFixed(2)}` : label;
}

function boxToCanvas(box, frame, width, height) {
  let [x0, y0, x1, y1] = box.map(Number);
  const normalised = Math.max(Math.abs(x0), Math.abs(y0), Math.abs(x1), Math.abs(y1)) <= 1;
  const sx = normalised ? width : width / frame.w, sy = normalised ? height : height / frame.h;
  return [Math.min(x0, x1) * sx, Math.min(y0, y1) * sy, Math.abs(x1 - x0) * sx, Math.abs(y1 - y0) * sy];
}

function drawOverlay() {
  const w = video.clientWidth, h = video.clientHeight;
  if (overlay.width !== w || overlay.height !== h) { overlay.width = w; overlay.height = h; }
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const result = state.lastResult;
  if (!result || !w || !h) return;
  const outputs = result.outputs || {}, frame = state.lastFrameSize || { w, h };
  const font = Math.max(12, Math.round(h / 22));
  ctx.font = `${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  let boxes = 0;
  (outputs.boxes || []).forEach((det, i) => {
    if (!det || !Array.isArray(det.box) || det.box.length < 4) return;
    const [x, y, bw, bh] = boxToCanvas(det.box, frame, w, h);
    const colour = BOX_COLOURS[i % BOX_COLOURS.length];
    ctx.strokeStyle = colour;
    ctx.lineWidth = Math.max(2, h / 160);
    ctx.strokeRect(x, y, bw, bh);
    const label = `${det.label ?? "?"}${typeof det.score === "number" ? " " + det.score.toFixed(2) : ""}`;
    const ty = Math.max(0, y - font - 2);
    ctx.fillStyle = colour;
    ctx.fillRect(x, ty, ctx.measureText(label).width + 6, font + 4);
    ctx.fillStyle = "#000";
    ctx.fillText(label, x + 3, ty + 2);
    boxes += 1;
  });
  const text = `${caption(outputs)}  [r=${result.budget}${result.dense ? " dense" : ""}]`;
  ctx.fillStyle = "rgba(0, 0, 0, 0.65)";
  ctx.fillRect(0, 0, ctx.measureText(text).width + 12, font + 8);
  ctx.fillStyle = "#fff";
  ctx.fillText(text, 6, 4);
  state.drawnCaption = text;
  state.drawnResult = result;
  state.drawnBoxes = boxes;
  state.draws += 1;
}

function drawGraph(canvas, key, colour, fixedMax) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 28;
  const now = performance.now(), points = state.history.filter((p) => p[key] !== null && p[key] !== undefined);
  ctx.clearRect(0, 0, w, h);
  const max = fixedMax || Math.max(10, ...points.map((p) => p[key])) * 1.15;
  ctx.strokeStyle = "#8886";
  ctx.fillStyle = "#888";
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textBaseline = "middle";
  for (const frac of [0, 0.5, 1]) {
    const y = h - 12 - frac * (h - 20);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(String(Math.round(frac * max)), 2, Math.max(6, y));
  }
  ctx.textBaseline = "alphabetic";
  ctx.fillText(`-${HISTORY_S} s`, pad, h - 10);
  ctx.fillText("now", w - 22, h - 10);
  ctx.strokeStyle = colour;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = pad + (w - pad) * (1 - (now - p.t) / (HISTORY_S * 1000));
    const y = h - 12 - Math.min(1, p[key] / max) * (h - 20);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function updateStats() {
  const now = performance.now();
  const latencies = state.history.map((p) => p.latency).sort((a, b) => a - b);
  const recent = state.history.filter((p) => p.t >= now - 3000).length;
  const last = state.lastResult;
  $("stat-sent").textContent = state.sent;
  $("stat-results").textContent = state.results;
  $("stat-dropped").textContent = state.dropped;
  $("stat-errors").textContent = state.errors;
  $("stat-fps").textContent = state.results ? (recent / 3).toFixed(1) : "-";
  $("stat-latency").textContent = latencies.length
    ? `${quantile(latencies, 0.5).toFixed(0)} / ${quantile(latencies, 0.95).toFixed(0)} ms` : "-";
  $("stat-budget").textContent = last ? last.budget : "-";
  $("stat-updated").textContent = last ? last.updated_fraction.toFixed(2) : "-";
  $("stat-label").textContent = last ? caption(last.outputs) || "-" : "-";
}

let lastSlow = 0;
function render() {
  drawOverlay();
  const now = performance.now();
  if (now - lastSlow > 250) {
    lastSlow = now;
    updateStats();
    drawGraph($("latency-graph"), "latency", "#2b7de9", 0);
    drawGraph($("budget-graph"), "budget", "#e98a2b", state.numPatches || 0);
  }
  requestAnimationFrame(render);
}

// ---- wiring ----------------------------------------------------------------------------------------------

function init() {
  const params = new URLSearchParams(location.search);
  $("stream-id").value = params.get("stream") || `browser-${Math.random().toString(36).slice(2, 7)}`;
  if (params.get("fps")) $("fps").value = params.get("fps");
  if (params.get("width")) $("max-width").value = params.get("width");
  $("start").onclick = start;
  $("stop").onclick = stop;
  $("budget-slider").oninput = () => { $("budget-value").textContent = $("budget-slider").value; };
  $("budget-slider").onchange = putBudget;
  $("budget-reset").onclick = resetBudget;
  $("queries-send").onclick = setQueries;
  $("queries").onkeydown = (event) => { if (event.key === "Enter") setQueries(); };
  if (params.get("queries")) { $("queries").value = params.get("queries"); setQueries(); }
  $("stream-id").onchange = () => refreshBudget().catch(() => {});
  $("file-input").onchange = () => { $("source-file").checked = true; };
  $("camera-select").onchange = () => { $("source-camera").checked = true; if (state.running) openSource().catch((err) => setStatus(String(err), "bad")); };
  listCameras().catch(() => {});
  refreshBudget().catch((err) => { $("budget-info").textContent = String(err.message || err); });
  requestAnimationFrame(render);
  if (params.get("autostart")) start();
}

init();
