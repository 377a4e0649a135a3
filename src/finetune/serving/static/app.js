// finetune serve's page: shows the model, sends each dropped or chosen photo to POST /predict (one request per
// photo, a few at a time) and draws its top classes as bars. Text from files and the model is only ever set
// with textContent, never parsed as HTML.
"use strict";

const IN_FLIGHT = 4; // photos sent at once
const TRIES = 4; // a photo answered 503 (server busy) is sent again after its Retry-After, up to this many times
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("finetune-token") || "";
let topK = 5;
const queue = [];
let running = 0;

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function pct(p) {
  return (p * 100).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function loadModel() {
  const r = await fetch("/model", { headers: headers() });
  if (r.status === 401) {
    $("model").textContent = "this server needs a token";
    $("token-form").hidden = false;
    return;
  }
  const m = await r.json();
  if (!r.ok) {
    $("model").textContent = "error: " + (m.error || r.statusText);
    return;
  }
  $("token-form").hidden = true;
  topK = Math.min(5, m.num_classes);
  const parts = [m.name, m.arch + (m.int8 ? " (int8)" : ""), m.num_classes + " classes"];
  if (m.val_accuracy !== null && m.val_accuracy !== undefined) parts.push("val accuracy " + pct(m.val_accuracy));
  if (m.base_weights) parts.push("base weights " + m.base_weights);
  parts.push("runtime " + m.runtime);
  $("model").textContent = parts.join(" · ");
  $("classes-summary").textContent = m.num_classes + " classes";
  const list = $("classes");
  list.replaceChildren(...m.classes.map((c) => el("li", null, c)));
  $("classes-box").hidden = false;
}

function addCard(file) {
  const card = el("li", "card pending");
  card.dataset.file = file.name;
  const img = el("img", "thumb");
  img.alt = "";
  img.addEventListener("error", () => img.classList.add("broken")); // not something the browser can show either
  img.src = URL.createObjectURL(file);
  const body = el("div", "body");
  body.append(el("p", "name", file.name), el("p", "state", "waiting…"));
  card.append(img, body);
  $("results").prepend(card);
  return card;
}

function showPredictions(card, predictions) {
  const bars = el("ol", "bars");
  for (const p of predictions) {
    const row = el("li", "bar");
    const fill = el("span", "fill");
    fill.style.width = (p.probability * 100).toFixed(1) + "%";
    row.append(el("span", "label", p["class"]), el("span", "track"), el("span", "value", pct(p.probability)));
    row.querySelector(".track").append(fill);
    bars.append(row);
  }
  card.dataset.top = predictions[0]["class"];
  card.querySelector(".state").replaceWith(el("p", "top-class", predictions[0]["class"]));
  card.querySelector(".body").append(bars);
  card.classList.remove("pending");
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("failed");
  card.querySelector(".state").textContent = message;
}

async function classify(file, card, attempt = 1) {
  card.querySelector(".state").textContent = "classifying…";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("/predict?top_k=" + topK, { method: "POST", body: form, headers: headers() });
    const answer = await r.json().catch(() => ({ error: r.status + " " + r.statusText }));
    if (r.status === 401) {
      $("token-form").hidden = false;
      showError(card, "needs a token (above); drop the photo again after entering it");
    } else if (r.status === 503 && attempt < TRIES) {
      const seconds = Math.min(30, Math.max(1, Number(r.headers.get("Retry-After")) || 1));
      card.querySelector(".state").textContent = "server busy: trying again in " + seconds + " s";
      await new Promise((resume) => setTimeout(resume, seconds * 1000));
      return classify(file, card, attempt + 1);
    } else if (!r.ok) {
      showError(card, answer.error || r.statusText);
    } else if (answer[0].error) {
      showError(card, answer[0].error);
    } else {
      showPredictions(card, answer[0].predictions);
    }
  } catch (e) {
    showError(card, "the server did not answer (" + e.message + ")");
  }
}

function pump() {
  while (running < IN_FLIGHT && queue.length) {
    const [file, card] = queue.shift();
    running += 1;
    classify(file, card).finally(() => {
      running -= 1;
      updateStatus();
      pump();
    });
  }
  updateStatus();
}

function updateStatus() {
  const waiting = queue.length + running;
  $("status").textContent = waiting ? waiting + " photo(s) to go" : "";
}

function add(files) {
  for (const f of files) queue.push([f, addCard(f)]);
  pump();
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => {
    add(e.target.files);
    e.target.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.remove("over");
    });
  }
  drop.addEventListener("drop", (e) => add(e.dataTransfer.files));
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("finetune-token", token);
    loadModel();
  });
  loadModel();
}

setUp();
