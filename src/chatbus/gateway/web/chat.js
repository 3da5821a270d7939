// The chat page: one session (its id kept in localStorage), answers streamed over the
// WebSocket /ws/{session_id}, the conversation read back from GET /history/{session_id}.
"use strict";

const SESSION_KEY = "chatbus.session";
const MODEL_KEY = "chatbus.model";
const API_KEY = "chatbus.api-key";
const MAX_RECONNECT_DELAY_MS = 10000;

const $ = (id) => document.getElementById(id);
const ui = {
  apiKey: $("api-key"),
  conversation: $("conversation"),
  empty: $("empty"),
  error: $("error"),
  form: $("ask"),
  message: $("message"),
  model: $("model"),
  newChat: $("new-chat"),
  send: $("send"),
  status: $("status"),
  stop: $("stop"),
};

let sessionId = localStorage.getItem(SESSION_KEY) || startSession();
let socket = null;
let reconnectDelay = 500;
let reconnectTimer = null;
let answer = null; // {element, text} of the answer being streamed

function startSession() {
  // Not crypto.randomUUID: it exists only on https and localhost.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  const id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  localStorage.setItem(SESSION_KEY, id);
  return id;
}

// kind "connection": cleared by itself once the socket is back.
// With GATEWAY_API_KEYS set, every call carries the key the person typed in. A browser
// cannot give a WebSocket an Authorization header: the key goes as a subprotocol.
function authorization() {
  const key = localStorage.getItem(API_KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function socketProtocols() {
  const key = localStorage.getItem(API_KEY);
  if (!key) return [];
  const bytes = new TextEncoder().encode(key);
  const base64 = btoa(String.fromCharCode(...bytes));
  return ["chatbus", `bearer.${base64.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`];
}

function askForKey() {
  ui.apiKey.hidden = false;
  ui.apiKey.focus();
  const which = localStorage.getItem(API_KEY) ? "That API key was refused" : "This gateway needs an API key";
  showError(`${which}: enter one at the top and press Enter.`, "key");
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authorization(), ...options.headers } });
  if (response.status === 401) {
    askForKey();
    throw new Error("no valid API key");
  }
  return response;
}

function showError(text, kind = "") {
  ui.error.textContent = text;
  ui.error.dataset.kind = kind;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setStatus(text, online) {
  ui.status.textContent = text;
  ui.status.classList.toggle("online", online);
}

function addMessage(role, text) {
  ui.empty.hidden = true;
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  ui.conversation.append(element);
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
  return element;
}

function setAnswering(on) {
  ui.send.disabled = on || !isOpen();
  ui.stop.hidden = !on;
}

function isOpen() {
  return socket !== null && socket.readyState === WebSocket.OPEN;
}

// What an error event means to a person; the code is kept for whoever reports it.
function describe(error) {
  const messages = {
    model_not_found: `That model is not available: ${error.message}`,
    invalid_request: `The message was refused: ${error.message}`,
    service_unavailable: "No worker is answering right now. Try again in a moment.",
    upstream_unavailable: "The model server is unavailable. Try again in a moment.",
    upstream_error: "The model server failed while answering. Try again.",
    timeout: "The answer took too long and was stopped.",
    deadline_exceeded: "The answer took too long and was stopped.",
    history_unavailable: "The conversation could not be loaded or saved. Try again in a moment.",
    internal_error: "The service failed to answer. Try again.",
  };
  return `${messages[error.code] || error.message} (${error.code})`;
}

function endAnswer(note) {
  if (answer === null) return;
  answer.element.classList.remove("streaming");
  if (note) {
    const marker = document.createElement("span");
    marker.className = "note";
    marker.textContent = note;
    answer.element.append(marker);
  }
  answer = null;
  setAnswering(false);
}

function onEvent(event) {
  if (event.type === "chunk") {
    if (answer === null) return;
    answer.text += event.content || "";
    answer.element.textContent = answer.text;
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
  } else if (event.type === "restarted") {
    if (answer !== null) {
      answer.text = "";
      answer.element.textContent = "";
    }
  } else if (event.type === "done") {
    if (answer !== null) answer.element.textContent = event.message.content;
    endAnswer(event.done_reason === "length" ? "cut off: the answer reached its length limit" : "");
  } else if (event.type === "error") {
    if (event.code === "cancelled") {
      endAnswer("stopped");
    } else {
      endAnswer("no answer");
      showError(describe(event));
    }
  }
}

function connect() {
  clearTimeout(reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const opened = new WebSocket(`${scheme}://${location.host}/ws/${sessionId}`, socketProtocols());
  socket = opened;
  opened.onopen = () => {
    reconnectDelay = 500;
    setStatus("connected", true);
    if (ui.error.dataset.kind === "connection") clearError();
    setAnswering(answer !== null);
  };
  opened.onmessage = (message) => onEvent(JSON.parse(message.data));
  opened.onclose = (closed) => {
    if (socket !== opened) return; // replaced by a new chat's socket
    setStatus("offline", false);
    endAnswer(answer !== null ? "interrupted: the connection was lost" : "");
    setAnswering(false);
    if (ui.error.dataset.kind === "key") return; // waits for a key, then the page reloads
    const reason = closed.reason ? ` (${closed.reason})` : "";
    showError(`Lost the connection to the gateway${reason}; reconnecting…`, "connection");
    reconnectTimer = setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, MAX_RECONNECT_DELAY_MS);
  };
}

async function loadModels() {
  try {
    const response = await call("/api/tags");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { models } = await response.json();
    for (const model of models) {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name;
      ui.model.append(option);
    }
    ui.model.value = localStorage.getItem(MODEL_KEY) || "";
    if (ui.model.selectedIndex < 0) ui.model.value = "";
  } catch (error) {
    if (ui.error.dataset.kind !== "key") {
      showError(`Could not list the models (${error.message}); the workers' default model answers.`);
    }
  }
}

async function loadHistory() {
  try {
    const response = await call(`/history/${sessionId}`);
    if (response.status === 404) return; // a new session
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const session = await response.json();
    for (const message of session.messages) {
      if (message.role === "user" || message.role === "assistant") {
        addMessage(message.role, message.content);
      }
    }
  } catch (error) {
    if (ui.error.dataset.kind !== "key") showError(`Could not load the conversation (${error.message}).`);
  }
}

function ask(text) {
  if (!isOpen()) {
    showError("Not connected to the gateway yet; try again in a moment.");
    return;
  }
  clearError();
  addMessage("user", text);
  answer = { element: addMessage("assistant streaming", ""), text: "" };
  setAnswering(true);
  const request = { message: text };
  if (ui.model.value) request.model = ui.model.value;
  socket.send(JSON.stringify(request));
}

async function newChat() {
  if (answer !== null && isOpen()) socket.send(JSON.stringify({ cancel: true }));
  const old = sessionId;
  sessionId = startSession();
  for (const element of ui.conversation.querySelectorAll(".message")) element.remove();
  ui.empty.hidden = false;
  answer = null;
  clearError();
  const previous = socket;
  connect();
  previous?.close();
  try {
    const response = await call(`/history/${old}`, { method: "DELETE" });
    if (!response.ok && response.status !== 404) throw new Error(`HTTP ${response.status}`);
  } catch (error) {
    if (ui.error.dataset.kind !== "key") {
      showError(`Could not delete the previous conversation (${error.message}).`);
    }
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.message.value.trim();
  if (!text || answer !== null) return;
  ui.message.value = "";
  ask(text);
});

ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (isOpen()) socket.send(JSON.stringify({ cancel: true }));
});

ui.apiKey.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !ui.apiKey.value) return;
  localStorage.setItem(API_KEY, ui.apiKey.value);
  location.reload();
});

ui.model.addEventListener("change", () => localStorage.setItem(MODEL_KEY, ui.model.value));
ui.newChat.addEventListener("click", newChat);

setAnswering(false);
loadModels();
loadHistory().then(connect);
