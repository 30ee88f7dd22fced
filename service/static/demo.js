// The demo page: collects the prompt, photos, targets and settings, queues them with POST /jobs,
// follows the job's live progress (GET /jobs/{id}/events?previews=true: queue position, step k/N,
// ETA, the current preview and subject masks) and shows the images and masks, or the API's error
// message. Plain browser JavaScript, no build step. The page validates nothing itself: the API does.
"use strict";

const state = { subjects: [], selected: 0 };
const $ = (id) => document.getElementById(id);

// Words of the prompt, and two-word phrases, in order of appearance, each once.
function promptPhrases(prompt) {
  const words = prompt.toLowerCase().match(/[\p{L}\p{N}'-]+/gu) || [];
  const pairs = words.slice(1).map((word, i) => `${words[i]} ${word}`);
  return { words: [...new Set(words)], phrases: [...new Set([...words, ...pairs])] };
}

function renderWords() {
  const { words } = promptPhrases($("prompt").value);
  const targets = new Set(state.subjects.map((s) => s.target));
  $("prompt-words").replaceChildren(...words.map((word) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = targets.has(word) ? "chip target" : "chip";
    chip.textContent = word;
    chip.addEventListener("click", () => setTarget(state.selected, word));
    return chip;
  }));
}

function renderSubjects() {
  const { phrases } = promptPhrases($("prompt").value);
  $("subjects").replaceChildren(...state.subjects.map((subject, index) => {
    const card = document.createElement("div");
    card.className = index === state.selected ? "subject selected" : "subject";
    card.addEventListener("click", () => { state.selected = index; renderSubjects(); });
    const image = document.createElement("img");
    image.src = subject.dataUrl;
    image.alt = subject.name;
    const select = document.createElement("select");
    select.setAttribute("aria-label", `target word for ${subject.name}`);
    const options = ["", ...phrases];
    if (subject.target && !options.includes(subject.target)) options.push(subject.target);
    select.replaceChildren(...options.map((phrase) => {
      const option = document.createElement("option");
      option.value = phrase;
      option.textContent = phrase || "— target word —";
      return option;
    }));
    select.value = subject.target;
    select.addEventListener("change", () => setTarget(index, select.value));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "remove";
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      state.subjects.splice(index, 1);
      state.selected = 0;
      render();
    });
    const keep = document.createElement("label");
    keep.className = "keep";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = Boolean(subject.subjectId);
    box.disabled = Boolean(subject.subjectId);
    box.addEventListener("click", (event) => event.stopPropagation());
    box.addEventListener("change", () => keepSubject(subject));
    keep.append(box, " keep this subject");
    card.append(image, select, keep, remove);
    return card;
  }));
}

// Subjects kept with POST /subjects: {id, name, thumb, expires_at} in localStorage, by id.
const SAVED_KEY = "realcustom.subjects";

function savedSubjects() {
  const now = Date.now() / 1000;
  const saved = JSON.parse(localStorage.getItem(SAVED_KEY) || "[]");
  return saved.filter((entry) => entry.expires_at > now);
}

function storeSaved(saved) { localStorage.setItem(SAVED_KEY, JSON.stringify(saved)); }

// A small JPEG of the photo for the list (localStorage holds a few MB).
function thumbnail(dataUrl) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => {
      const canvas = document.createElement("canvas");
      const scale = 150 / Math.max(image.width, image.height);
      canvas.width = Math.max(1, Math.round(image.width * scale));
      canvas.height = Math.max(1, Math.round(image.height * scale));
      canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.8));
    };
    image.onerror = () => resolve(dataUrl);
    image.src = dataUrl;
  });
}

async function keepSubject(subject) {
  $("error").hidden = true;
  const headers = { "Content-Type": "application/json", ...authHeaders() };
  const body = JSON.stringify({ image: subject.dataUrl.split(",")[1] || "" });
  try {
    const reply = await fetch("/subjects", { method: "POST", headers, body });
    if (!reply.ok) {
      showError(await errorMessage(reply));
      renderSubjects();
      return;
    }
    const stored = await reply.json();
    subject.subjectId = stored.id;
    const entry = { id: stored.id, name: subject.name, thumb: await thumbnail(subject.dataUrl), expires_at: stored.expires_at };
    storeSaved([entry, ...savedSubjects().filter((other) => other.id !== stored.id)]);
  } catch (error) {
    showError(`the subject could not be saved: ${error.message}`);
  }
  render();
}

function renderSaved() {
  $("saved-subjects").replaceChildren(...savedSubjects().map((entry) => {
    const card = document.createElement("div");
    card.className = "saved-subject";
    card.title = `use ${entry.name} (${entry.id})`;
    card.addEventListener("click", () => {
      state.subjects.push({ name: entry.name, dataUrl: entry.thumb, target: "", subjectId: entry.id });
      state.selected = state.subjects.length - 1;
      render();
    });
    const image = document.createElement("img");
    image.src = entry.thumb;
    image.alt = `saved subject ${entry.name}`;
    const forget = document.createElement("button");
    forget.type = "button";
    forget.textContent = "forget";
    forget.addEventListener("click", async (event) => {
      event.stopPropagation();
      // Deleted on the server too; a 404 (expired, another key) only means it is gone already.
      await fetch(`/subjects/${entry.id}`, { method: "DELETE", headers: authHeaders() }).catch(() => null);
      storeSaved(savedSubjects().filter((other) => other.id !== entry.id));
      renderSaved();
    });
    card.append(image, forget);
    return card;
  }));
}

function render() { renderWords(); renderSubjects(); renderSaved(); }

function setTarget(index, target) {
  if (!state.subjects[index]) return;
  state.subjects[index].target = target;
  render();
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addPhotos(files) {
  for (const file of files) {
    state.subjects.push({ name: file.name, dataUrl: await readFile(file), target: "" });
  }
  state.selected = state.subjects.length - 1;
  $("photos").value = "";
  render();
}

// An empty field is sent as null, so the API (not the page) says what is missing.
function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    subjects: state.subjects.map((s) => (s.subjectId
      ? { subject_id: s.subjectId, target: s.target }
      : { image: s.dataUrl.split(",")[1] || "", target: s.target })),
    width: number("width"),
    height: number("height"),
    num_inference_steps: number("steps"),
    guidance_scale: number("guidance"),
    mask_scope: number("mask-scope"),
    mask_reused_step: number("mask-reused-step"),
    num_images: number("num-images"),
    output_format: "png",
    return_masks: true,
  };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  return body;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function figure(src, className, caption) {
  const fig = document.createElement("figure");
  const image = document.createElement("img");
  image.src = src;
  image.className = className;
  image.alt = caption;
  const label = document.createElement("figcaption");
  label.textContent = caption;
  fig.append(image, label);
  return fig;
}

function showResult(result, targets) {
  const rows = result.images.map((image, k) => {
    const row = document.createElement("div");
    row.className = "result";
    row.append(figure(`data:image/png;base64,${image}`, "output", `image ${k + 1}`));
    (result.masks || []).slice(k * targets.length, (k + 1) * targets.length).forEach((mask, s) => {
      row.append(figure(`data:image/png;base64,${mask}`, "mask", `mask: ${targets[s]}`));
    });
    return row;
  });
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = `seed ${result.seed} · inference ${result.timings.inference.toFixed(2)} s · ` +
    `total ${result.timings.total.toFixed(2)} s · id ${result.id}`;
  $("results").replaceChildren(meta, ...rows);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(reply) {
  const data = await reply.json().catch(() => null);
  return data && data.error ? data.error.message : `${reply.status} ${reply.statusText}`;
}

// One block of a text/event-stream: {name, data, id}, or null for a comment or `retry:` block.
function parseEvent(block) {
  const fields = {};
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    fields[line.slice(0, colon)] = line.slice(colon + 1).trimStart();
  }
  return fields.event ? { name: fields.event, data: JSON.parse(fields.data), id: fields.id } : null;
}

// Reads the job's event stream until its final event (onEvent returns true for it). fetch, not
// EventSource: EventSource cannot send the API key. Like EventSource, it reconnects after a dropped
// or time-limited stream and resumes after the last event seen (Last-Event-ID).
async function followJob(id, onEvent) {
  let lastId = null;
  for (let quiet = 0; quiet < 5; quiet++) {
    const headers = lastId ? { ...authHeaders(), "Last-Event-ID": lastId } : authHeaders();
    const reply = await fetch(`/jobs/${id}/events?previews=true`, { headers });
    if (!reply.ok) throw new Error(await errorMessage(reply));
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (!event) continue;
        quiet = 0;
        if (event.id) lastId = event.id;
        if (onEvent(event)) return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  throw new Error("the progress stream closed repeatedly; see GET /jobs/" + id);
}

function showProgress(event, targets) {
  const { data } = event;
  $("progress").hidden = false;
  if (event.name === "queued") {
    $("progress-text").textContent = `queued: ${data.position} job(s) ahead`;
    return;
  }
  $("progress-bar").value = data.step / data.steps;
  const eta = data.eta_s === null ? "" : ` · ETA ${data.eta_s.toFixed(1)} s`;
  $("progress-text").textContent = `step ${data.step}/${data.steps}${eta}`;
  if (data.preview) $("live-preview").replaceChildren(figure(data.preview, "preview", "preview"));
  if (data.masks) {
    $("live-masks").replaceChildren(...data.masks.map((mask, s) => figure(mask, "mask", `mask: ${targets[s]}`)));
  }
}

async function submit(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("progress").hidden = true;
  $("submit").disabled = true;
  $("status").textContent = "generating…";
  const body = requestBody();
  const targets = body.subjects.map((s) => s.target);
  const headers = { "Content-Type": "application/json", ...authHeaders() };
  try {
    const reply = await fetch("/jobs", { method: "POST", headers, body: JSON.stringify(body) });
    if (!reply.ok) {
      showError(await errorMessage(reply));
      return;
    }
    const { id } = await reply.json();
    $("results").replaceChildren();
    $("live-preview").replaceChildren();
    $("live-masks").replaceChildren();
    $("progress-bar").value = 0;
    let final = null;
    await followJob(id, (event) => {
      if (event.name === "queued" || event.name === "progress") {
        showProgress(event, targets);
        return false;
      }
      final = event;
      return true;
    });
    if (final.name !== "done") {
      showError(final.data.error);
      return;
    }
    $("progress-bar").value = 1;
    $("progress-text").textContent = "done";
    const job = await fetch(final.data.url, { headers: authHeaders() });
    if (!job.ok) {
      showError(await errorMessage(job));
      return;
    }
    showResult((await job.json()).result, targets);
  } catch (error) {
    // fetch fails with a TypeError when the service cannot be reached; other errors carry its message.
    showError(error instanceof TypeError ? `the service could not be reached: ${error.message}` : error.message);
  } finally {
    $("submit").disabled = false;
    $("status").textContent = "";
  }
}

async function loadLimits() {
  const reply = await fetch("/demo/config.json");
  if (!reply.ok) return;
  const limits = await reply.json();
  for (const id of ["width", "height"]) {
    $(id).min = limits.min_side;
    $(id).max = limits.max_side;
  }
  $("steps").max = limits.max_steps;
  $("num-images").max = limits.max_num_images;
  $("api-key-label").hidden = !limits.api_key_required;
}

document.addEventListener("DOMContentLoaded", () => {
  $("prompt").addEventListener("input", render);
  $("photos").addEventListener("change", (event) => addPhotos([...event.target.files]));
  $("demo-form").addEventListener("submit", submit);
  loadLimits();
  render();
});
