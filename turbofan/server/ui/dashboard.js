// The live dashboard: one Server-Sent Events feed (/dashboard/events, about one snapshot a second), read with fetch
// so that it can carry the API key (EventSource cannot send headers). Each number sits in an element with
// data-metric=<name> (its raw value in data-value); plotted ones keep the last HISTORY snapshots as an SVG line.
"use strict";

(() => {
  const { el, apiFetch, readEvents, errorMessage } = window.TF;
  const HISTORY = 300; // snapshots: five minutes at 1 Hz
  const SVG = "http://www.w3.org/2000/svg";

  const fixed = (digits) => (v) => (v === null || v === undefined ? "–" : v.toFixed(digits));
  const ms = (v) => (v === null || v === undefined ? "–" : `${(v * 1000).toFixed(v < 0.01 ? 2 : 1)} ms`);
  const percent = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)} %`);
  const bytes = (v) => (v >= 2 ** 30 ? `${(v / 2 ** 30).toFixed(2)} GiB` : `${(v / 2 ** 20).toFixed(0)} MiB`);
  const integer = (v) => String(v);

  // name, label, value from a snapshot, format (value, snapshot) -> text, and whether to plot it.
  const METRICS = [
    ["requests_running", "Requests running", (s) => s.requests_running, integer, true],
    ["requests_waiting", "Requests waiting", (s) => s.requests_waiting, integer, true],
    ["generation_tokens_per_s", "Generation tokens/s", (s) => s.generation_tokens_per_s, fixed(1), true],
    ["prompt_tokens_per_s", "Prompt tokens/s", (s) => s.prompt_tokens_per_s, fixed(1), true],
    ["ttft_p50", "TTFT p50 (last minute)", (s) => s.ttft.p50, ms, true],
    ["ttft_p95", "TTFT p95", (s) => s.ttft.p95, ms, false],
    ["itl_p50", "Inter-token latency p50", (s) => s.itl.p50, ms, true],
    ["itl_p95", "Inter-token latency p95", (s) => s.itl.p95, ms, false],
    ["kv_cache_usage", "KV-cache usage", (s) => s.kv_cache_usage, percent, true],
    ["kv_blocks_free", "KV blocks free", (s) => s.kv_blocks_free, (v, s) => `${v} of ${s.kv_blocks_total}`, false],
    ["prefix_cache_hit_rate", "Prefix-cache hit rate (now)", (s) => s.prefix_cache_hit_rate, percent, false],
    ["prefix_cache_hit_rate_total", "Prefix-cache hit rate (total)", (s) => s.prefix_cache_hit_rate_total, percent, false],
    ["preemptions_total", "Preemptions", (s) => s.preemptions_total, integer, false],
    ["process_rss_bytes", "Process memory (RSS)", (s) => s.process_rss_bytes, bytes, true],
    ["process_cpu_percent", "Process CPU (% of a core)", (s) => s.process_cpu_percent, fixed(0), true],
  ];
  const history = Object.fromEntries(METRICS.map(([name]) => [name, []]));
  const cards = {};

  function plot(name) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${HISTORY} 40`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "plot");
    svg.setAttribute("aria-hidden", "true");
    const line = document.createElementNS(SVG, "polyline");
    svg.append(line);
    cards[name].line = line;
    return svg;
  }

  function buildCards() {
    const box = document.getElementById("cards");
    for (const [name, label, , , plotted] of METRICS) {
      const value = el("output", { className: "value", dataset: { metric: name }, textContent: "–" });
      const max = el("span", { className: "plot-max" });
      const labelId = `label-${name}`;
      value.setAttribute("aria-labelledby", labelId);
      cards[name] = { value, max };
      const card = el("div", { className: "card" }, el("div", { className: "label", id: labelId }, label), value);
      if (plotted) card.append(plot(name), max);
      box.append(card);
    }
  }

  function drawPlot(name, format) {
    const points = history[name];
    const { line, max } = cards[name];
    if (!line) return;
    const highest = Math.max(...points.map((p) => p ?? 0), 0);
    const top = highest || 1;
    const offset = HISTORY - points.length;
    line.setAttribute(
      "points",
      points.map((p, i) => `${offset + i},${(40 - ((p ?? 0) / top) * 38 - 1).toFixed(2)}`).join(" "),
    );
    max.textContent = `max ${format(highest)} over the last ${points.length} s`;
  }

  function cell(text) {
    return el("td", {}, String(text));
  }

  // "1.16 GB (q4k 756 MB, q6k 350 MB, q8 52 MB)": what the weights are made of, by format
  function weightsText(m) {
    const parts = Object.entries(m.weights_by_format || {})
      .filter(([, n]) => n >= 1 << 20)
      .map(([f, n]) => `${f} ${bytes(n)}`);
    return parts.length ? `${bytes(m.weights_bytes)} (${parts.join(", ")})` : bytes(m.weights_bytes);
  }

  function showTables(s) {
    document.querySelector("#models tbody").replaceChildren(
      ...s.resident_models.map((m) =>
        el(
          "tr",
          { dataset: { model: m.name } },
          cell(m.name),
          cell(m.architecture),
          cell(m.quantization),
          cell(m.dtype),
          cell(m.device),
          cell(m.max_model_len),
          cell(weightsText(m)),
          cell(bytes(m.kv_cache_bytes)),
        ),
      ),
    );
    document.getElementById("tiering").textContent =
      s.tiering === "on" ? "Tiered execution is on." : "Tiered execution is off (start with --tiering on).";
    const rows = [
      ...Object.entries(s.tier_calls).map(([tier, n]) => [`steps on tier ${tier}`, n]),
      ...Object.entries(s.deopts).map(([reason, n]) => [`deopts: ${reason}`, n]),
    ];
    document.querySelector("#tiers tbody").replaceChildren(...rows.map(([k, v]) => el("tr", {}, cell(k), cell(v))));
    document.getElementById("tiers").hidden = rows.length === 0;
  }

  function show(s) {
    for (const [name, , get, format] of METRICS) {
      const v = get(s);
      const { value } = cards[name];
      value.textContent = format(v, s);
      value.dataset.value = v === null || v === undefined ? "" : String(v);
      const points = history[name];
      points.push(v);
      if (points.length > HISTORY) points.shift();
      drawPlot(name, format);
    }
    showTables(s);
    status(`${s.status === "ok" ? "live" : s.status} · updated ${new Date(s.time * 1000).toLocaleTimeString()}`);
  }

  const status = (text) => (document.getElementById("feed-status").textContent = text);

  async function follow() {
    for (;;) {
      try {
        const response = await apiFetch("/dashboard/events", { cache: "no-store" });
        if (!response.ok) throw new Error(await errorMessage(response));
        await readEvents(response, (data) => show(JSON.parse(data)));
        status("feed ended; reconnecting…");
      } catch (err) {
        status(`disconnected (${err.message || err}); reconnecting…`);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  buildCards();
  follow();
})();
