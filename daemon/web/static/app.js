// magdr-guard operator page: plain JS, no build step. Every value from the daemon reaches the
// page through textContent or a URL component, never as markup (a stream id is any text).
"use strict";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const COLOURS = { ok: "#2e7d32", bad: "#c62828", none: "#757575" };
const FACE_LINES = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e",
                    "#37474f"];
const PICTURES = [["input", "input crop"], ["output_before", "G on the input"],
                  ["purified", "purified input"], ["output", "G after"],
                  ["regions", "flagged regions"]];

let selected = null;        // the stream shown in the live view
let shownFrames = -1;       // its frame count when its details were last drawn
let refreshing = false;
let detailsAt = 0;          // when they were last fetched (performance.now())
let frameSeq = null;        // the verdict whose frame the live view shows or loads
let frameLoading = false;
const DETAILS_EVERY_MS = 1000;

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return r.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function num(x, digits = 4) {  // a score with `digits` significant digits
  return x === null || x === undefined ? "—" : Number(x).toPrecision(digits);
}

function rate(x) {
  return Number(x).toFixed(1);
}

function verdictText(v) {
  if (!v) return "—";
  if (v.score === null || v.score === undefined) return `#${v.seq} not scored`;
  return `#${v.seq} ${v.disrupted ? "FLAGGED" : "clean"} S=${num(v.score)}`;
}

function row(cells, onClick) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
  tr.addEventListener("click", onClick);
  return tr;
}

// ---- lists ----------------------------------------------------------------------------------
function renderStreams(streams) {
  const body = $("streams").tBodies[0];
  body.replaceChildren(...streams.map((s) => {
    const share = s.faces ? `${s.flagged} (${(100 * s.flagged / s.faces).toFixed(1)}%)` : "0";
    const v = s.last_verdict;
    const tr = row([[s.id, "name mono"], [s.source], [rate(s.fps_in)], [rate(s.fps)],
                    [s.frames], [s.faces], [share, s.flagged ? "bad" : ""], [s.dropped],
                    [verdictText(v), v && v.disrupted ? "bad" : "ok"]], () => select(s.id));
    tr.dataset.id = s.id;
    if (s.id === selected) tr.classList.add("selected");
    return tr;
  }));
  $("no-streams").hidden = streams.length > 0;
  const mine = streams.find((s) => s.id === selected);
  if (mine) liveUpdate(mine);
}

function renderJobs(jobs) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren(...jobs.map((j) => {
    const s = j.summary || {};
    const tr = row([[j.input, "name mono"], [j.source], [j.state, j.state === "failed" ? "bad" : ""],
                    [j.frames], [s.faces ?? "—"], [s.disrupted_faces ?? "—"]], () => showJob(j));
    const links = document.createElement("td");
    if (j.state === "done") {
      for (const [key, label] of [["media", "video"], ["verdicts", "verdicts"], ["summary", "summary"]]) {
        const a = el("a", label);
        a.href = `api/jobs/${enc(j.name)}/${key}`;
        a.addEventListener("click", (e) => e.stopPropagation());
        links.append(a, " ");
      }
    } else if (j.error) {
      links.textContent = j.error;
    }
    tr.appendChild(links);
    return tr;
  }));
  $("no-jobs").hidden = jobs.length > 0;
}

function showJob(j) {
  $("job").hidden = false;
  $("job-name").textContent = j.input;
  $("job-summary").textContent = JSON.stringify(j.summary || { state: j.state, error: j.error },
                                                null, 2);
}

// ---- one stream -----------------------------------------------------------------------------
function select(id) {
  selected = id;
  shownFrames = -1;
  frameSeq = null;
  history.replaceState(null, "", `#stream=${enc(id)}`);
  $("view").hidden = false;
  $("view-id").textContent = id;
  $("sidebyside").hidden = true;
  for (const tr of $("streams").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
  refreshStream();
}

// The frame follows every event (up to 4 a second), one load at a time so that none is cut
// short by the next; the timeline and the flagged faces follow at most once a second.
function liveUpdate(s) {
  if (s.last_verdict && s.last_verdict.seq !== frameSeq && !frameLoading) showFrame(s);
  if (s.frames !== shownFrames && performance.now() - detailsAt > DETAILS_EVERY_MS) refreshStream();
}

function showFrame(s) {
  const img = $("frame");
  frameLoading = true;
  frameSeq = s.last_verdict.seq;
  $("view-verdict").textContent = verdictText(s.last_verdict);
  img.onload = () => { frameLoading = false; drawBoxes(img, s.last_verdict, s.frame_size); };
  img.onerror = () => { frameLoading = false; };
  img.src = `api/streams/${enc(s.id)}/frame.jpg?seq=${frameSeq}`;
}

async function refreshStream() {
  if (refreshing || selected === null) return;
  refreshing = true;
  const id = selected;
  try {
    const d = await getJson(`api/streams/${enc(id)}`);
    if (id !== selected) return;
    shownFrames = d.frames;
    detailsAt = performance.now();
    $("view-verdict").textContent = verdictText(d.last_verdict);
    if (frameSeq === null && d.last_verdict) showFrame(d);
    drawTimeline(d);
    renderFlagged(d);
  } catch (e) {
    $("view-verdict").textContent = String(e);
  } finally {
    refreshing = false;
  }
}

function drawBoxes(img, v, frameSize) {
  const c = $("boxes");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!v || !frameSize[0]) return;
  const k = img.naturalWidth / frameSize[0];
  g.lineWidth = Math.max(2, c.width / 200);
  for (const f of v.faces || []) {
    g.strokeStyle = f.score === null ? COLOURS.none : f.disrupted ? COLOURS.bad : COLOURS.ok;
    const [x, y, w, h] = f.box.map((z) => z * k);
    g.strokeRect(x, y, w, h);
  }
}

function drawTimeline(d) {
  const c = $("timeline");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const vs = d.verdicts;
  const scores = vs.flatMap((v) => (v.faces || []).map((f) => f.score)).filter((s) => s !== null);
  const thr = vs.length ? vs[vs.length - 1].threshold : null;
  if (!scores.length) {
    $("timeline-legend").textContent = "no scored face yet";
    return;
  }
  let lo = Math.min(...scores), hi = Math.max(...scores);
  const span = Math.max(hi - lo, 1e-6);
  // the threshold widens the range only when it is near the scores (a test profile's is -1e6)
  if (thr !== null && thr > lo - span && thr < hi + span) { lo = Math.min(lo, thr); hi = Math.max(hi, thr); }
  lo -= 0.05 * (hi - lo || 1); hi += 0.05 * (hi - lo || 1);
  const X = (i) => (i + 0.5) * c.width / Math.max(vs.length, 1);
  const Y = (s) => c.height - (s - lo) / (hi - lo) * c.height;
  if (thr !== null) {
    g.strokeStyle = COLOURS.bad; g.setLineDash([6, 4]); g.lineWidth = 1;
    const y = Math.min(c.height - 1, Math.max(1, Y(thr)));
    g.beginPath(); g.moveTo(0, y); g.lineTo(c.width, y); g.stroke(); g.setLineDash([]);
  }
  const faces = Math.max(...vs.map((v) => (v.faces || []).length));
  for (let j = 0; j < faces; j++) {
    g.strokeStyle = g.fillStyle = FACE_LINES[j % FACE_LINES.length]; g.lineWidth = 1.5;
    g.beginPath();
    let pen = false;
    vs.forEach((v, i) => {
      const f = (v.faces || [])[j];
      if (!f || f.score === null) { pen = false; return; }
      pen ? g.lineTo(X(i), Y(f.score)) : g.moveTo(X(i), Y(f.score));
      pen = true;
      if (f.disrupted) g.fillRect(X(i) - 2, Y(f.score) - 2, 4, 4);
    });
    g.stroke();
  }
  $("timeline-legend").textContent =
    `${vs.length} frames, ${faces} face(s) by position; threshold ${num(thr)} (dashed); ` +
    `range ${num(lo)} … ${num(hi)}`;
}

function renderFlagged(d) {
  const box = $("flagged");
  box.replaceChildren(...d.flagged_faces.slice().reverse().map((f) => {
    const b = el("button", `frame ${f.seq} face ${f.face} S=${num(f.score)}`);
    b.dataset.n = f.n;
    b.addEventListener("click", () => showFlagged(d.id, f));
    return b;
  }));
  $("no-flagged").hidden = d.flagged_faces.length > 0;
}

function showFlagged(id, f) {
  $("sidebyside").hidden = false;
  $("sbs-title").textContent =
    `Frame ${f.seq}, face ${f.face}: S_final ${num(f.score)} → ${num(f.score_after)} ` +
    `(threshold ${num(f.threshold)})`;
  $("sbs-pictures").replaceChildren(...PICTURES.map(([kind, label]) => {
    const fig = document.createElement("figure");
    const img = el("img");
    img.alt = label;
    img.dataset.kind = kind;
    img.src = `api/streams/${enc(id)}/flagged/${f.n}/${kind}.jpg`;
    fig.append(img, el("figcaption", label));
    return fig;
  }));
  $("sbs-regions").textContent = f.regions.length ? f.regions.join(", ") : "none";
  $("sbs-chain").replaceChildren(...(f.chain.length ? f.chain : [{ name: "(none)" }]).map((t) =>
    el("li", `${t.name}${t.params ? " " + JSON.stringify(t.params) : ""}` +
             `${t.region ? " on " + (Array.isArray(t.region) ? t.region.join("+") : t.region) : ""}`)));
}

// ---- live updates ---------------------------------------------------------------------------
function connect() {
  const es = new EventSource("api/events");
  es.onopen = () => { $("status").textContent = "live"; $("status").className = "status live"; };
  es.onerror = () => { $("status").textContent = "reconnecting…"; $("status").className = "status down"; };
  es.onmessage = (m) => {
    const data = JSON.parse(m.data);
    renderStreams(data.streams);
    renderJobs(data.jobs);
  };
}

// #stream=<id> opens that stream's view (a link to share, and the view after a reload)
function fromHash() {
  const m = location.hash.match(/^#stream=(.*)$/);
  if (m && decodeURIComponent(m[1]) !== selected) select(decodeURIComponent(m[1]));
}
window.addEventListener("hashchange", fromHash);
fromHash();
connect();
