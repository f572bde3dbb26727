// kr3's page: complete a review through /v1/completions (streamed), and chart /v1/next_tokens as the prompt is typed.
"use strict";

const $ = (id) => document.getElementById(id);
const SLIDERS = ["temperature", "top_p", "max_tokens"];
const RATING_LABELS = { negative: "부정 (negative)", positive: "긍정 (positive)", ambiguous: "중립 (ambiguous)" };
const CHART_DELAY_MS = 250;  // after the last keystroke: one request per pause, not one per key
const state = { key: sessionStorage.getItem("kr3-key") || "", model: "kr3", running: null, timer: null, asked: 0 };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function call(path, body, signal) {
  const response = await fetch(path, { method: body ? "POST" : "GET", headers: headers(), body: body && JSON.stringify(body), signal });
  if (response.status === 401) $("keyform").hidden = false;
  if (!response.ok) {
    const reply = await response.json().catch(() => null);
    throw new Error(reply?.error?.message || `${response.status} ${response.statusText}`);
  }
  return response;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// a chosen rating, with the guidance that steers towards it (the slider is off while the rating is "any")
function rating() {
  const value = $("rating").value;
  return $("rating-control").hidden || value === "" ? {} : { rating: value, guidance: Number($("guidance").value) };
}

async function connect() {
  try {
    const card = (await (await call("/v1/models")).json()).data[0];
    state.model = card.id;
    const { defaults, limits, ratings, step } = card.kr3;
    $("model").textContent = `${card.id} · step ${step}`;
    $("max_tokens").max = limits.max_tokens;
    for (const name of SLIDERS) $(name).value = defaults[name] ?? $(name).max;  // top_p null: off, i.e. 1
    showRatings(ratings, defaults.guidance);
    SLIDERS.forEach(showValue);
    $("keyform").hidden = true;
    say("");
    chartSoon();
  } catch (e) {
    $("model").textContent = "not connected";
    say(e.message, true);
  }
}

function showRatings(ratings, guidance) {
  $("rating-control").hidden = $("guidance-control").hidden = !ratings;
  const select = $("rating");
  select.replaceChildren(new Option("any", ""));
  for (const name of ratings || []) select.add(new Option(RATING_LABELS[name] || name, name));
  $("guidance").max = Math.max(6, guidance);  // the server's default is always on the slider
  $("guidance").value = guidance;
  showValue("guidance");
  ratingChanged();
}

function ratingChanged() {
  $("guidance").disabled = $("rating").value === "";
  chartSoon();
}

function showValue(name) {
  $(`${name}-value`).textContent = $(name).value;
}

function chartSoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(chart, CHART_DELAY_MS);
}

async function chart() {
  const asked = ++state.asked;
  try {
    const prompt = $("prompt").value;
    const steer = rating();
    const reply = await (await call("/v1/next_tokens", { model: state.model, prompt, k: 10, ...steer })).json();
    if (asked === state.asked) drawChart(reply.tokens, prompt, steer);  // an answer to an older prompt is dropped
  } catch (e) {
    say(e.message, true);
  }
}

function drawChart(tokens, prompt, steer) {
  const top = Math.max(...tokens.map((t) => t.probability), 1e-9);
  $("chart").replaceChildren(...tokens.map((t) => chartRow(t, top)));
  // what these are the next tokens of
  Object.assign($("chart").dataset, { prompt, rating: steer.rating ?? "", guidance: steer.guidance ?? "" });
}

function chartRow(token, top) {
  const row = document.createElement("div");
  row.className = "row";
  row.setAttribute("role", "listitem");
  const label = document.createElement("span");
  label.className = "token";
  label.textContent = token.end_of_review ? "⏎ end" : `"${token.text}"`;
  label.title = token.text;
  const track = document.createElement("div");
  track.className = "track";
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.style.width = `${(100 * token.probability) / top}%`;
  track.append(bar);
  const p = document.createElement("span");
  p.className = "p";
  p.textContent = `${(100 * token.probability).toFixed(1)}%`;
  row.append(label, track, p);
  if (!token.end_of_review) row.addEventListener("click", () => addText(token.text));
  return row;
}

function addText(text) {
  $("prompt").value += text;
  $("prompt").focus();
  chartSoon();
}

async function complete() {
  if (state.running) return;
  const controller = new AbortController();
  state.running = controller;
  setRunning(true);
  const prompt = $("prompt").value;
  $("shown-prompt").textContent = prompt;
  $("completion").textContent = "";
  say("completing…");
  const body = { model: state.model, prompt, stream: true, ...rating(),
                 temperature: Number($("temperature").value), top_p: Number($("top_p").value), max_tokens: Number($("max_tokens").value) };
  try {
    const response = await call("/v1/completions", body, controller.signal);
    const finish = await readEvents(response, (text) => $("completion").append(text));
    say(finish === "length" ? "stopped at the length limit" : "done");
  } catch (e) {
    say(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
  } finally {
    state.running = null;
    setRunning(false);
  }
}

// Server-sent events: `data: {chunk}` blocks, the last `data: [DONE]`; returns the finish_reason
async function readEvents(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finish;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices) {
        onText(c.text);
        finish = c.finish_reason || finish;
      }
    }
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

function useKey(event) {
  event.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("kr3-key", state.key);
  connect();
}

function start() {
  for (const name of SLIDERS) $(name).addEventListener("input", () => showValue(name));
  $("prompt").addEventListener("input", chartSoon);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) complete(); });
  $("rating").addEventListener("change", ratingChanged);
  $("guidance").addEventListener("input", () => { showValue("guidance"); chartSoon(); });
  $("generate").addEventListener("click", complete);
  $("stop").addEventListener("click", () => state.running?.abort());
  $("keyform").addEventListener("submit", useKey);
  SLIDERS.forEach(showValue);
  connect();
}

start();
