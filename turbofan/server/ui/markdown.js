// A small Markdown renderer for model replies: fenced code (with highlighting), headings, lists, quotes, rules,
// paragraphs, and inline code, bold, italics and http(s) links. It builds DOM nodes and puts model text only into
// text nodes, so nothing the model writes can become HTML. An unclosed fence (a reply still streaming) is code.
"use strict";

(() => {
  const TF = (window.TF = window.TF || {});
  const el = TF.el;

  const KEYWORDS = new Set(
    ("and as assert async await break case catch class const continue def default del do elif else enum except " +
      "export extends false False finally fn for from func function go if impl import in interface is lambda let " +
      "loop match mod mut new nil None not null or package pass pub raise return self static struct super switch " +
      "this throw true True try type typeof use var void while with yield int float str bool char double long " +
      "unsigned string echo fi then done esac local").split(" "),
  );
  const C_LIKE = /^(c|h|cc|cpp|hpp|c\+\+|cs|csharp|java|js|javascript|jsx|ts|typescript|tsx|go|rust|rs|swift|kotlin|kt|scala|css|json|php)$/;
  const HASH_LIKE = /^(python|py|sh|bash|shell|zsh|console|ruby|rb|yaml|yml|toml|r|perl|pl|make|makefile|dockerfile|ini|conf)$/;

  // Code as spans of classes tok-comment, tok-string, tok-number, tok-keyword (and plain text between).
  function highlight(code, lang) {
    const name = (lang || "").toLowerCase(); // unknown: both kinds of comment
    const hash = !C_LIKE.test(name);
    const slash = !HASH_LIKE.test(name);
    const token = new RegExp(
      [
        slash ? String.raw`\/\*[\s\S]*?(?:\*\/|$)` : null, // block comment
        slash ? String.raw`\/\/[^\n]*` : null, // line comment
        hash ? String.raw`#[^\n]*` : null, // shell / python comment
        String.raw`"""[\s\S]*?(?:"""|$)`,
        String.raw`"(?:\\.|[^"\\\n])*"?`,
        String.raw`'(?:\\.|[^'\\\n])*'?`,
        String.raw`\x60(?:\\.|[^\x60\\])*\x60?`,
        String.raw`\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b|\b0x[0-9a-f]+\b`,
        String.raw`\b[A-Za-z_][A-Za-z0-9_]*\b`,
      ]
        .filter(Boolean)
        .join("|"),
      "gi",
    );
    const out = document.createDocumentFragment();
    let last = 0;
    for (const m of code.matchAll(token)) {
      const text = m[0];
      let cls = null;
      if (/^(\/\/|\/\*|#)/.test(text)) cls = "tok-comment";
      else if (/^["'\x60]/.test(text)) cls = "tok-string";
      else if (/^\d|^0x/i.test(text)) cls = "tok-number";
      else if (KEYWORDS.has(text)) cls = "tok-keyword";
      if (!cls) continue;
      if (m.index > last) out.append(code.slice(last, m.index));
      out.append(el("span", { className: cls }, text));
      last = m.index + text.length;
    }
    if (last < code.length) out.append(code.slice(last));
    return out;
  }

  const INLINE =
    /(`+)([\s\S]*?)\1|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([^*]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([^_]*?[^\s_])_(?![\w])|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function inline(text) {
    const out = document.createDocumentFragment();
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) out.append(text.slice(last, m.index));
      if (m[1]) out.append(el("code", {}, m[2]));
      else if (m[3] || m[4]) out.append(el("strong", {}, inline(m[3] || m[4])));
      else if (m[5] || m[6]) out.append(el("em", {}, inline(m[5] || m[6])));
      else out.append(el("a", { href: m[8], target: "_blank", rel: "noopener noreferrer" }, m[7]));
      last = m.index + m[0].length;
    }
    if (last < text.length) out.append(text.slice(last));
    return out;
  }

  // Lines joined with <br>, each line's inline markup rendered.
  function lines(list) {
    const out = document.createDocumentFragment();
    list.forEach((line, i) => {
      if (i) out.append(el("br"));
      out.append(inline(line));
    });
    return out;
  }

  function codeBlock(lang, code) {
    const copy = el("button", { type: "button", className: "copy", textContent: "Copy" });
    copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(code));
    const head = el("div", { className: "code-head" }, el("span", {}, lang || "code"), copy);
    const pre = el("pre", {}, el("code", { className: lang ? `language-${lang}` : "" }, highlight(code, lang)));
    return el("div", { className: "code-block" }, head, pre);
  }

  const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

  TF.renderMarkdown = (text) => {
    const out = document.createDocumentFragment();
    const all = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < all.length) {
      const line = all[i];
      const fence = line.match(FENCE);
      if (fence) {
        const body = [];
        i += 1;
        while (i < all.length && !all[i].trim().startsWith(fence[1])) body.push(all[i++]);
        i += 1; // the closing fence (or past the end)
        out.append(codeBlock(fence[2], body.join("\n")));
        continue;
      }
      if (!line.trim()) {
        i += 1;
        continue;
      }
      const heading = line.match(HEADING);
      if (heading) {
        out.append(el(`h${Math.min(heading[1].length + 2, 6)}`, {}, inline(heading[2])));
        i += 1;
        continue;
      }
      if (RULE.test(line)) {
        out.append(el("hr"));
        i += 1;
        continue;
      }
      const listKind = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
      if (listKind) {
        const list = el(listKind === BULLET ? "ul" : "ol");
        while (i < all.length && listKind.test(all[i])) list.append(el("li", {}, inline(all[i++].match(listKind)[1])));
        out.append(list);
        continue;
      }
      if (QUOTE.test(line)) {
        const quoted = [];
        while (i < all.length && QUOTE.test(all[i])) quoted.push(all[i++].match(QUOTE)[1]);
        out.append(el("blockquote", {}, lines(quoted)));
        continue;
      }
      const para = [];
      while (
        i < all.length &&
        all[i].trim() &&
        !FENCE.test(all[i]) &&
        !HEADING.test(all[i]) &&
        !BULLET.test(all[i]) &&
        !NUMBERED.test(all[i]) &&
        !QUOTE.test(all[i])
      )
        para.push(all[i++]);
      out.append(el("p", {}, lines(para)));
    }
    return out;
  };
})();
