// The chat page: conversations kept in localStorage, replies streamed from /v1/chat/completions with fetch and a
// stream reader. Stop aborts the fetch, which closes the connection: the server aborts the request and frees its
// KV blocks. Model text is rendered by markdown.js into text nodes only.
"use strict";

(() => {
  const { el, apiFetch, readEvents, errorMessage, renderMarkdown } = window.TF;
  const STORE = "turbofan.conversations";
  const CURRENT = "turbofan.current";
  const SETTINGS = "turbofan.settings";
  const PARAMS = ["model", "system", "temperature", "top_p", "max_tokens"];
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"),
    input: $("message"),
    composer: $("composer"),
    send: $("send"),
    stop: $("stop"),
    list: $("conversations"),
  };
  const param = Object.fromEntries(PARAMS.map((name) => [name, $(name)]));

  const load = (key, fallback) => {
    try {
      return JSON.parse(localStorage.getItem(key)) ?? fallback;
    } catch {
      return fallback;
    }
  };
  let conversations = load(STORE, []);
  let current = localStorage.getItem(CURRENT) || null;
  let controller = null; // the AbortController of the reply streaming now, if any

  const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  const save = () => {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    localStorage.setItem(CURRENT, current || "");
  };

  function conversation() {
    let conv = conversations.find((c) => c.id === current);
    if (!conv) {
      conv = { id: newId(), title: "New chat", created: new Date().toISOString(), messages: [] };
      conversations.unshift(conv);
      current = conv.id;
    }
    return conv;
  }

  // -- settings ------------------------------------------------------------------------------------------------
  function restoreSettings() {
    const saved = load(SETTINGS, {});
    for (const name of PARAMS) if (name !== "model" && saved[name] !== undefined) param[name].value = saved[name];
    return saved;
  }
  const saveSettings = () =>
    localStorage.setItem(SETTINGS, JSON.stringify(Object.fromEntries(PARAMS.map((n) => [n, param[n].value]))));

  async function loadModels(saved) {
    const response = await apiFetch("/v1/models");
    if (!response.ok) {
      param.model.replaceChildren(el("option", { value: "", textContent: "(models unavailable)" }));
      return;
    }
    const { data } = await response.json();
    param.model.replaceChildren(...data.map((m) => el("option", { value: m.id, textContent: m.id })));
    if (saved.model && data.some((m) => m.id === saved.model)) param.model.value = saved.model;
  }

  const number = (input) => (input.value.trim() === "" ? undefined : Number(input.value));

  // -- rendering -----------------------------------------------------------------------------------------------
  function statsText(s) {
    if (!s) return "";
    const parts = [];
    if (s.ttft_ms !== null) parts.push(`TTFT ${Math.round(s.ttft_ms)} ms`);
    if (s.tokens_per_s !== null) parts.push(`${s.tokens_per_s.toFixed(1)} tokens/s`);
    parts.push(`${s.exact ? "" : "≈"}${s.tokens} tokens`);
    if (s.finish === "stopped") parts.push("stopped");
    else if (s.finish === "length") parts.push("reached max tokens");
    return parts.join(" · ");
  }

  function fillBody(body, message) {
    if (message.role === "assistant") body.replaceChildren(renderMarkdown(message.content));
    else body.replaceChildren(el("p", { className: "plain" }, message.content));
    if (message.error) body.append(el("p", { className: "error", role: "alert" }, message.error));
  }

  function actionButton(label, onClick) {
    const button = el("button", { type: "button", className: "action", textContent: label });
    button.addEventListener("click", onClick);
    return button;
  }

  function messageView(message, index, isLast) {
    const body = el("div", { className: "body" });
    fillBody(body, message);
    const who = message.role === "user" ? "You" : message.model || "assistant";
    const node = el(
      "article",
      { className: `msg ${message.role}`, dataset: { role: message.role, index: String(index) } },
      el("div", { className: "who" }, who),
      body,
    );
    const actions = el("div", { className: "actions" });
    if (message.role === "assistant") {
      node.dataset.streaming = "false";
      node.append(el("div", { className: "stats" }, statsText(message.stats)));
      if (isLast) actions.append(actionButton("Regenerate", () => regenerate(index)));
    } else {
      actions.append(actionButton("Edit", () => edit(node, index)));
    }
    actions.append(actionButton("Copy", () => navigator.clipboard && navigator.clipboard.writeText(message.content)));
    node.append(actions);
    return node;
  }

  function renderList() {
    ui.list.replaceChildren(
      ...conversations.map((conv) => {
        const open = actionButton(conv.title, () => {
          if (controller) return;
          current = conv.id;
          save();
          render();
        });
        open.className = "open";
        if (conv.id === current) open.setAttribute("aria-current", "true");
        const remove = actionButton("×", () => {
          if (controller && conv.id === current) return;
          conversations = conversations.filter((c) => c !== conv);
          if (current === conv.id) current = conversations.length ? conversations[0].id : null;
          save();
          render();
        });
        remove.setAttribute("aria-label", `Delete conversation: ${conv.title}`);
        remove.className = "delete";
        return el("li", {}, open, remove);
      }),
    );
  }

  function render() {
    renderList();
    const messages = conversations.find((c) => c.id === current)?.messages || [];
    ui.messages.replaceChildren(...messages.map((m, i) => messageView(m, i, i === messages.length - 1)));
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  // -- generation ----------------------------------------------------------------------------------------------
  async function generate() {
    const conv = conversation();
    const history = conv.messages.map(({ role, content }) => ({ role, content }));
    const system = param.system.value.trim();
    const reply = { role: "assistant", content: "", model: param.model.value || undefined, stats: null };
    conv.messages.push(reply);
    const node = messageView(reply, conv.messages.length - 1, false);
    node.dataset.streaming = "true";
    node.setAttribute("aria-busy", "true");
    ui.messages.append(node);
    const body = node.querySelector(".body");
    node.querySelector(".stats").textContent = "waiting for the first token…";
    controller = new AbortController();
    setBusy(true);

    const payload = {
      model: param.model.value || undefined,
      messages: system ? [{ role: "system", content: system }, ...history] : history,
      stream: true,
      stream_options: { include_usage: true },
      temperature: number(param.temperature),
      top_p: number(param.top_p),
      max_tokens: number(param.max_tokens),
    };
    const started = performance.now();
    let first = null;
    let chunks = 0;
    let usage = null;
    let finish = null;
    let timer = null;
    const paint = () => {
      timer = null;
      body.replaceChildren(renderMarkdown(reply.content));
      ui.messages.scrollTop = ui.messages.scrollHeight;
    };
    try {
      const response = await apiFetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(payload),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      await readEvents(response, (data) => {
        if (data === "[DONE]") return false;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return true;
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (first === null) first = performance.now();
          reply.content += text;
          chunks += 1;
          if (timer === null) timer = setTimeout(paint, 30);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        return true;
      });
    } catch (err) {
      if (err.name === "AbortError") finish = "stopped";
      else {
        reply.error = err.message || String(err);
        controller.abort(); // close the stream if it is still open
      }
    }
    const end = performance.now();
    clearTimeout(timer);
    const tokens = usage ? usage.completion_tokens : chunks;
    reply.stats = {
      ttft_ms: first === null ? null : first - started,
      tokens,
      exact: usage !== null,
      tokens_per_s: first !== null && tokens > 1 && end > first ? ((tokens - 1) * 1000) / (end - first) : null,
      prompt_tokens: usage ? usage.prompt_tokens : null,
      finish,
    };
    controller = null;
    setBusy(false);
    save();
    render();
  }

  function send() {
    const text = ui.input.value.trim();
    if (!text || controller) return;
    const conv = conversation();
    conv.messages.push({ role: "user", content: text });
    if (conv.title === "New chat") conv.title = text.slice(0, 48);
    ui.input.value = "";
    save();
    render();
    generate();
  }

  function regenerate(index) {
    if (controller) return;
    conversation().messages.splice(index);
    render();
    generate();
  }

  function edit(node, index) {
    if (controller) return;
    const message = conversation().messages[index];
    const area = el("textarea", { rows: 3, value: message.content, "aria-label": "Edit message" });
    const form = el(
      "form",
      { className: "edit" },
      area,
      el("button", { type: "submit", textContent: "Save and regenerate" }),
      actionButton("Cancel", render),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = area.value.trim();
      if (!text || controller) return;
      const conv = conversation();
      conv.messages[index].content = text;
      conv.messages.splice(index + 1);
      save();
      render();
      generate();
    });
    node.querySelector(".body").replaceChildren(form);
    area.focus();
  }

  function exportJSON() {
    const blob = new Blob([JSON.stringify({ exported: new Date().toISOString(), conversations }, null, 2)], {
      type: "application/json",
    });
    const link = el("a", { href: URL.createObjectURL(blob), download: "turbofan-conversations.json" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  // -- wiring --------------------------------------------------------------------------------------------------
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    if (conversations.find((c) => c.id === current)?.messages.length) current = null;
    save();
    render();
    ui.input.focus();
  });
  $("export").addEventListener("click", exportJSON);
  for (const name of PARAMS) param[name].addEventListener("change", saveSettings);

  const saved = restoreSettings();
  render();
  loadModels(saved);
})();
