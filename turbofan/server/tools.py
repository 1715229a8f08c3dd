"""Tool calling: tools into the prompt, the model's calls out of its text, a grammar when a call is required.

- `ToolRequest.parse` checks OpenAI's `tools` and `tool_choice` ("auto", "none", "required", or a named
  function); a malformed tool or an unknown name is a 400.
- `prepare_messages` renders the conversation for the chat template: with a template that knows tools (its
  source mentions `tools`, e.g. Qwen2.5's) the tools go to `apply_chat_template(..., tools=...)`; for one that
  does not (SmolLM2's) the documented fallback describes them in the system message, with the hermes call
  format, and turns earlier calls and tool results into text the template can show.
- A `ToolParser` knows one output format: its `grammar` forces a call (tool_choice "required" or named, so the
  model cannot fail to call, and the arguments follow the schema), and its `stream()` turns text, as it arrives,
  into content and tool-call events (name first, then argument fragments). The same events build a whole answer.
  `hermes` (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Qwen2.5, Hermes, and our fallback) is
  the default; `--tool-call-parser` picks another.
- `tool_choice: "none"` leaves the tools out of the prompt and the output unparsed.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from turbofan.engine.constraints import JSON_OPTIONS, StructuredOutput
from turbofan.server.errors import bad_request

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolRequest:
    tools: list[dict]  # OpenAI's shape: {"type": "function", "function": {"name", "description", "parameters"}}
    choice: str  # "auto" | "required" | the name of the function that must be called

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @classmethod
    def parse(cls, tools: Any, tool_choice: Any) -> ToolRequest | None:
        """None when no tool may be called (no tools, or tool_choice "none")."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None
        if not isinstance(tools, list):
            raise bad_request("tools must be a list", "tools")
        checked = [_check_tool(t, i) for i, t in enumerate(tools)]
        names = [t["function"]["name"] for t in checked]
        if len(set(names)) != len(names):
            raise bad_request(f"tool names must be unique, got {names}", "tools")
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
            if not isinstance(name, str):
                raise bad_request('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
            if name not in names:
                raise bad_request(f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})",
                                  "tool_choice")  # fmt: skip
            choice = name
        elif choice == "none":
            return None
        elif choice not in ("auto", "required"):
            raise bad_request(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                              "tool_choice")  # fmt: skip
        return cls(checked, choice)


def _check_tool(tool: Any, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
        tool.get("function"), dict
    ):
        raise bad_request(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools")
    fn = dict(tool["function"])
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, _, . or -, got {name!r}", "tools")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    fn["parameters"] = params
    return {"type": "function", "function": fn}


# -- prompts ------------------------------------------------------------------------------------------------------
def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def chat_template_source(tokenizer, override: str | None) -> str:
    """The Jinja source the chat will be rendered with (an override, else the tokenizer's own)."""
    return override or getattr(tokenizer.hf, "chat_template", None) or ""


FALLBACK_PROMPT = """You can call functions. Their signatures are within <tools></tools> XML tags:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object inside <tool_call></tool_call> tags and nothing else:
<tool_call>
{{"name": "<function name>", "arguments": <arguments as a JSON object>}}
</tool_call>"""


def _arguments_object(args: Any) -> Any:
    """Templates print arguments with `tojson`: a JSON string is turned back into its object first."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def prepare_messages(messages: list[dict], tools: ToolRequest | None, native: bool) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) for a conversation that may hold calls and tool results."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [
                {**c, "function": {**c.get("function", {}), "arguments": _arguments_object(c.get("function", {}).get("arguments"))}}
                for c in calls
            ]  # fmt: skip
            if not native:
                text = "\n".join(
                    f"<tool_call>\n{json.dumps({'name': c['function'].get('name'), 'arguments': c['function']['arguments']})}\n</tool_call>"
                    for c in m.pop("tool_calls")
                )  # fmt: skip
                m["content"] = ((m.get("content") or "") + "\n" + text).strip()
        if m["role"] == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if tools is None:
        return out, {}
    if native:
        return out, {"tools": tools.tools}
    described = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools.tools))
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{described}".strip()}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, {}


# -- parsing ------------------------------------------------------------------------------------------------------
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
        self.in_call = False
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._args_start: int | None = None  # where the arguments begin in the open call's buffer
        self._args_sent = 0
        # an answer that starts with "{" may be a bare call without the tags (Qwen2.5-Coder-0.5B writes them):
        # held until the end, then a call if it is one whole {"name", "arguments"} object (as Ollama does)
        self._bare: bool | None = None

    def feed(self, text: str) -> list[ToolEvent]:
        self.buffer += text
        events: list[ToolEvent] = []
        if self._bare is None:
            if not self.buffer.strip():
                return events
            self._bare = self.buffer.lstrip().startswith("{")
        if self._bare:
            return events
        while True:
            if not self.in_call:
                start = self.buffer.find(self.parser.open_tag)
                if start < 0:
                    keep = _partial_suffix(self.buffer, self.parser.open_tag)
                    self._content(self.buffer[: len(self.buffer) - keep], events)
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return events
                self._content(self.buffer[:start], events)
                self.buffer = self.buffer[start + len(self.parser.open_tag) :]
                self.in_call, self._args_start, self._args_sent = True, None, 0
            end = self.buffer.find(self.parser.close_tag)
            body = self.buffer if end < 0 else self.buffer[:end]
            if self._args_start is None and (m := self.parser.head.match(body)):
                self._start_call(json.loads(f'"{m.group(1)}"'), events)
                self._args_start = m.end()
            if end < 0:
                if self._args_start is not None:  # all but a last "}" (maybe the wrapper's) is surely arguments
                    brace = body.rfind("}")
                    self._send_args(body[:brace] if brace >= self._args_start else body, events)
                return events
            self._close(body, events)
            self.buffer = self.buffer[end + len(self.parser.close_tag) :]

    def finish(self) -> list[ToolEvent]:
        """The end of the text: an unclosed call is closed with what it has (a cut-off answer)."""
        events: list[ToolEvent] = []
        if self._bare:
            self._bare = False
            if self._bare_call(self.buffer, events):
                self.buffer = ""
                return events
            events = self.feed("")
        if self.in_call:
            self._close(self.buffer, events, cut=True)
        else:
            self._content(self.buffer, events)
        self.buffer = ""
        return events

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

    def _close(self, body: str, events: list[ToolEvent], cut: bool = False) -> None:
        self.in_call = False
        if self._args_start is not None:  # streamed: the arguments are the text before the wrapper's "}"
            tail = body.rstrip()
            if tail.endswith("}") and not cut:
                tail = tail[:-1].rstrip()
            self._send_args(tail, events)
            return
        try:  # the name came late (or not at all): take the call whole
            obj = json.loads(body)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            self._content(self.parser.open_tag + body + ("" if cut else self.parser.close_tag), events)
            return
        self._start_call(str(name), events)
        self.calls[-1].arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        events.append(ToolEvent("arguments", self.calls[-1].arguments, len(self.calls) - 1))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolParser:
    """One model family's call format."""

    name = ""
    open_tag = ""
    close_tag = ""
    head: re.Pattern  # the start of a call's body up to where its arguments begin; group 1: the name

    def grammar(self, tools: ToolRequest) -> StructuredOutput:
        raise NotImplementedError

    def stream(self) -> ToolStream:
        return ToolStream(self)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """A whole answer: (content, calls)."""
        s = self.stream()
        s.feed(text)
        s.finish()
        return s.content, s.calls


def call_schema(tools: ToolRequest) -> dict:
    """One call as a JSON schema: {"name": <one of the allowed>, "arguments": <its parameters>}, name first."""
    allowed = [t for t in tools.tools if tools.choice in ("required", t["function"]["name"])]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


class HermesParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5, Hermes, the fallback prompt)."""

    name = "hermes"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    head = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def grammar(self, tools: ToolRequest) -> StructuredOutput:
        """Exactly one call, then the end of the answer."""
        schema = json.dumps(call_schema(tools))
        return StructuredOutput("grammar", f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}')


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser}


def tool_parser(name: str | None) -> ToolParser:
    """The parser `--tool-call-parser` names (hermes by default: Qwen2.5's format, and our fallback's)."""
    try:
        return TOOL_PARSERS[name or "hermes"]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(TOOL_PARSERS)}") from None


# -- OpenAI's shapes ----------------------------------------------------------------------------------------------
def openai_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def openai_deltas(events: list[ToolEvent], calls: list[ParsedCall]) -> list[dict]:
    """Stream deltas as OpenAI sends them: content; a call's index, id, type and name; then argument fragments."""
    out: list[dict] = []
    for e in events:
        if e.kind == "content":
            if out and "content" in out[-1]:
                out[-1]["content"] += e.text
            else:
                out.append({"content": e.text})
        elif e.kind == "call":
            call = calls[e.index]
            fn = {"name": call.name, "arguments": ""}
            out.append({"tool_calls": [{"index": e.index, "id": call.id, "type": "function", "function": fn}]})
        else:
            out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out


def ollama_calls(calls: list[ParsedCall]) -> list[dict]:
    """Ollama's tool_calls: arguments as a JSON object (its client validates them as a mapping)."""
    out = []
    for i, c in enumerate(calls):
        args = _arguments_object(c.arguments)
        out.append({"function": {"index": i, "name": c.name, "arguments": args if isinstance(args, dict) else {}}})
    return out
