// The demo page: collects the prompt, photos, targets and settings, sends them to
// POST /customize and shows the images and masks, or the API's error message.
// Plain browser JavaScript, no build step. The page validates nothing itself: the API does.
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
    card.append(image, select, remove);
    return card;
  }));
}

function render() { renderWords(); renderSubjects(); }

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
    subjects: state.subjects.map((s) => ({ image: s.dataUrl.split(",")[1] || "", target: s.target })),
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

async function submit(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("submit").disabled = true;
  $("status").textContent = "generating…";
  const body = requestBody();
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  try {
    const reply = await fetch("/customize", { method: "POST", headers, body: JSON.stringify(body) });
    const data = await reply.json().catch(() => null);
    if (!reply.ok) {
      showError(data && data.error ? data.error.message : `${reply.status} ${reply.statusText}`);
      return;
    }
    showResult(data, body.subjects.map((s) => s.target));
  } catch (error) {
    showError(`the service could not be reached: ${error.message}`);
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
