// Shared by the chat page and the dashboard: the API key, fetch with the key, and a Server-Sent Events reader.
// Everything talks to the page's own origin; nothing is loaded from anywhere else.
"use strict";

const TF = (window.TF = window.TF || {});
const KEY_STORAGE = "turbofan.apiKey";

TF.apiKey = () => localStorage.getItem(KEY_STORAGE) || "";

// A modal form that asks for the server's API key; resolves with the key the user typed.
TF.askForKey = (message) =>
  new Promise((resolve) => {
    let dialog = document.getElementById("api-key-dialog");
    if (!dialog) {
      dialog = document.createElement("dialog");
      dialog.id = "api-key-dialog";
      dialog.setAttribute("aria-labelledby", "api-key-title");
      const form = document.createElement("form");
      form.method = "dialog";
      const title = document.createElement("h2");
      title.id = "api-key-title";
      title.textContent = "Sign in to turbofan";
      const note = document.createElement("p");
      note.className = "note";
      const label = document.createElement("label");
      label.textContent = "API key";
      const input = document.createElement("input");
      input.type = "password";
      input.name = "key";
      input.autocomplete = "off";
      input.required = true;
      label.append(input);
      const save = document.createElement("button");
      save.type = "submit";
      save.textContent = "Save key";
      form.append(title, note, label, save);
      dialog.append(form);
      document.body.append(dialog);
    }
    const input = dialog.querySelector("input");
    dialog.querySelector(".note").textContent = message;
    input.value = "";
    dialog.addEventListener(
      "close",
      () => {
        const key = input.value.trim();
        if (key) localStorage.setItem(KEY_STORAGE, key);
        resolve(key);
      },
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });

// fetch() with the stored key as a Bearer token; on 401 it asks for the key (once per failure) and tries again.
TF.apiFetch = async (path, options = {}) => {
  for (;;) {
    const headers = new Headers(options.headers || {});
    const key = TF.apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const message = key
      ? "The server refused this key. Enter the key the server was started with (--api-key)."
      : "This server needs an API key (it was started with --api-key).";
    if (!(await TF.askForKey(message))) return response;
  }
};

// An error response's message, in either API's format ({"error": {"message"}} or {"error": "..."}).
TF.errorMessage = async (response) => {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return (body.error && (body.error.message || body.error)) || text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
};

// Reads a text/event-stream body and calls onData with each event's data (the lines after "data:", joined).
TF.readEvents = async (response, onData) => {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data && onData(data) === false) {
        reader.cancel();
        return;
      }
    }
  }
};

// Builds an element: el("div", {className: "x", dataset: {...}}, child, "text", ...). Text is always text.
TF.el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("aria-") || name === "role") node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};
