// lalm voice chat: plain JS, no build step. Talks to the same server's OpenAI API.
// Audio (recorded or uploaded) is decoded by the browser and re-encoded as 16 kHz mono WAV,
// so whatever the browser records (webm/opus in Chromium) reaches the server as a format
// it reads, at the rate the model wants.
"use strict";

const $ = (id) => document.getElementById(id);
const MIC_ICON = $("record").innerHTML;
const STOP_ICON = '<svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true"><rect x="6" y="6" width="12" height="12" rx="2" fill="currentColor"/></svg>';
const state = {
  model: null,
  messages: [],      // OpenAI-style history sent with every turn
  attachments: [],   // [{wavB64, url, seconds, name}]
  recorder: null,
  starting: false,   // waiting for getUserMedia: a second tap must not open a second stream
  pending: 0,        // audio being decoded/encoded, not yet in `attachments`
  busy: false,
  controller: null,  // AbortController of the answer being streamed
  sentAt: 0,
};

// ---------- settings ----------
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("lalm.apiKey") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("lalm.apiKey", keyInput.value); loadModel(); });
function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}
function setStatus(text) { $("status").textContent = text || ""; }

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers(false) });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "not connected: " + e.message;
  }
}

// ---------- audio: any browser-decodable blob -> 16 kHz mono WAV ----------
async function toWav16k(blob) {
  const bytes = await blob.arrayBuffer();
  // decodeAudioData resamples to the context's rate, so a 16 kHz context does the resampling.
  const ctx = new OfflineAudioContext(1, 1, 16000);
  const decoded = await ctx.decodeAudioData(bytes);
  const n = decoded.length, channels = decoded.numberOfChannels;
  const mono = new Float32Array(n);
  for (let c = 0; c < channels; c++) {
    const data = decoded.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += data[i] / channels;
  }
  return { wav: encodeWav(mono, 16000), seconds: n / 16000 };
}

function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + samples.length * 2, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 2, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

async function attach(blob, name) {
  setStatus("processing audio…");
  state.pending++;
  try {
    const { wav, seconds } = await toWav16k(blob);
    state.attachments.push({ wavB64: await blobToBase64(wav), url: URL.createObjectURL(wav), seconds, name });
    renderAttachments();
    setStatus(`${name}: ${seconds.toFixed(1)} s ready to send`);
  } catch (e) {
    setStatus(`could not read ${name}: ${e.message || e}`);
  } finally {
    state.pending--;
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((a, i) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    const audio = document.createElement("audio");
    audio.controls = true; audio.src = a.url;
    const del = document.createElement("button");
    del.type = "button"; del.textContent = "×"; del.title = "remove"; del.setAttribute("aria-label", "remove " + a.name);
    del.onclick = () => { state.attachments.splice(i, 1); renderAttachments(); };
    chip.append(audio, del);
    box.append(chip);
  });
}

// ---------- microphone ----------
$("record").addEventListener("click", async () => {
  const btn = $("record");
  if (state.recorder) { state.recorder.stop(); return; }
  if (state.starting) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === "undefined") {
    // Browsers only offer the microphone to secure pages: http://<LAN address> has none.
    setStatus(window.isSecureContext
      ? "this browser cannot record audio here; upload a file instead"
      : "the microphone needs HTTPS (or http://localhost); upload a file instead");
    return;
  }
  let stream, rec;
  state.starting = true;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    rec = new MediaRecorder(stream);
  } catch (e) {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    setStatus("microphone unavailable: " + (e.message || e.name));
    return;
  } finally {
    state.starting = false;
  }
  const chunks = [];
  rec.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
  rec.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    btn.classList.remove("recording"); btn.innerHTML = MIC_ICON;
    await attach(new Blob(chunks, { type: rec.mimeType }), "recording");
  };
  rec.start(250);
  state.recorder = rec;
  btn.classList.add("recording"); btn.innerHTML = STOP_ICON;
  setStatus("recording… tap the button again to stop");
});

$("file").addEventListener("change", async (ev) => {
  for (const f of ev.target.files) await attach(f, f.name);
  ev.target.value = "";
});

// ---------- conversation ----------
function addTurn(role, text, audios = []) {
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = "turn " + role;
  for (const a of audios) {
    const audio = document.createElement("audio");
    audio.controls = true; audio.src = a.url;
    div.append(audio);
  }
  const span = document.createElement("span");
  span.className = "content";
  span.textContent = text;
  div.append(span);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(ev) {
  ev.preventDefault();
  if (state.busy) return;
  if (state.recorder) { setStatus("stop the recording first (tap the red button), then send"); return; }
  if (state.pending) { setStatus("still processing audio: send again when it is ready"); return; }
  const text = $("text").value.trim();
  if (!text && !state.attachments.length) { setStatus("record, upload or type something first"); return; }
  const content = state.attachments.map((a) => ({ type: "input_audio", input_audio: { data: a.wavB64, format: "wav" } }));
  if (text) content.push({ type: "text", text });
  addTurn("user", text, state.attachments);
  const history = state.messages;  // "New conversation" swaps in a new array mid-answer
  history.push({ role: "user", content });
  state.attachments = []; renderAttachments(); $("text").value = "";

  const turn = addTurn("assistant", "");
  turn.classList.add("streaming");
  const out = turn.querySelector(".content");
  const controller = new AbortController();
  state.busy = true; state.controller = controller; state.sentAt = performance.now();
  $("send").textContent = "Stop"; setStatus("thinking…");
  const t0 = performance.now();
  let answer = "", firstAt = null, failed = null;
  try {
    const body = {
      model: state.model || undefined, messages: state.messages, stream: true,
      temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      stream_options: { include_usage: true },
    };
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                     signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { failed = chunk.error.message; continue; }
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              if (firstAt === null) firstAt = performance.now();
              answer += c.delta.content;
              out.textContent = answer;
              turn.scrollIntoView({ block: "end" });
            }
          }
        }
      }
    }
    if (failed) throw new Error(failed);
    history.push({ role: "assistant", content: answer });
    const meta = document.createElement("span");
    meta.className = "meta";
    const ttft = firstAt === null ? "-" : ((firstAt - t0) / 1000).toFixed(2) + " s";
    meta.textContent = `first token ${ttft} · total ${((performance.now() - t0) / 1000).toFixed(2)} s`;
    turn.append(meta);
    setStatus("");
  } catch (e) {
    if (controller.signal.aborted) {
      // Stopped: what was shown stays in the history; nothing shown, the question goes too.
      if (answer) history.push({ role: "assistant", content: answer }); else history.pop();
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = "stopped";
      turn.append(meta);
    } else {
      turn.classList.add("error");
      out.textContent = (answer ? answer + "\n" : "") + "Error: " + e.message;
      history.pop();  // the failed user turn is not part of the history
    }
    setStatus("");
  } finally {
    turn.classList.remove("streaming");
    turn.dataset.done = "1";
    state.busy = false; state.controller = null; $("send").textContent = "Send";
  }
}

$("composer").addEventListener("submit", send);
$("send").addEventListener("click", (ev) => {
  // While an answer streams the Send button is Stop; aborting the fetch closes the
  // connection, which frees the server's row. A double-tap on Send is not a Stop.
  if (!state.controller) return;
  ev.preventDefault();
  if (performance.now() - state.sentAt > 500) state.controller.abort();
});
$("text").addEventListener("keydown", (ev) => {
  // Enter that confirms an IME composition (Chinese, Japanese, ...) is not a send.
  if (ev.isComposing || ev.keyCode === 229) return;
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("reset").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = []; state.attachments = []; renderAttachments();
  $("log").replaceChildren(); setStatus("new conversation");
});
loadModel();
