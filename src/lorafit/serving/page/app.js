// The page's logic: calls POST /predict (text-embeddings-inference's schema) with the classifier picked
// (its "model" field; GET /v1/models lists them) and shows what comes back.
"use strict";

const $ = (id) => document.getElementById(id);
let maxClientBatch = 64;
let labels = [];
let pairColumns = null;  // a pair classifier's two training columns; null: it classifies single texts
let multiLabel = false;  // any number of labels per text: each decided by its own threshold
let thresholds = {};  // label -> the probability that decides it (the run's, fitted on validation)

function apiKey() { return sessionStorage.getItem("lorafit-api-key") || ""; }

function explain(status, body) {
  const said = body && body.error ? body.error : "";
  switch (status) {
    case 401: $("key-row").hidden = false; return "This server needs an API key: enter it above and try again.";
    case 404: return "Not served here (was it removed?): " + said;
    case 413: return "Too large: " + said;
    case 422: return "The request was refused: " + said;
    case 429: return "The server is busy (its queue is full): try again in a moment.";
    case 500: return "The server failed on this request (" + said + ").";
    case 503: return "The model is not ready: " + said;
    default: return "Unexpected answer from the server (HTTP " + status + ")" + (said ? ": " + said : ".");
  }
}

async function call(path, payload) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  let response;
  try {
    response = await fetch(path, payload === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(payload) });
  } catch (e) {
    throw new Error("Cannot reach the server: is `lorafit serve` still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error(explain(response.status, body));
  return body;
}

function showError(id, message) { $(id).textContent = message; $(id).hidden = !message; }

function model() { return $("model").value; }

async function loadModels() {
  const models = (await call("/v1/models")).data.map((m) => m.id);
  const picked = models.includes(model()) ? model() : models[0];
  $("model").replaceChildren(...models.map((id) => new Option(id, id, false, id === picked)));
  $("model-row").hidden = models.length < 2;
}

async function loadInfo() {
  try {
    await loadModels();
    const info = await call("/info?model=" + encodeURIComponent(model()));
    labels = info.labels;
    multiLabel = info.problem_type === "multi_label_classification";
    thresholds = info.thresholds || {};
    maxClientBatch = info.max_client_batch_size;
    showPairs(info.text_pair ? info.text_pair.columns : null);
    const base = info.base_model.model + (info.base_model.random_init ? " (random weights)" : "");
    const decides = multiLabel ? ["every label whose probability reaches its threshold"]
      : Object.entries(thresholds).map(([k, t]) => `${k} when P(${k}) ≥ ${t.toFixed(3)}`);
    $("model-info").textContent = `Classifier ${info.model_id} on ${base}: classes ${labels.join(", ")}; ` +
      `up to ${info.max_input_length} tokens a message; lorafit ${info.version}.` +
      (info.temperature && info.temperature !== 1 ? ` Calibrated (temperature ${info.temperature.toFixed(3)}).` : "") +
      (decides.length ? ` Decides ${decides.join(", ")}.` : "");
    $("key-row").hidden = !apiKey();
  } catch (e) {
    $("model-info").textContent = e.message;
  }
}

// A pair classifier reads two texts: a second box, and batches of first<TAB>second lines or two CSV columns.
function showPairs(columns) {
  pairColumns = columns;
  $("pair-row").hidden = !columns;
  $("one-title").textContent = columns ? "Classify a pair of texts" : "Classify a message";
  $("text").placeholder = columns ? `First text (${columns[0]})` : "Type or paste a message";
  if (columns) $("pair-label").textContent = `Second text (${columns[1]})`;
  $("many-hint").textContent = columns
    ? `One pair per line (first and second text separated by a tab), or a .csv file (its ${columns.join(" and ")} columns, else the first two).`
    : "One message per line, or a .txt (one per line) or .csv file (its text column, else the first).";
}

function oneInput() { return pairColumns ? [$("text").value, $("text-pair").value] : $("text").value; }

// Multi-label: a label's threshold (0.5 where the run has none) and whether its probability reaches it.
function threshold(label) { return label in thresholds ? thresholds[label] : 0.5; }
function passes(p) { return p.score >= threshold(p.label); }

// What was decided: the top class, or (multi-label) every label over its threshold, "(none)" when none is.
function decided(predictions) {
  if (!multiLabel) return predictions[0].label;
  const over = new Set(predictions.filter(passes).map((p) => p.label));
  const chosen = labels.filter((k) => over.has(k));  // in the run's label order, as lorafit predict gives them
  return chosen.length ? chosen.join(" | ") : "(none)";
}

function renderBars(predictions) {
  const bars = $("bars");
  bars.replaceChildren();
  bars.classList.toggle("multi", multiLabel);
  predictions.forEach((p, i) => {
    const row = document.createElement("div");
    row.className = "bar-row" + ((multiLabel ? passes(p) : i === 0) ? " top" : "");
    row.dataset.label = p.label;
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = p.label;
    const track = document.createElement("div");
    track.className = "bar-track";
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = (100 * p.score).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = (100 * p.score).toFixed(1) + " %";
    row.append(name, track, value);
    if (multiLabel) {  // the threshold as a tick on the bar, and the verdict in words
      const t = threshold(p.label);
      const tick = document.createElement("div");
      tick.className = "bar-threshold";
      tick.style.left = (100 * t).toFixed(1) + "%";
      track.appendChild(tick);
      const verdict = document.createElement("span");
      verdict.className = "bar-verdict";
      verdict.textContent = (passes(p) ? "✓ ≥ " : "✗ < ") + (100 * t).toFixed(1) + " %";
      row.dataset.passes = String(passes(p));
      row.append(verdict);
    }
    bars.appendChild(row);
  });
}

async function classifyOne() {
  const text = oneInput();
  showError("error", "");
  $("result").hidden = true;
  $("classify").disabled = true;
  const t0 = performance.now();
  try {
    const predictions = await call("/predict", { inputs: text, model: model() });
    $("latency").textContent = `answered in ${(performance.now() - t0).toFixed(0)} ms`;
    $("label-name").textContent = multiLabel ? "Labels" : "Label";
    $("label").textContent = decided(predictions);
    renderBars(predictions);
    $("result").hidden = false;
    if (multiLabel) {  // POST /explain explains one softmax's log-odds: not a multi-label classifier's
      $("tokens").replaceChildren();
      $("why-status").textContent = "Token explanations are for single-label classifiers.";
    } else await explainOne(text);
  } catch (e) {
    $("latency").textContent = "";
    showError("error", e.message);
  } finally {
    $("classify").disabled = false;
  }
}

// Each token on a background green (towards the decided class) or red (away), deeper for larger attributions.
function renderTokens(explanation) {
  const scale = Math.max(...explanation.tokens.map((t) => Math.abs(t.attribution)), 1e-12);
  $("tokens").replaceChildren(...explanation.tokens.map((t) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = t.token;
    span.dataset.attribution = String(t.attribution);
    span.title = `${t.attribution >= 0 ? "+" : ""}${t.attribution.toFixed(3)} towards ${explanation.label}`;
    const alpha = (0.85 * Math.abs(t.attribution) / scale).toFixed(3);
    span.style.backgroundColor = t.attribution >= 0 ? `rgba(26, 150, 65, ${alpha})` : `rgba(215, 48, 39, ${alpha})`;
    return span;
  }));
}

async function explainOne(text) {
  $("why-status").textContent = "Explaining…";
  $("tokens").replaceChildren();
  try {
    const explanation = await call("/explain", { inputs: text, model: model() });
    renderTokens(explanation);
    $("why-status").textContent = `Why ${explanation.label}: green tokens push towards it, red away. ` +
      `Method: ${explanation.method}.`;
  } catch (e) {
    $("why-status").textContent = "No explanation: " + e.message;
  }
}

// CSV: quoted fields with "" escapes, commas and newlines inside quotes (RFC 4180).
function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); rows.push(row); row = []; field = "";
    } else field += c;
  }
  if (field || row.length) { row.push(field); rows.push(row); }
  return rows;
}

function textsOfFile(name, content) {
  if (!name.toLowerCase().endsWith(".csv")) return content.split(/\r?\n/);
  const rows = parseCsv(content).filter((r) => r.some((f) => f.trim()));
  if (!rows.length) return [];
  const head = rows[0].map((h) => h.trim().toLowerCase());
  if (pairColumns) {  // the run's two columns, else the first two; one tab-joined line per pair
    const cols = pairColumns.map((c) => head.indexOf(c.toLowerCase()));
    const named = cols.every((k) => k >= 0);
    return (named ? rows.slice(1) : rows).map((r) => named ? cols.map((k) => r[k] || "") : [r[0] || "", r[1] || ""])
      .map((p) => p.map((t) => t.replace(/[\t\r\n]+/g, " ")).join("\t"));
  }
  const col = head.indexOf("text");
  return col >= 0 ? rows.slice(1).map((r) => r[col] || "") : rows.map((r) => r[0]);
}

// A batch line as the request's input: a pair model's first<TAB>second as [first, second].
function inputOfLine(line) {
  if (!pairColumns) return line;
  const at = line.indexOf("\t");
  return at < 0 ? [line, ""] : [line.slice(0, at), line.slice(at + 1)];
}

function csvField(s) { return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }

function renderTable(texts, results) {
  const classes = results.length ? results[0].map((p) => p.label).sort() : labels;
  const head = $("batch-head");
  head.replaceChildren();
  const textCols = pairColumns ? ["text", "text_pair"] : ["text"];
  for (const h of ["#", ...(pairColumns || ["text"]), "label", ...classes.map((c) => "P(" + c + ")")]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  const body = $("batch-body");
  body.replaceChildren();
  const lines = [[...textCols, "label", ...classes.map((c) => "p_" + c)].map(csvField).join(",")];
  results.forEach((preds, i) => {
    const score = Object.fromEntries(preds.map((p) => [p.label, p.score]));
    const tr = document.createElement("tr");
    const shown = [].concat(inputOfLine(texts[i]));
    const cells = [String(i + 1), ...shown, decided(preds), ...classes.map((c) => score[c].toFixed(4))];
    cells.forEach((v, k) => {
      const td = document.createElement("td");
      td.textContent = v;
      if (k === 0 || k > shown.length + 1) td.className = "num";
      tr.appendChild(td);
    });
    body.appendChild(tr);
    lines.push([...shown, decided(preds), ...classes.map((c) => String(score[c]))].map(csvField).join(","));
  });
  $("batch-table").hidden = false;
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.hidden = false;
}

async function classifyMany(fromFile) {
  showError("batch-error", "");
  const texts = (Array.isArray(fromFile) ? fromFile : $("batch-text").value.split(/\r?\n/)).filter((t) => t.trim());
  if (!texts.length) { showError("batch-error", "Nothing to classify: paste messages (one a line) or choose a file."); return; }
  $("classify-batch").disabled = true;
  const results = [];
  const t0 = performance.now();
  try {
    for (let i = 0; i < texts.length; i += maxClientBatch) {
      $("batch-status").textContent = `${i} of ${texts.length}…`;
      const inputs = texts.slice(i, i + maxClientBatch).map(inputOfLine);
      // a pair model's batch is a list of [first, second] lists (text-embeddings-inference's shape)
      results.push(...await call("/predict", { inputs, model: model() }));
    }
    $("batch-status").textContent = `${texts.length} messages in ${(performance.now() - t0).toFixed(0)} ms`;
    renderTable(texts, results);
  } catch (e) {
    $("batch-status").textContent = "";
    showError("batch-error", e.message);
  } finally {
    $("classify-batch").disabled = false;
  }
}

function readFile() {
  const file = $("file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const texts = textsOfFile(file.name, String(reader.result)).filter((t) => t.trim());
    $("batch-text").value = texts.join("\n");
    classifyMany(texts);
  };
  reader.onerror = () => showError("batch-error", "Could not read " + file.name + ".");
  reader.readAsText(file);
}

$("model").addEventListener("change", () => {
  $("result").hidden = true;
  $("batch-table").hidden = true;
  $("download").hidden = true;
  loadInfo();
});
$("classify").addEventListener("click", classifyOne);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classifyOne(); });
$("classify-batch").addEventListener("click", () => classifyMany());
$("file").addEventListener("change", readFile);
$("save-key").addEventListener("click", () => { sessionStorage.setItem("lorafit-api-key", $("api-key").value.trim()); loadInfo(); });
loadInfo();
