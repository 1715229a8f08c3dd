"""Tool-call parsers: one per model family's call format, as vLLM's `--tool-call-parser` names them.

Every format is a *group* of JSON call objects `{"name": ..., "arguments" | "parameters": {...}}`: opened by a
tag (`<tool_call>`, `[TOOL_CALLS]`, `<|python_tag|>`) or, at the very start of an answer, by a bare opener (`{`
for llama3_json, `[` for mistral: their tags are special tokens that decoding drops), maybe a `lead` (`[`), calls
split by a separator (`;`, `,`), and a close (`</tool_call>`, `]`, or the end of the text). One `ToolStream`
parses them all from these few strings: a small JSON scanner finds where each call object ends, so a `}` or a
separator inside a string never cuts a call, and the name goes out as soon as it is read, the arguments as they
come. A group that holds no valid call stays content, as written.

Each parser also writes the grammars that enforce its format (`forced_grammar`: exactly one call, for
tool_choice "required" / named; `auto_grammar`: free text or calls whose arguments follow the strict tools'
schemas, for tool_choice "auto" with a `strict: true` tool). See docs/structured.md for the selection rules.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from turbofan.engine.constraints import JSON_OPTIONS, StructuredOutput

if TYPE_CHECKING:
    from turbofan.server.tools import ToolRequest


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolEvent:
    kind: str  # "content" | "call" (a new call: index, name) | "arguments" (a fragment for call `index`)
    text: str = ""
    index: int = 0


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""
    id: str = field(default_factory=call_id)


class ToolStream:
    """Incremental parse of one choice's text: feed() pieces as they come, finish() at the end."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.buffer = ""  # text not yet turned into events
        self.state = "text"  # "text" | "group" (between calls of an open group) | "call" (inside a call object)
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._started = False  # non-blank text seen: a bare opener only counts at the very start
        self._raw = ""  # the open group's text before its first call: content again if it holds no call
        self._group_calls = 0
        self._need_lead = False
        self._args_start: int | None = None  # where the arguments begin in the open call's buffer
        self._args_sent = 0
        self._scan = (0, 0, False, False)  # the call object scanned so far: position, depth, in string, escaped
        # hermes: an answer that starts with "{" may be a bare call without the tags (Qwen2.5-Coder-0.5B writes
        # them): held until the end, then a call if it is one whole {"name", "arguments"} object (as Ollama does)
        self._bare: bool | None = None if parser.hold_bare else False

    @property
    def in_call(self) -> bool:
        """Whether the last of `calls` is still being written."""
        return self.state == "call" and self._args_start is not None

    def feed(self, text: str) -> list[ToolEvent]:
        self.buffer += text
        events: list[ToolEvent] = []
        if self._bare is None:
            if not self.buffer.strip():
                return events
            self._bare = self.buffer.lstrip().startswith("{")
        if self._bare:
            return events
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """The end of the text: an unclosed call is closed with what it has (a cut-off answer)."""
        events: list[ToolEvent] = []
        if self._bare:
            self._bare = False
            if self._bare_call(self.buffer, events):
                self.buffer = ""
                return events
            events = self.feed("")
        if self.state == "call":
            if not self._close(self.buffer, events, cut=True):
                self._content(self._raw + self.buffer, events)
        elif self.state == "group":
            self._content((self._raw if not self._group_calls else "") + self.buffer, events)
        else:
            self._content(self.buffer, events)
        self.buffer, self.state = "", "text"
        return events

    # -- states -------------------------------------------------------------------------------------------------
    def _step(self, events: list[ToolEvent]) -> bool:
        """One move of the state machine; False when it needs more text."""
        if self.state == "text":
            return self._text(events)
        if self.state == "group":
            return self._group(events)
        return self._call(events)

    def _text(self, events: list[ToolEvent]) -> bool:
        p = self.parser
        if not self._started:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            if p.open_tag and p.open_tag.startswith(stripped[: len(p.open_tag)]):
                if len(stripped) < len(p.open_tag):
                    return False  # maybe the tag ("[" may also be mistral's bare opener): wait for more
            elif p.bare_opener and stripped.startswith(p.bare_opener):  # the call group opens the answer
                self._started = True
                self._open_group(self.buffer[: len(self.buffer) - len(stripped)])
                self.buffer = stripped
                return True
            self._started = True
        start = self.buffer.find(p.open_tag) if p.open_tag else -1
        if start < 0:
            keep = _partial_suffix(self.buffer, p.open_tag)
            self._content(self.buffer[: len(self.buffer) - keep], events)
            self.buffer = self.buffer[len(self.buffer) - keep :]
            return False
        self._content(self.buffer[:start], events)
        self.buffer = self.buffer[start + len(p.open_tag) :]
        self._open_group(p.open_tag)
        return True

    def _open_group(self, raw: str) -> None:
        self.state, self._raw, self._group_calls, self._need_lead = "group", raw, 0, bool(self.parser.lead)

    def _group(self, events: list[ToolEvent]) -> bool:
        p = self.parser
        stripped = self.buffer.lstrip()
        self._take(len(self.buffer) - len(stripped))
        if not self.buffer:
            return False
        expected = [p.lead] if self._need_lead else ["{"] + ([p.sep] if p.sep and self._group_calls else [])
        expected += [p.close] if p.close and not self._need_lead else []
        for token in expected:
            if not self.buffer.startswith(token):
                continue
            if token == "{" and not self._need_lead:  # a call object begins (it stays in the buffer)
                self.state, self._args_start, self._args_sent, self._scan = "call", None, 0, (0, 0, False, False)
                return True
            self._take(len(token))
            if self._need_lead:
                self._need_lead = False
            elif token == p.close:
                self.state = "text"
            return True
        if any(t.startswith(self.buffer) for t in expected):
            return False  # maybe the start of what comes next
        self._fail(events)  # not a call: the group's text is content
        return True

    def _call(self, events: list[ToolEvent]) -> bool:
        end = self._object_end()
        body = self.buffer if end is None else self.buffer[: end + 1]
        if self._args_start is None and (m := self.parser.head.match(body)):
            self._start_call(json.loads(f'"{m.group(1)}"'), events)
            self._args_start = m.end()
        if end is None:
            if self._args_start is not None:  # all but a last "}" (maybe the wrapper's) is surely arguments
                brace = body.rfind("}")
                self._send_args(body[:brace] if brace >= self._args_start else body, events)
            return False
        self.buffer = self.buffer[end + 1 :]
        if self._close(body, events):
            self.state, self._raw = "group", ""
            self._group_calls += 1
        else:
            self.buffer = body + self.buffer
            self._fail(events)
        return True

    def _fail(self, events: list[ToolEvent]) -> None:
        """What the open group holds is not (or no longer) a call: its text so far goes out as content."""
        self._content(self._raw if not self._group_calls else "", events)
        self.state, self._raw = "text", ""

    def _take(self, n: int) -> None:
        if n:
            self._raw += self.buffer[:n]
            self.buffer = self.buffer[n:]

    def _object_end(self) -> int | None:
        """Index in the buffer of the `}` that closes the call object, or None while it is open."""
        i, depth, in_string, escaped = self._scan
        text = self.buffer
        while i < len(text):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
        self._scan = (i, depth, in_string, escaped)
        return None

    # -- events -------------------------------------------------------------------------------------------------
    def _bare_call(self, text: str, events: list[ToolEvent]) -> bool:
        try:
            obj = json.loads(text)
        except ValueError:
            return False
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return False
        self._start_call(obj["name"], events)
        self.calls[-1].arguments = json.dumps(obj["arguments"], ensure_ascii=False)
        events.append(ToolEvent("arguments", self.calls[-1].arguments, len(self.calls) - 1))
        return True

    def _content(self, text: str, events: list[ToolEvent]) -> None:
        if text:
            self.content += text
            events.append(ToolEvent("content", text))

    def _start_call(self, name: str, events: list[ToolEvent]) -> None:
        self.calls.append(ParsedCall(name))
        events.append(ToolEvent("call", name, len(self.calls) - 1))

    def _send_args(self, upto: str, events: list[ToolEvent]) -> None:
        if self._args_sent == 0:  # the arguments start at their first non-blank character
            while self._args_start < len(upto) and upto[self._args_start].isspace():
                self._args_start += 1
        piece = upto[self._args_start + self._args_sent :]
        if piece:
            self._args_sent += len(piece)
            self.calls[-1].arguments += piece
            events.append(ToolEvent("arguments", piece, len(self.calls) - 1))

    def _close(self, body: str, events: list[ToolEvent], cut: bool = False) -> bool:
        """The call object `body` is complete (or cut off); False when it is not a call (nothing was sent)."""
        if self._args_start is not None:  # streamed: the arguments are the text before the wrapper's "}"
            tail = body.rstrip()
            if tail.endswith("}") and not cut:
                tail = tail[:-1].rstrip()
            self._send_args(tail, events)
            return True
        try:  # the name came late (or not at all): take the call whole
            obj = json.loads(body)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            return False
        if not isinstance(name, str):
            return False
        self._start_call(name, events)
        self.calls[-1].arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        events.append(ToolEvent("arguments", self.calls[-1].arguments, len(self.calls) - 1))
        return True


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _head(args_keys: str) -> re.Pattern:
    """The start of a call object up to where its arguments begin; group 1: the name."""
    return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:' + args_keys + r')"\s*:\s*')


class ToolParser:
    """One model family's call format (see the module's docstring for what each field means)."""

    name = ""
    open_tag = ""  # a tag that opens a group anywhere in the text ("" if none)
    bare_opener = ""  # opens a group at the very start of the answer, without the tag ("" if none)
    hold_bare = False  # hermes: a bare object is a call only when it is the whole answer (held until the end)
    lead = ""  # the group's first character after its opener (mistral's "[")
    sep = ""  # between the calls of a group
    close = ""  # ends a group ("": the end of the text)
    args_key = "arguments"  # the key the grammars write the arguments under
    forced_tag = True  # a forced call is written after the tag (llama3_json: the bare object, as Llama 3.2 is told)
    head = _head("arguments")

    def __init__(self, special: dict[str, int] | None = None):
        """`special`: the ids of this format's tags that are added tokens of the model's vocabulary (Qwen2.5's
        `<tool_call>`, Mistral's `[TOOL_CALLS]`). llguidance sees every added token as a special token, outside
        the byte-level text, so a grammar names them as tokens (`<[id]>`) to let the model write its own token."""
        self.special = special or {}

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """A whole answer: (content, calls)."""
        s = self.stream()
        s.feed(text)
        s.finish()
        return s.content, s.calls

    # -- grammars -----------------------------------------------------------------------------------------------
    def _tag(self, tag: str) -> str:
        return f"<[{self.special[tag]}]>" if tag in self.special else json.dumps(tag)

    def group_body(self, one: bool) -> str:
        """The Lark of a group after its opener: `call`s, exactly one when `one`."""
        calls = "call" if one or not self.sep else f'call ({json.dumps(self.sep + " ")} call)*'
        return " ".join(x for x in (json.dumps(self.lead) if self.lead else "", calls, self._closing()) if x)

    def _closing(self) -> str:
        return json.dumps(self.close) if self.close else ""

    def forced_grammar(self, tools: ToolRequest) -> StructuredOutput:
        """Exactly one call to an allowed tool (tool_choice "required" or named), then the end of the answer."""
        opener = self._tag(self.open_tag) if self.forced_tag else ""
        return StructuredOutput("grammar", _lark(f"start: {opener} {self.group_body(True)}", tools, self, True))

    def auto_grammar(self, tools: ToolRequest) -> StructuredOutput:
        """tool_choice "auto" with a strict tool: free text, or calls (after text, if the format allows) whose
        names are the tools' and whose arguments follow each strict tool's schema. The free text at the start may
        not begin with the bare opener: such an answer would be parsed as a call, so it must be one."""
        first = _not_starting_with(self.bare_opener or ("{" if self.hold_bare else ""))
        bare = self.group_body(False) if self.bare_opener else ("call" if self.hold_bare else "")
        rules = [f"FIRST: /{first}/", "TEXT: /(.|\\n)*/"]
        starts = ["FIRST"] + (["bare"] if bare else [])
        if bare:
            rules.append(f"bare: {bare}")
        if self.open_tag:  # a tag anywhere: text up to it (lazily: the first occurrence), then the group's body
            starts.append("seg0 seg* TEXT" if self.close else "seg0")  # no close: the group runs to the end
            body, text = self.group_body(False), json.dumps(self.open_tag)
            rules += [f"hd0[lazy]: FIRST {text}", f"hd[lazy]: TEXT {text}"]
            first, later = "hd0", "hd"
            if self.open_tag in self.special:  # the tag's own token, or its text spelled in other tokens
                first, later = f"(hd0 | FIRST {self._tag(self.open_tag)})", f"(hd | TEXT {self._tag(self.open_tag)})"
            rules += [f"seg0: {first} {body}", f"seg: {later} {body}"]
        start = "start: " + " | ".join(starts)
        return StructuredOutput("grammar", _lark("\n".join([start, *rules]), tools, self, False))


def _not_starting_with(opener: str) -> str:
    """A regex of any text whose first non-blank character is not `opener` (any text when there is none)."""
    if not opener:
        return "(.|\\n)*"
    return f"\\s*([^\\s{re.escape(opener)}](.|\\n)*)?"


def _lark(rules: str, tools: ToolRequest, parser: ToolParser, forced: bool) -> str:
    schema = json.dumps(call_schema(tools, parser.args_key, forced))
    return f"{rules}\ncall: %json {schema}\n"


def call_schema(tools: ToolRequest, args_key: str = "arguments", forced: bool = True) -> dict:
    """One call as a JSON schema, name first: {"name": <a tool's>, args_key: <its parameters>}. Forced: only the
    allowed tools, each with its parameters. Auto: every tool, the parameters of the `strict` ones only (the
    others' arguments are any object, as OpenAI enforces only strict tools)."""
    options = []
    for t in tools.tools:
        fn = t["function"]
        if forced and tools.choice not in ("required", fn["name"]):
            continue
        params = fn["parameters"] if forced or fn.get("strict") is True else {"type": "object"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": False,
        })  # fmt: skip
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


class HermesParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5, Hermes, our fallback prompt);
    also a whole answer that is one bare call object (Qwen2.5-Coder-0.5B writes those)."""

    name = "hermes"
    open_tag = "<tool_call>"
    hold_bare = True
    close = "</tool_call>"

    def group_body(self, one: bool) -> str:
        return f'"\\n" call "\\n" {self._tag(self.close)}'


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2: the answer is `{"name": ..., "parameters": {...}}` (maybe after `<|python_tag|>`), several
    calls split by `;`."""

    name = "llama3_json"
    open_tag = "<|python_tag|>"
    bare_opener = "{"
    sep = ";"
    args_key = "parameters"
    forced_tag = False
    head = _head("parameters|arguments")


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"
    open_tag = "[TOOL_CALLS]"
    bare_opener = "["
    lead = "["
    sep = ","
    close = "]"


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
LLAMA3_MARKS = ("<|python_tag|>", "<|start_header_id|>", "<|eot_id|>")


def tool_parser(name: str | None, hf_tokenizer=None) -> ToolParser:
    """The parser named by `--tool-call-parser` (hermes when None); ValueError naming the known ones."""
    try:
        cls = TOOL_PARSERS[name or "hermes"]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None
    return cls(_special_ids(hf_tokenizer, (cls.open_tag, cls.close)))


def parser_name_for(template: str | None, native: bool) -> str:
    """The call format a chat template asks for. A template that does not render tools gets our fallback prompt,
    which asks for hermes calls."""
    source = template or ""
    if not native or "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if any(mark in source for mark in LLAMA3_MARKS):
        return "llama3_json"
    return "hermes"


def select_parser(template: str | None, native: bool, override: str | None, hf_tokenizer=None) -> ToolParser:
    """`--tool-call-parser` when given, else the one the template's source asks for."""
    return tool_parser(override or parser_name_for(template, native), hf_tokenizer)


def _special_ids(hf_tokenizer, tags: tuple[str, ...]) -> dict[str, int]:
    """The tags that are added tokens of the vocabulary (special or not: llguidance sees them as tokens)."""
    decoder = getattr(hf_tokenizer, "added_tokens_decoder", None) or {}
    return {t.content: i for i, t in decoder.items() if t.content and t.content in tags}
