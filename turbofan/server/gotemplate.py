"""Just enough of Go's text/template to render Ollama's prompt templates in `/api/generate`'s `template` field.

Supported: `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if .X }} … {{ else }} … {{ end }}`, and the
`{{-` / `-}}` whitespace trims. That covers the classic Modelfile templates; anything else is an error the
caller reports as 400 rather than a silently wrong prompt.

The output is bounded while it is built (MAX_OUTPUT_CHARS): `{{ .Prompt }}` repeated 20,000 times over a 300 KB
prompt would otherwise be a 6 GB string before anything looked at its length.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)
# 4 Mi characters: more than any context turbofan serves holds (about a million tokens), far less than a process
# can afford to build and tokenize.
MAX_OUTPUT_CHARS = 4 << 20


class TemplateError(ValueError):
    pass


def _tokens(template: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s), applying the trim markers to the neighbouring text."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


class _Output:
    """The rendered pieces, refusing the one that would take the total past `limit` characters."""

    def __init__(self, limit: int):
        self.pieces: list[str] = []
        self.size = 0
        self.limit = limit

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            raise TemplateError(f"the rendered template is longer than {self.limit} characters: a prompt template "
                                "may repeat its fields only so often")  # fmt: skip
        self.pieces.append(piece)


def render(template: str, values: dict[str, str], max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """The template filled in with `values`; TemplateError for an unsupported action or an output past
    `max_chars` characters (checked piece by piece, so nothing larger is ever built)."""
    tokens = _tokens(template)
    result = _Output(max_chars)
    # a stack of (emitting before this block, condition value, currently in else branch)
    stack: list[tuple[bool, bool, bool]] = []
    emitting = True

    def lookup(expr: str) -> str:
        if not expr.startswith("."):
            raise TemplateError(f"unsupported template expression {{{{ {expr} }}}}")
        key = expr[1:]
        if key not in values:
            raise TemplateError(f"unknown template field .{key} (supported: {', '.join('.' + k for k in values)})")
        return values[key]

    for kind, value in tokens:
        if kind == "text":
            if emitting:
                result.append(value)
            continue
        words = value.split()
        if not words or value.startswith("/*"):
            continue
        head = words[0]
        if head == "if":
            if len(words) != 2:
                raise TemplateError(f"unsupported condition {{{{ {value} }}}}")
            cond = bool(lookup(words[1]))
            stack.append((emitting, cond, False))
            emitting = emitting and cond
        elif head == "else":
            if not stack:
                raise TemplateError("{{ else }} without {{ if }}")
            outer, cond, _ = stack.pop()
            stack.append((outer, cond, True))
            emitting = outer and not cond
        elif head == "end":
            if not stack:
                raise TemplateError("{{ end }} without {{ if }}")
            emitting = stack.pop()[0]
        elif len(words) == 1:
            if emitting:
                result.append(lookup(head))
        else:
            raise TemplateError(f"unsupported template action {{{{ {value} }}}}")
    if stack:
        raise TemplateError("{{ if }} without {{ end }}")
    return "".join(result.pieces)
